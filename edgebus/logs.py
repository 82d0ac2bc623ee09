"""Reading the sites' log records the center holds (stream `UP_LOG`), and how they print.

Filters and times are plain functions. `read_logs` uses an ephemeral pull consumer that it
deletes when done (the server also drops it by itself if this process dies first).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich.markup import escape
from rich.table import Table

from bus import subjects
from bus.streams import uplink_stream
from schemas import REGISTRY, EventDecodeError
from schemas.logs import LEVELS, LogLevel, LogRecord, levels_at_or_above

LOG_STREAM = uplink_stream("log").name
# Site clocks may run ahead of the center's: read the stream from a bit before `since`, then
# keep records by their own time, so a record logged after `since` is never missed.
CLOCK_SKEW_S = 300.0
FETCH_BATCH = 256
FETCH_WAIT_S = 2.0
CONSUMER_INACTIVE_S = 30.0  # the server deletes the consumer if we vanish without doing so

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class LogsCommandError(ValueError):
    """Bad command-line input (a level, a time)."""


def parse_level(text: str) -> LogLevel:
    try:
        return LogLevel(text.lower())
    except ValueError:
        known = ", ".join(LEVELS)
        raise LogsCommandError(f"not a level: {text!r} (one of {known})") from None


def parse_since(text: str, now: datetime) -> datetime:
    """`90s`, `10m`, `1h`, `2d`, `1w` before `now`, or an ISO 8601 time (UTC if no offset)."""
    match = _DURATION.match(text)
    if match is not None:
        return now - timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise LogsCommandError(
            f"not a time: {text!r} (examples: 10m, 1h, 2d, 2024-05-01T08:00:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def level_filters(site: str | None, level: str) -> list[str]:
    """Subject filters for records of `site` (None: every site) at `level` and above."""
    wanted = levels_at_or_above(parse_level(level))
    site_token = "*" if site is None else site
    if len(wanted) == len(LEVELS):
        return [subjects.up_logs(site_token)]
    return [subjects.up_logs(site_token, lvl.value) for lvl in wanted]


@dataclass(frozen=True)
class LogQuery:
    since: datetime  # records logged at or after this (their own time)
    site: str | None = None
    level: str = LogLevel.DEBUG.value  # this level and above

    def filters(self) -> list[str]:
        return level_filters(self.site, self.level)


@dataclass(frozen=True)
class ShippedLog:
    """One record as the center holds it."""

    record: LogRecord
    id: str  # the event id (idempotency key end to end)
    subject: str
    seq: int  # in UP_LOG
    stored_at: datetime | None  # when the center stored it


@dataclass(frozen=True)
class Unreadable:
    subject: str
    seq: int
    error: str


@dataclass(frozen=True)
class CaughtUp:
    """Everything stored when reading began has been read (follow mode goes on after it)."""


Item = ShippedLog | Unreadable | CaughtUp


def consumer_config(query: LogQuery) -> ConsumerConfig:
    filters = query.filters()
    return ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=query.since - timedelta(seconds=CLOCK_SKEW_S),
        ack_policy=AckPolicy.NONE,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        inactive_threshold=CONSUMER_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
    )


def decode(msg: Msg) -> ShippedLog | Unreadable:
    seq = msg.metadata.sequence.stream
    try:
        event = REGISTRY.decode_as(msg.data, LogRecord)
    except EventDecodeError as exc:
        return Unreadable(msg.subject, seq, str(exc))
    return ShippedLog(event.data, event.id, msg.subject, seq, msg.metadata.timestamp)


async def read_logs(
    js: JetStreamContext, query: LogQuery, *, follow: bool = False
) -> AsyncIterator[Item]:
    """Records matching `query`, in stream order (each site's in the order it logged them).

    Ends after `CaughtUp` unless `follow`; then it goes on until cancelled.
    """
    info = await js.add_consumer(LOG_STREAM, config=consumer_config(query))
    sub: JetStreamContext.PullSubscription | None = None
    try:
        sub = await js.pull_subscribe_bind(consumer=info.name, stream=LOG_STREAM)
        remaining = info.num_pending
        caught_up = False
        while True:
            if remaining == 0 and not caught_up:
                caught_up = True
                yield CaughtUp()
                if not follow:
                    return
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT_S)
            except NatsTimeoutError:
                remaining = 0  # nothing (more) arrived: what we read is all there is
                continue
            for msg in msgs:
                remaining = msg.metadata.num_pending
                item = decode(msg)
                if isinstance(item, Unreadable) or item.record.timestamp >= query.since:
                    yield item
    finally:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(LOG_STREAM, info.name)


# -- rendering ------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_json(item: ShippedLog) -> dict[str, Any]:
    """One JSON line: the record with its own time, plus where the center keeps it."""
    record = item.record
    document: dict[str, Any] = {
        "time": iso(record.timestamp),
        "site": record.site,
        "level": record.level.value,
        "logger": record.logger,
        "message": record.message,
        "fields": record.fields,
    }
    for key in ("device", "event_id", "correlation_id", "exception"):
        value = getattr(record, key)
        if value is not None:
            document[key] = value
    document["id"] = item.id
    document["seq"] = item.seq
    if item.stored_at is not None:
        document["stored_at"] = iso(item.stored_at)
    return document


_LEVEL_STYLE = {
    LogLevel.DEBUG: "dim",
    LogLevel.INFO: "",
    LogLevel.WARNING: "yellow",
    LogLevel.ERROR: "red",
    LogLevel.CRITICAL: "bold red",
}


def fields_text(record: LogRecord, limit: int = 120) -> str:
    parts = [f"{k}={v}" for k, v in record.fields.items()]
    for key in ("device", "event_id", "correlation_id"):
        value = getattr(record, key)
        if value is not None:
            parts.insert(0, f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def styled_level(level: LogLevel) -> str:
    style = _LEVEL_STYLE[level]
    return f"[{style}]{level.value}[/{style}]" if style else level.value


def log_line(item: ShippedLog) -> str:
    """One record as one line of rich markup (follow mode)."""
    record = item.record
    return (
        f"{iso(record.timestamp)} {escape(record.site)} {styled_level(record.level)} "
        f"{escape(record.logger)}: {escape(record.message)} {escape(fields_text(record))}"
    )


def logs_table(items: Iterable[ShippedLog], title: str) -> Table:
    table = Table(title=title)
    for column in ("time", "site", "level", "logger", "message", "fields"):
        table.add_column(column, no_wrap=column in ("time", "site", "level"))
    for item in items:
        record = item.record
        table.add_row(
            iso(record.timestamp),
            escape(record.site),
            styled_level(record.level),
            escape(record.logger),
            escape(record.message),
            escape(fields_text(record)),
        )
    return table
