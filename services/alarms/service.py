"""`AlarmsService`: one replica of the alarms service; run as many as you like against one NATS.

Every replica keeps a copy of the alarm table (KV watch) and answers requests (queue group);
the holder of a partition's lease alone consumes its alarm changes and writes its part of the
table (`processor`); each replica leads its fair share of the partitions (`partitions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from bus import subjects
from bus.client import Bus, RequestHandler
from bus.kvmirror import KvMirror
from bus.lease import LEASE_KEY, LeaderLease
from bus.log import get_logger
from bus.partitions import partition_transform, transform_partitions
from bus.streams import (
    ALARMS_KV,
    alarm_activity_stream,
    alarms_lease_kv,
    center_alarm_stream,
    dead_letter_stream,
    ensure_kv,
    ensure_stream,
    stream_transform,
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
from services.alarms.partitions import Partition, Presence, plan_leases
from services.alarms.processor import AlarmProcessor
from services.alarms.queries import AlarmRequests

MIRROR_CHECK_S = 2.0
RESTART_PAUSE_S = 0.5


def request_subjects() -> dict[str, str]:
    """Operation name -> subject of every request the alarms service answers."""
    return {
        op: subjects.alarms_control(op) for op in ("list", "summary", "history", "ack", "stats")
    }


@dataclass
class _Term:
    """One partition: this replica's lease on it, and its processor while leading it."""

    partition: Partition
    lease: LeaderLease
    task: asyncio.Task[None] | None = None
    halt: asyncio.Event = field(default_factory=asyncio.Event)
    processor: AlarmProcessor | None = None


