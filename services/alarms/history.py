"""Alarm history, read back from where it is stored: raises and clears in UP_ALARM (sites) and
CENTER_ALARMS (center services), acknowledgements and storm summaries in ALARM_ACTIVITY.

Filtered by site (subject), time (stream start time, then each entry's own time) and severity.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus import subjects
from bus.log import get_logger
from bus.pullfeed import PullFeed
from bus.streams import alarm_activity_stream, center_alarm_stream, uplink_stream
from schemas import REGISTRY
from schemas.alarms import (
    AlarmAcknowledged,
    AlarmCleared,
    AlarmHistory,
    AlarmHistoryEntry,
    AlarmHistoryQuery,
    AlarmNotice,
    AlarmRaised,
    AlarmRecord,
    HistoryKind,
)
from schemas.errors import EventDecodeError
from services.alarms.inputs import ChangeDecoder

# Sites' clocks may run ahead of the center's: start reading a little before `since`.
CLOCK_SKEW_S = 300.0
_BATCH = 500
_IDLE_S = 2.0

Lookup = Callable[[str], AlarmRecord | None]


@dataclass(frozen=True)
class Source:
    stream: str
    filters: tuple[str, ...]


def sources(site: str | None) -> list[Source]:
    """Where the history of one site (None: every site) is stored."""
    s = site or "*"
    up = (f"up.{s}.alarm", f"up.{s}.alarm.>")
    center = (f"center.alarm.{s}",)
    return [
        Source(uplink_stream("alarm").name, up),
        Source(center_alarm_stream().name, center),
        Source(alarm_activity_stream().name, (subjects.alarm_history_of(s),)),
    ]


class _Entries:
    """Raw stored events -> history entries (severity of a clear or an ack from the record)."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._changes = ChangeDecoder()
        self._acks = REGISTRY.decoder_for(AlarmAcknowledged)
        self._notices = REGISTRY.decoder_for(AlarmNotice)

    def entry(self, msg: Msg) -> AlarmHistoryEntry | None:
        received = _received_at(msg)
        try:
            if msg.subject.startswith("center.alarms.ack."):
                ack = self._acks(msg.data)
                record = self._lookup(ack.data.alarm_id)
                return AlarmHistoryEntry(
                    at=ack.data.at,
                    kind=HistoryKind.ACKNOWLEDGED,
                    site=ack.data.site,
                    alarm_id=ack.data.alarm_id,
                    entity=record.entity if record else None,
                    probable_cause=record.probable_cause if record else None,
                    severity=record.severity if record else None,
                    text=ack.data.note,
                    by=ack.data.by,
                    event_id=ack.id,
                    received_at=received,
                )
            if msg.subject.startswith("center.alarms.activity."):
                notice = self._notices(msg.data)
                return AlarmHistoryEntry(
                    at=notice.data.at,
                    kind=HistoryKind(notice.data.kind.value),
                    site=notice.data.site,
                    alarm_id=notice.data.alarm_id,
                    severity=notice.data.severity,
                    text=notice.data.text,
                    event_id=notice.id,
                    received_at=received,
                )
            change = self._changes(msg.data)
        except (EventDecodeError, ValueError):
            return None  # dead-lettered by the service when it consumed it
        data = change.data
        if isinstance(data, AlarmRaised):
            return AlarmHistoryEntry(
                at=data.raised_at,
                kind=HistoryKind.RAISED,
                site=data.site,
                alarm_id=data.alarm_id,
                entity=data.entity,
                probable_cause=data.probable_cause,
                severity=data.severity,
                text=data.text,
                event_id=change.id,
                received_at=received,
            )
        assert isinstance(data, AlarmCleared)
        record = self._lookup(data.alarm_id)
        return AlarmHistoryEntry(
            at=data.cleared_at,
            kind=HistoryKind.CLEARED,
            site=data.site,
            alarm_id=data.alarm_id,
            entity=data.entity,
            probable_cause=data.probable_cause,
            severity=record.severity if record else None,
            text=data.text,
            event_id=change.id,
            received_at=received,
        )


def _received_at(msg: Msg) -> datetime | None:
    with contextlib.suppress(Exception):
        return msg.metadata.timestamp
    return None


async def scan(
    nc: NatsClient, js: JetStreamContext, source: Source, since: datetime, max_msgs: int
) -> AsyncIterator[Msg]:
    """Every message of `source` stored since `since`, in stream order, at most `max_msgs`.

    An ephemeral in-memory consumer, deleted afterwards (and by the server if we vanish).
    """
    config = ConsumerConfig(
        filter_subjects=list(source.filters),
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=since,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(source.stream, config=config)
    remaining = min(int(info.num_pending or 0), max_msgs)
    if remaining <= 0:
        with contextlib.suppress(Exception):
            await js.delete_consumer(source.stream, info.name)
        return
    feed = PullFeed(nc, source.stream, info.name, batch=min(_BATCH, remaining), expires_s=_IDLE_S)
    await feed.start()
    try:
        while remaining > 0:
            batch = await feed.next_batch(min(_BATCH, remaining), _IDLE_S)
            if not batch:
                return  # the stream aged out what the consumer counted as pending
            for msg in batch:
                yield msg
            remaining -= len(batch)
            await asyncio.sleep(0)
    finally:
        await feed.stop(nak_buffered=False)
        with contextlib.suppress(Exception):
            await js.delete_consumer(source.stream, info.name)


async def read_history(
    nc: NatsClient,
    js: JetStreamContext,
    query: AlarmHistoryQuery,
    lookup: Lookup,
    *,
    max_scan: int,
) -> AlarmHistory:
    """The entries matching `query`, oldest first (their own times), at most `query.limit`."""
    entries = _Entries(lookup)
    start = query.since - timedelta(seconds=CLOCK_SKEW_S)
    found: list[tuple[datetime, int, AlarmHistoryEntry]] = []
    scanned = 0
    capped = False
    log = get_logger("alarms.history")
    for source in sources(query.site):
        budget = max_scan - scanned
        if budget <= 0:
            capped = True
            break
        try:
            async for msg in scan(nc, js, source, start, budget):
                scanned += 1
                entry = entries.entry(msg)
                if entry is not None and _matches(entry, query):
                    found.append((entry.at, scanned, entry))
        except Exception as exc:  # e.g. a stream not declared yet: the others still answer
            log.warning("history_source_failed", stream=source.stream, error=repr(exc))
        if scanned >= max_scan:
            capped = True
    found.sort(key=lambda item: (item[0], item[1]))
    return AlarmHistory(
        entries=[entry for _, _, entry in found[: query.limit]],
        truncated=capped or len(found) > query.limit,
        scanned=scanned,
    )


def _matches(entry: AlarmHistoryEntry, query: AlarmHistoryQuery) -> bool:
    if entry.at < query.since or (query.until is not None and entry.at > query.until):
        return False
    if query.site is not None and entry.site != query.site:
        return False
    return query.severity is None or entry.severity is query.severity
