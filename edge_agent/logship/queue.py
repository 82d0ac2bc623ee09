"""The logging side of log shipping: a `LogTap` that copies records into a bounded queue.

It never waits for I/O and does little in the logging call (a shallow copy); a full queue
drops the record and counts it. Records become `LogRecord`s when the shipper takes them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bus import subjects
from bus.log import LogTap, level_number
from edge_agent.logship.records import drops_record, known_level, to_log_record
from schemas.logs import LEVELS, LogLevel, LogRecord

SHIPPER_COMPONENT = "edge_agent.logship"
LOG_KIND = "log"  # replay-log kind of shipped records (key = level)
DEFAULT_CAPACITY = 1000


@dataclass(frozen=True, slots=True)
class _Pending:
    level: str
    record: dict[str, Any]  # a shallow copy: values are converted when taken
    at: float  # time.time() when tapped (used if the record carries no timestamp)


@dataclass(frozen=True)
class Drops:
    """Records the full queue dropped since the last summary."""

    count: int
    highest: LogLevel
    first_at: datetime


class ShipQueue:
    """Records of one site at or above the ship level, oldest first, at most `capacity`.

    Records of the shipper itself are not taken (its own trouble must not feed itself), nor
    records about a shipped log record (e.g. the forwarder dead-lettering one the center has
    no stream for: shipping that would make another such record, for ever), nor records
    bound to another site (several agents in one process share the logging setup).
    `write` runs on whichever thread logged; `take` runs on the shipper's event loop.
    """

    def __init__(
        self, site: str, *, ship_level: str = "warning", capacity: int = DEFAULT_CAPACITY
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.site = site
        self._log_entries = subjects.replay(site, LOG_KIND) + "."
        self.capacity = capacity
        self.tap = LogTap(self.write, level_number(ship_level))
        self.ship_level = ship_level
        self.dropped_total = 0
        self.unconvertible = 0  # records that could not be made a LogRecord (a bug: counted)
        self._records: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._drops = 0
        self._drops_highest = LogLevel.DEBUG
        self._first_drop: datetime | None = None
        self._waker: Callable[[], None] | None = None

    def set_ship_level(self, level: str) -> None:
        self.tap.level = level_number(level)
        self.ship_level = level

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """`waker()` is called (from any thread) when the queue stops being empty."""
        self._waker = waker

    def __len__(self) -> int:
        return len(self._records)

    def write(self, level: str, record: Mapping[str, Any]) -> None:
        """The tap: keep a copy of `record` if there is room, else count it as dropped."""
        if record.get("component") == SHIPPER_COMPONENT:
            return
        subject = record.get("subject")
        if isinstance(subject, str) and subject.startswith(self._log_entries):
            return
        site = record.get("site")
        if site is not None and site != self.site:
            return
        pending = _Pending(level, dict(record), time.time())
        with self._lock:
            full = len(self._records) >= self.capacity
            if not full:
                was_empty = not self._records
                self._records.append(pending)
        if full:
            self._drop(level)
        elif was_empty and self._waker is not None:
            self._waker()

    def _drop(self, level: str) -> None:
        known = known_level(level)
        now = datetime.now(UTC)
        with self._lock:
            self.dropped_total += 1
            self._drops += 1
            if LEVELS.index(known) > LEVELS.index(self._drops_highest):
                self._drops_highest = known
            if self._first_drop is None:
                self._first_drop = now

    def take(self, limit: int) -> list[LogRecord]:
        """Up to `limit` records, oldest first, removed from the queue and converted."""
        with self._lock:
            count = min(limit, len(self._records))
            taken = [self._records.popleft() for _ in range(count)]
        records = []
        for pending in taken:
            at = datetime.fromtimestamp(pending.at, UTC)
            try:
                records.append(to_log_record(self.site, pending.level, pending.record, at))
            except Exception:  # a bug in the conversion: count it, never stop shipping
                self.unconvertible += 1
        return records

    def pending_drops(self) -> Drops | None:
        with self._lock:
            if not self._drops or self._first_drop is None:
                return None
            return Drops(self._drops, self._drops_highest, self._first_drop)

    def take_drops(self, now: datetime) -> LogRecord | None:
        """The "N records dropped" summary of drops not reported yet (None: there were none),
        at the highest level dropped, so a reader of that level learns of the gap."""
        with self._lock:
            if not self._drops or self._first_drop is None:
                return None
            drops = Drops(self._drops, self._drops_highest, self._first_drop)
            self._drops, self._drops_highest, self._first_drop = 0, LogLevel.DEBUG, None
        return drops_record(self.site, drops.count, drops.highest, drops.first_at, now)
