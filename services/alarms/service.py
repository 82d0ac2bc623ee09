"""`AlarmsService`: one replica of the alarms service; run as many as you like against one NATS.

Every replica keeps a copy of the alarm table (KV watch) and answers requests (queue group);
the holder of the lease alone consumes alarm changes and writes the table (`processor`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

from nats.aio.subscription import Subscription
from pydantic import ValidationError

from bus import subjects
from bus.client import Bus, RequestHandler
from bus.kvmirror import KvMirror
from bus.lease import LeaderLease
from bus.log import get_logger
from bus.streams import (
    ALARMS_KV,
    alarm_activity_stream,
    alarms_lease_kv,
    center_alarm_stream,
    dead_letter_stream,
    ensure_kv,
    ensure_stream,
    uplink_stream,
)
from schemas.alarms import (
    AlarmAck,
    AlarmHistoryQuery,
    AlarmRecord,
    AlarmsQuery,
    AlarmsStatsQuery,
    AlarmsSummaryQuery,
)
from schemas.envelope import EventData
from services.alarms.config import AlarmsConfig
from services.alarms.processor import AlarmProcessor
from services.alarms.queries import AlarmRequests

MIRROR_CHECK_S = 2.0
RESTART_PAUSE_S = 0.5


def request_subjects() -> dict[str, str]:
    """Operation name -> subject of every request the alarms service answers."""
    return {
        op: subjects.alarms_control(op) for op in ("list", "summary", "history", "ack", "stats")
    }


class AlarmsService:
    """The caller owns `bus` and closes it; `run(stop)` starts, serves, then closes."""

    def __init__(self, bus: Bus, config: AlarmsConfig | None = None) -> None:
        self.bus = bus
        self.config = config or AlarmsConfig()
        self.mirror: KvMirror[AlarmRecord] | None = None
        self.lease: LeaderLease | None = None
        self.requests: AlarmRequests | None = None
        self.processor: AlarmProcessor | None = None
        self.started = asyncio.Event()  # set once every request subject is served
        self.leaderships = 0
        self._processing: asyncio.Task[None] | None = None
        self._halt = asyncio.Event()
        self._subscriptions: list[Subscription] = []
        self._totals: Counter[str] = Counter()  # of earlier processors (leadership terms)
        self._log = get_logger("alarms", replica=self.config.replica_id)

    @property
    def is_leader(self) -> bool:
        return self.lease is not None and self.lease.is_leader

    def counters(self) -> dict[str, int]:
        out = Counter(self._totals)
        if self.processor is not None:
            out.update(self.processor.stats)
        out["leaderships"] = self.leaderships
        return dict(out)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        js = self.bus.js
        for spec in (
            dead_letter_stream(subjects.CENTER),
            uplink_stream("alarm"),
            center_alarm_stream(),
            alarm_activity_stream(),
        ):
            await ensure_stream(js, spec)
        kv = await ensure_kv(js, ALARMS_KV)
        lease_kv = await ensure_kv(js, alarms_lease_kv(self.config.lease_ttl_s))
        self.mirror = KvMirror(js, kv, ALARMS_KV.bucket, self._parse)
        await self.mirror.start()
        self.lease = LeaderLease(lease_kv, self.config.replica_id, self.config.lease_ttl_s)
        self.requests = AlarmRequests(
            self.bus,
            self.mirror,
            self.config,
            counters=self.counters,
            leading=lambda: self.is_leader,
        )
        await self._serve()
        self.started.set()
        self._log.info("alarms_started", records=len(self.mirror))

    async def _serve(self) -> None:
        ops, queue, requests = request_subjects(), self.config.request_queue, self.requests
        assert requests is not None
        handlers: tuple[tuple[str, type[EventData], RequestHandler[Any]], ...] = (
            ("list", AlarmsQuery, requests.list_),
            ("summary", AlarmsSummaryQuery, requests.summary),
            ("history", AlarmHistoryQuery, requests.history),
            ("ack", AlarmAck, requests.ack),
        )
        for op, model, handler in handlers:
            self._subscriptions.append(
                await self.bus.serve(ops[op], model, handler, queue=queue, component=f"alarms-{op}")
            )
        # Every replica answers from its own counters: the caller hears each one.
        self._subscriptions.append(
            await self.bus.serve(
                ops["stats"], AlarmsStatsQuery, requests.stats, component="alarms-stats"
            )
        )
        await self.bus.confirm_subscriptions()

    def _parse(self, key: str, value: bytes) -> AlarmRecord | None:
        try:
            return AlarmRecord.model_validate_json(value)
        except ValidationError as exc:
            self._log.error("alarm_record_unreadable", key=key, error=str(exc)[:300])
            return None

    async def run(self, stop: asyncio.Event) -> None:
        """Start, then lead or follow until `stop` is set, then close."""
        await self.start()
        assert self.lease is not None and self.mirror is not None
        last_check = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                await self.lease.tick()
                await self._lead_or_follow()
                if loop.time() - last_check >= MIRROR_CHECK_S and self.bus.nc.is_connected:
                    last_check = loop.time()
                    with contextlib.suppress(Exception):  # retried at the next check
                        await self.mirror.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.lease_renew_s)
        finally:
            await self.close()

    async def _lead_or_follow(self) -> None:
        leading = self.is_leader and self.bus.nc.is_connected
        task = self._processing
        if task is not None and task.done():
            self._processing = None
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                self._log.error("alarm_processing_failed", error=repr(failure))
            task = None
        if leading and task is None:
            self._halt = asyncio.Event()
            self._processing = asyncio.create_task(self._process(self._halt))
        elif not leading and task is not None:
            self._log.warning("alarm_processing_handed_over")
            await self._stop_processing(flush=False)

    async def _process(self, halt: asyncio.Event) -> None:
        assert self.mirror is not None and self.lease is not None
        lease = self.lease
        processor = AlarmProcessor(
            self.bus, self.mirror, self.config, may_write=lambda: lease.is_leader
        )
        self.processor = processor
        self.leaderships += 1
        flush = True
        try:
            await processor.start()
            await processor.run(halt)
        except Exception:
            flush = False
            raise
        finally:
            with contextlib.suppress(Exception):
                await processor.stop(flush=flush and lease.is_leader)
            self._totals.update(processor.stats)
            self.processor = None
            if not flush:
                await asyncio.sleep(RESTART_PAUSE_S)

    async def _stop_processing(self, *, flush: bool) -> None:
        task, self._processing = self._processing, None
        if task is None:
            return
        if not flush and self.processor is not None:
            self.processor.stop_writing()
        self._halt.set()
        with contextlib.suppress(Exception):
            await task

    async def close(self) -> None:
        """Finish requests, store what was processed, hand the lease over, stop watching."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        await self._stop_processing(flush=True)
        if self.lease is not None and not self.bus.nc.is_closed:
            await self.lease.release()
        if self.mirror is not None:
            await self.mirror.stop()
        self._log.info("alarms_stopped", **self.counters())
