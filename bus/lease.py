"""Leader election among service replicas: a lease key in a KV bucket with a TTL.

Acquire with create, renew with compare-and-set; the key expires when its holder stops.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus.log import get_logger

LEASE_KEY = "leader"
# Act as leader only for this share of the TTL after a renewal was sent: the server
# expires the key a full TTL after it stored the renewal, so a holder that can no longer
# renew stops acting before anyone else can acquire the key.
VALIDITY_SHARE = 0.8


class LeaderLease:
    """One replica's view of the lease. Call `tick` every `ttl_s / 4` or so."""

    def __init__(
        self,
        kv: KeyValue,
        replica_id: str,
        ttl_s: float,
        *,
        key: str = LEASE_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kv = kv
        self.key = key
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self._clock = clock
        self._revision: int | None = None
        self._valid_until = 0.0
        self.terms = 0  # how many times this replica became leader
        self._log = get_logger("bus.lease", replica=replica_id, lease=key)

    @property
    def is_leader(self) -> bool:
        return self._revision is not None and self._clock() < self._valid_until

    async def tick(self) -> bool:
        """Renew the lease if held, else try to take it; returns whether we lead now."""
        sent_at = self._clock()
        value = self.replica_id.encode()
        try:
            if self._revision is not None and sent_at < self._valid_until:
                self._revision = await self._kv.update(self.key, value, last=self._revision)
            else:
                # Ours expired (or never held): only a fresh create may take it, so a
                # replica that lost it never steals it back from its successor.
                was_leader = self._revision is not None
                self._revision = None
                if was_leader:
                    self._log.warning("leadership_lapsed")
                self._revision = await self._kv.create(self.key, value)
                self.terms += 1
                self._log.info("leadership_acquired", term=self.terms)
            self._valid_until = sent_at + self.ttl_s * VALIDITY_SHARE
        except KeyWrongLastSequenceError:
            if self._revision is not None:
                self._log.warning("leadership_lost")
            self._revision = None
        except Exception as exc:  # NATS unreachable: keep what we had until it lapses
            self._log.warning("lease_tick_failed", error=repr(exc))
        return self.is_leader

    async def release(self) -> None:
        """Give the lease up (clean shutdown) so a successor takes over at once."""
        if self._revision is None:
            return
        revision, self._revision = self._revision, None
        with contextlib.suppress(Exception):  # if it fails, the TTL does the job
            await self._kv.delete(self.key, last=revision)
            self._log.info("leadership_released")
