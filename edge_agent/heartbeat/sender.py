"""`HeartbeatSender`: the site's periodic `SiteHeartbeat` (version, capacity, load, backlog...).

Core publish on `up.<site>.heartbeat`: liveness, not history, so never stored nor replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bus import subjects
from bus.client import Bus
from bus.log import get_logger
from edge_agent.heartbeat.inventory import build_inventory, collect_load
from schemas.controller import Inventory, SiteHeartbeat

HEARTBEAT_KIND = "heartbeat"


@dataclass(frozen=True)
class HeartbeatStats:
    sent: int = 0  # handed to the site's server (which drops it while the center link is down)
    skipped: int = 0  # not sent: the connection to the site's server was down at that moment
    failed: int = 0  # the inventory could not be built or the publish raised
    last_error: str | None = None
    last_sent_at: datetime | None = None


def next_beat(start: float, interval_s: float, now: float) -> float:
    """The first slot `start + k * interval_s` after `now` (fixed rate, no drift; a late
    beat does not cause a burst: missed slots are skipped)."""
    if now < start:
        return start
    return start + (int((now - start) / interval_s) + 1) * interval_s


class HeartbeatSender:
    """Publishes `SiteHeartbeat(site, seq, sent_at, inventory())` every `interval_s`.

    The first beat goes out at once. `seq` numbers the beat slots since this sender started
    (0, 1, 2...), sent or not, so a gap tells the center how many it missed. Nothing here
    ever raises out of `run`: a beat that cannot be sent is counted and the next one tried.
    A beat is not queued while the site's own server is unreachable: a heartbeat delivered
    late would claim the site was alive at a time nobody heard from it.
    """

    def __init__(
        self,
        bus: Bus,
        site: str,
        interval_s: float,
        inventory: Callable[[], Inventory],
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.bus = bus
        self.site = subjects.site_id(site)
        self.interval_s = interval_s
        self.subject = subjects.up(site, HEARTBEAT_KIND)
        self._inventory = inventory
        self._seq = 0
        self._stats = HeartbeatStats()
        self._log = get_logger("edge_agent.heartbeat", site=self.site)

    def stats(self) -> HeartbeatStats:
        return self._stats

    async def run(self, stop: asyncio.Event) -> None:
        start = time.monotonic()
        self._log.info("heartbeat_started", interval_s=self.interval_s, subject=self.subject)
        while not stop.is_set():
            await self.beat()
            delay = next_beat(start, self.interval_s, time.monotonic()) - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))

    async def beat(self) -> bool:
        """Send one heartbeat now; True when it was handed to the site's server."""
        seq, self._seq = self._seq, self._seq + 1
        if not self.bus.nc.is_connected:
            self._record(skipped=1)
            return False
        try:
            data = SiteHeartbeat(
                site=self.site, seq=seq, sent_at=datetime.now(UTC), inventory=self._inventory()
            )
            await self.bus.publish(self.subject, self.bus.event(data))
        except Exception as exc:  # a heartbeat must never take its task down
            self._log.warning("heartbeat_failed", seq=seq, error=repr(exc))
            self._record(failed=1, last_error=repr(exc))
            return False
        self._record(sent=1, last_sent_at=data.sent_at)
        return True

    def _record(self, *, sent: int = 0, skipped: int = 0, failed: int = 0, **last: Any) -> None:
        s = self._stats
        self._stats = HeartbeatStats(
            sent=s.sent + sent,
            skipped=s.skipped + skipped,
            failed=s.failed + failed,
            last_error=last.get("last_error", s.last_error),
            last_sent_at=last.get("last_sent_at", s.last_sent_at),
        )


def _none() -> int:
    return 0


def agent_heartbeat(
    bus: Bus,
    site: str,
    *,
    interval_s: float,
    data_dir: Path,
    agent_version: str,
    device_count: Callable[[], int],
    replay_snapshot: Callable[[], Mapping[str, Any]],
    function_count: Callable[[], int] = _none,
) -> HeartbeatSender:
    """The agent's heartbeat in one call; run it as a part: `("heartbeat", sender.run)`.

    The callables are read at every beat: distinct devices seen by ingest, the replay
    monitor's `snapshot()`, and deployed functions.
    """
    collect_load(data_dir)  # primes psutil's CPU reading, so the first beat is not 0 %

    def inventory() -> Inventory:
        return build_inventory(
            agent_version, device_count(), replay_snapshot(), function_count(), data_dir
        )

    return HeartbeatSender(bus, site, interval_s, inventory)