class AlarmsService:
    """The caller owns `bus` and closes it; `run(stop)` starts, serves, then closes."""

    def __init__(self, bus: Bus, config: AlarmsConfig | None = None) -> None:
        self.bus = bus
        self.config = config or AlarmsConfig()
        self.mirror: KvMirror[AlarmRecord] | None = None
        self.requests: AlarmRequests | None = None
        self.presence: Presence | None = None
        self.terms: dict[int, _Term] = {}
        self.started = asyncio.Event()  # set once every request subject is served
        self.leaderships = 0
        self._alive: list[str] = []
        self._lease_ticks = 0
        self._subscriptions: list[Subscription] = []
        self._totals: Counter[str] = Counter()  # of earlier processors (leadership terms)
        self._log = get_logger("alarms", replica=self.config.replica_id)

    @property
    def is_leader(self) -> bool:
        """Whether this replica leads a partition now."""
        return any(term.lease.is_leader for term in self.terms.values())

    @property
    def led(self) -> list[int]:
        """The partitions this replica leads now."""
        return sorted(p for p, term in self.terms.items() if term.lease.is_leader)

    @property
    def processors(self) -> dict[int, AlarmProcessor]:
        return {p: t.processor for p, t in self.terms.items() if t.processor is not None}

    @property
    def processor(self) -> AlarmProcessor | None:
        """The processor of an unpartitioned service (None while not leading)."""
        processors = self.processors
        return next(iter(processors.values())) if len(processors) == 1 else None

    def counters(self) -> dict[str, int]:
        out = Counter(self._totals)
        for processor in self.processors.values():
            out.update(processor.stats)
        out["leaderships"] = self.leaderships
        return dict(out)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        js, config = self.bus.js, self.config
        for spec in (
            dead_letter_stream(subjects.CENTER),
            center_alarm_stream(),
            alarm_activity_stream(),
        ):
            await ensure_stream(js, spec)
        await ensure_partitioned(js, config.partitions)
        kv = await ensure_kv(js, ALARMS_KV)
        lease_kv = await ensure_kv(js, alarms_lease_kv(config.lease_ttl_s))
        self.mirror = KvMirror(js, kv, ALARMS_KV.bucket, self._parse)
        await self.mirror.start()
        lease_bucket = alarms_lease_kv(config.lease_ttl_s).bucket
        self.presence = Presence(js, lease_kv, lease_bucket, config.replica_id)
        for index in range(config.partitions):
            key = LEASE_KEY if config.partitions == 1 else f"{LEASE_KEY}-p{index}"
            lease = LeaderLease(lease_kv, config.replica_id, config.lease_ttl_s, key=key)
            self.terms[index] = _Term(Partition(index, config.partitions), lease)
        self.requests = AlarmRequests(
            self.bus,
            self.mirror,
            self.config,
            counters=self.counters,
            led=lambda: self.led,
        )
        await self._serve()
        self.started.set()
        self._log.info("alarms_started", records=len(self.mirror), partitions=config.partitions)

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
        assert self.mirror is not None
        last_check = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                await self._tick_leases()
                for term in self.terms.values():
                    await self._lead_or_follow(term)
                if loop.time() - last_check >= MIRROR_CHECK_S and self.bus.nc.is_connected:
                    last_check = loop.time()
                    with contextlib.suppress(Exception):  # retried at the next check
                        await self.mirror.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.lease_renew_s)
        finally:
            await self.close()

    async def _tick_leases(self) -> None:
        """Renew the leases held, give up those beyond this replica's fair share, and try for
        free ones while under it (`plan_leases`)."""
        assert self.presence is not None
        partitioned = len(self.terms) > 1
        if partitioned:  # one partition: every replica's share is 1, whoever else lives
            with contextlib.suppress(Exception):  # NATS unreachable: the last count stands
                await self.presence.announce()
                self._alive = await self.presence.alive()
        self._lease_ticks += 1
        if self._lease_ticks == 1 and partitioned:
            return  # counted by replicas starting at the same time before anyone takes a share
        held = frozenset(self.led)
        plan = plan_leases(len(self.terms), held, self._alive, self.config.replica_id)
        for index in plan.release:
            self._log.info("partition_handed_over", partition=index, share=plan.share)
            term = self.terms[index]
            await self._stop_processing(term, flush=True)
            await term.lease.release()
        leading = len(held) - len(plan.release)
        for index in held - set(plan.release):
            await self.terms[index].lease.tick()
        for index in plan.candidates:
            if leading >= plan.share:
                break
            if await self.terms[index].lease.tick():
                leading += 1

    async def _lead_or_follow(self, term: _Term) -> None:
        leading = term.lease.is_leader and self.bus.nc.is_connected
        task = term.task
        if task is not None and task.done():
            term.task = None
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                self._log.error(
                    "alarm_processing_failed", error=repr(failure), partition=term.partition.index
                )
            task = None
        if leading and task is None:
            term.halt = asyncio.Event()
            term.task = asyncio.create_task(self._process(term, term.halt))
        elif not leading and task is not None:
            self._log.warning("alarm_processing_handed_over", partition=term.partition.index)
            await self._stop_processing(term, flush=False)

    async def _process(self, term: _Term, halt: asyncio.Event) -> None:
        assert self.mirror is not None
        lease = term.lease
        processor = AlarmProcessor(
            self.bus,
            self.mirror,
            self.config,
            may_write=lambda: lease.is_leader,
            partition=term.partition,
        )
        term.processor = processor
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
            term.processor = None
            if not flush:
                await asyncio.sleep(RESTART_PAUSE_S)

    async def _stop_processing(self, term: _Term, *, flush: bool) -> None:
        task, term.task = term.task, None
        if task is None:
            return
        if not flush and term.processor is not None:
            term.processor.stop_writing()
        term.halt.set()
        with contextlib.suppress(Exception):
            await task

    async def close(self) -> None:
        """Finish requests, store what was processed, hand the leases over, stop watching."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        for term in self.terms.values():
            await self._stop_processing(term, flush=True)
        if not self.bus.nc.is_closed:
            for term in self.terms.values():
                await term.lease.release()
            if self.presence is not None and len(self.terms) > 1:
                await self.presence.withdraw()
        if self.mirror is not None:
            await self.mirror.stop()
        self._log.info("alarms_stopped", **self.counters())


async def ensure_partitioned(js: JetStreamContext, partitions: int) -> None:
    """Declare the sites' alarm stream partitioned `partitions` ways (by site). Only an empty,
    unpartitioned stream takes a partitioning; after that the count is fixed. Stored subjects
    carry the partition they were stored with, and every replica's filters rely on it: a
    replica configured otherwise must not change it under the others."""
    spec = uplink_stream("alarm")
    if partitions > 1:
        spec = dataclasses.replace(spec, subject_transform=partition_transform("alarm", partitions))
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        await ensure_stream(js, spec)
        return
    current = transform_partitions("alarm", stream_transform(info))
    if current != partitions and (current > 1 or info.state.messages):
        raise PartitioningMismatch(
            f"{spec.name} is partitioned {current} way(s) (it holds {info.state.messages} "
            f"messages); this replica is configured for {partitions}: every alarms replica "
            f"must use the stream's count (--partitions {current})"
        )
    await ensure_stream(js, spec)


class PartitioningMismatch(RuntimeError):
    """The configured partition count is not the alarm stream's, and the stream holds messages."""
