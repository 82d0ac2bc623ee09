"""The site registry in JetStream KV: a watched in-memory copy for reads (`bus.kvmirror`),
CAS for every write. Any number of controller replicas share one bucket; none ever overwrites
another's write.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from bus.kvmirror import KvMirror
from bus.log import get_logger
from schemas.controller import SiteRecord

MUTATE_DEADLINE_S = 10.0
BACKOFF_MAX_S = 0.05
LOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Mutation:
    """What a compare-and-set write did: the record before and after, and if it was written."""

    before: SiteRecord | None
    after: SiteRecord | None
    written: bool
    revision: int


class ContentionError(RuntimeError):
    """A key changed under us on every attempt: give up rather than spin."""


Change = Callable[[SiteRecord | None], SiteRecord | None]


class Registry:
    """SITES bucket access for one replica.

    Reads come from a copy kept current by a KV watcher (`KvMirror`). Writes go through
    `mutate`: compute the next record from the current one, write it only if the key's
    revision is still the one it was computed from, and on conflict re-read and recompute.
    The copy keeps the last revision of every key, deleted keys included: an older write
    never resurrects a record a newer delete removed.
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str) -> None:
        self._kv = kv
        self._copy: KvMirror[SiteRecord] = KvMirror(js, kv, bucket, self._decode)
        self.conflicts = 0
        self._log = get_logger("controller.registry")

    # -- reads ------------------------------------------------------------------------

    def get(self, site: str) -> SiteRecord | None:
        return self._copy.get(site)

    def records(self) -> Iterable[SiteRecord]:
        return self._copy.values()

    def __len__(self) -> int:
        return len(self._copy)

    async def read(self, site: str) -> tuple[SiteRecord | None, int]:
        """The authoritative record and revision, straight from the bucket."""
        try:
            entry = await self._kv.get(site)
        except KeyNotFoundError as exc:  # deleted (the marker's revision) or never written
            revision = exc.entry.revision if exc.entry is not None else 0
            self._copy.remember(site, None, revision)
            return None, revision
        record, revision = self._decode(site, entry.value or b""), entry.revision or 0
        self._copy.remember(site, record, revision)  # an unreadable record counts as none
        return record, revision

    async def barrier(self, timeout: float) -> bool:
        """Wait until this copy has seen every write made so far by any replica.

        True once caught up; False after `timeout` (re-synchronised if it made no progress).
        """
        return await self._copy.barrier(timeout)

    async def check(self) -> None:
        """Watchdog, called periodically: a copy that is behind the bucket and has not moved
        since the last check lost its watcher (e.g. the server restarted): re-synchronise."""
        await self._copy.check()

    # -- writes -----------------------------------------------------------------------

    async def mutate(
        self, site: str, change: Change, *, give_up_after_s: float = MUTATE_DEADLINE_S
    ) -> Mutation:
        """Apply `change` to the current record with compare-and-set, retrying on conflict.

        `change` returns the record unchanged (same object) to write nothing, None to
        delete, or a new record. It may raise (e.g. a Refusal): nothing is written then.
        Conflicts back off with jitter, so a replica that keeps losing to another's
        stream of writes on the same key still gets its turn.
        """
        record, revision = self._copy.get(site), self._copy.revision(site)
        deadline = time.monotonic() + give_up_after_s
        attempt = 0
        while True:
            after = change(record)
            if after is record or (after is not None and after == record):
                return Mutation(record, record, False, revision)
            try:
                if after is None:
                    # A delete returns no revision; the marker is the key's next message.
                    await self._kv.delete(site, last=revision)
                    new_revision = revision + 1
                else:
                    data = after.model_dump_json().encode()
                    new_revision = await self._kv.update(site, data, last=revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                attempt += 1
                if time.monotonic() >= deadline:
                    raise ContentionError(
                        f"registry key {site} kept changing: gave up after {attempt} attempts"
                    ) from None
                await asyncio.sleep(random.uniform(0, min(BACKOFF_MAX_S, 0.001 * 2**attempt)))
                record, revision = await self.read(site)
                continue
            self._copy.remember(site, after, new_revision)
            return Mutation(record, after, True, new_revision)

    # -- the watched copy ---------------------------------------------------------------

    @property
    def resyncs(self) -> int:
        return self._copy.resyncs

    async def start(self, timeout: float = LOAD_TIMEOUT_S) -> None:
        """Load the whole bucket, then keep following it."""
        await self._copy.start(timeout)
        self._log.info("registry_loaded", sites=len(self._copy), revision=self._copy.applied)

    async def resync(self) -> None:
        """Restart the watcher (e.g. its consumer was lost): reloads the latest of each key."""
        await self._copy.resync()

    async def stop(self) -> None:
        await self._copy.stop()

    def _decode(self, site: str, value: bytes) -> SiteRecord | None:
        try:
            return SiteRecord.model_validate_json(value)
        except ValidationError as exc:
            # Kept out of the copy but logged: an operator must look at this key.
            self._log.error("registry_record_invalid", site=site, error=str(exc)[:500])
            return None
