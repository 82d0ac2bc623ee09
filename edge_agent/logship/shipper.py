"""`LogShipper`: the agent part that moves queued log records into the site's replay log.

Entries are kind "log", key = level, so they reach the center on `up.<site>.log.<level>`;
offline they wait in the replay log with everything else the site owes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from bus.client import Bus
from bus.log import add_tap, get_logger, remove_tap, set_level
from bus.replaylog import AppendStatus, LogEntry, ReplayLog
from edge_agent.logship.queue import DEFAULT_CAPACITY, LOG_KIND, SHIPPER_COMPONENT, ShipQueue
from schemas.logs import LogConfig, LogRecord


@dataclass(frozen=True)
class ShipTuning:
    capacity: int = DEFAULT_CAPACITY  # records waiting in memory; more are dropped (counted)
    batch_size: int = 100
    retry_min_s: float = 0.5  # after a failed or refused append
    retry_max_s: float = 10.0
    # Drops are reported once the queue has drained, or after this long in a record storm.
    drops_report_s: float = 5.0
    final_flush_s: float = 2.0  # at stop: how long to keep appending what is queued


@dataclass(frozen=True)
class ShipStats:
    queued: int
    held: int  # taken from the queue, not yet in the replay log (refused or failed)
    shipped: int  # appended to the replay log
    dropped: int  # never queued: the queue was full
    summaries: int  # "N records dropped" records shipped
    append_failures: int
    refused: int  # appends the full replay log refused (retried)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class LogShipper:
    """Ships this agent's log records at or above `ship_level` to the center.

    `apply_config` changes the agent's printed level and the ship level at once, live.
    """

    def __init__(
        self,
        bus: Bus,
        replay_log: ReplayLog,
        site: str,
        *,
        ship_level: str = "warning",
        tuning: ShipTuning | None = None,
    ) -> None:
        self.site = site
        self.tuning = tuning or ShipTuning()
        self.queue = ShipQueue(site, ship_level=ship_level, capacity=self.tuning.capacity)
        self._bus = bus
        self._replay_log = replay_log
        self._held: list[LogEntry] = []
        self._wake = asyncio.Event()
        self._shipped = 0
        self._summaries = 0
        self._failures = 0
        self._refused = 0
        self._consecutive = 0
        self._log = get_logger(SHIPPER_COMPONENT, site=site)

    # -- public ---------------------------------------------------------------------------

    def apply_config(self, config: LogConfig) -> None:
        """Apply a `log` config: the printed level of this process, and the ship level."""
        set_level(config.level)
        self.queue.set_ship_level(config.ship_level)
        self._log.info("log_config_applied", level=config.level, ship_level=config.ship_level)

    def stats(self) -> ShipStats:
        return ShipStats(
            queued=len(self.queue),
            held=len(self._held),
            shipped=self._shipped,
            dropped=self.queue.dropped_total,
            summaries=self._summaries,
            append_failures=self._failures,
            refused=self._refused,
        )

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def wake() -> None:  # called by the tap, on whichever thread logged
            loop.call_soon_threadsafe(self._wake.set)

        self.queue.set_waker(wake)
        add_tap(self.queue.tap)
        stop_watch = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                self._wake.clear()
                delay = await self._ship()
                if delay:  # the replay log failed or refused: retry later (or stop)
                    await self._sleep_unless(stop, delay)
                elif not len(self.queue):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.tuning.drops_report_s)
        finally:
            remove_tap(self.queue.tap)
            self.queue.set_waker(None)
            stop_watch.cancel()
            # What is queued now was logged before the stop: append it while the log answers.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ship(), self.tuning.final_flush_s)

    # -- internals ------------------------------------------------------------------------

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _sleep_unless(self, stop: asyncio.Event, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    async def _ship(self) -> float:
        """Append until the queue is empty (0) or an append fails (the retry delay)."""
        drops_due = time.monotonic() + self.tuning.drops_report_s
        while True:
            if not self._held:
                records = self.queue.take(self.tuning.batch_size)
                if not records or time.monotonic() >= drops_due:
                    # Caught up (or a storm outlasts the report delay): say what was lost.
                    summary = self.queue.take_drops(datetime.now(UTC))
                    if summary is not None:
                        self._summaries += 1
                        records.append(summary)
                        drops_due = time.monotonic() + self.tuning.drops_report_s
                if not records:
                    return 0.0
                self._held = [self._entry(record) for record in records]
            delay = await self._append_held()
            if delay:
                return delay

    def _entry(self, record: LogRecord) -> LogEntry:
        # The envelope's time is when the record was logged: what CloudEvents `time` means.
        event = self._bus.event(record, time=record.timestamp)
        return LogEntry(kind=LOG_KIND, key=record.level.value, event=event)

    async def _append_held(self) -> float:
        try:
            results = await self._replay_log.append_batch(self._held)
        except Exception as exc:  # the site's JetStream is not answering: keep them, retry
            self._failures += 1
            self._consecutive += 1
            if self._consecutive == 1:
                self._log.warning("log_append_failed", error=repr(exc), held=len(self._held))
            return self._retry_delay()
        refused = [
            e for e, r in zip(self._held, results, strict=True) if r.status is AppendStatus.REFUSED
        ]
        self._shipped += len(self._held) - len(refused)
        self._held = refused
        if not refused:
            self._consecutive = 0
            return 0.0
        self._refused += len(refused)
        self._consecutive += 1
        if self._consecutive == 1:
            self._log.warning("log_records_refused", refused=len(refused), detail="replay log full")
        return self._retry_delay()

    def _retry_delay(self) -> float:
        delay = self.tuning.retry_min_s * 2 ** min(self._consecutive - 1, 10)
        return float(min(delay, self.tuning.retry_max_s))
