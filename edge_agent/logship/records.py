"""Turning one structlog record (a dict of anything) into a bounded `LogRecord`.

Pure functions: values become JSON, long ones are cut, fields that do not fit are counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from pydantic import JsonValue

from schemas.logs import (
    MAX_EXCEPTION_CHARS,
    MAX_FIELDS,
    MAX_FIELDS_BYTES,
    MAX_MESSAGE_CHARS,
    LogLevel,
    LogRecord,
)

MAX_VALUE_CHARS = 512
MAX_ITEMS = 16  # per nested list or mapping
MAX_DEPTH = 3
ID_CHARS = 128
OMITTED_KEY = "_omitted"  # how many fields did not fit
# Keys that have a place of their own in a LogRecord (or none: `level` is in the subject).
_OWN_KEYS = frozenset(
    {"event", "level", "timestamp", "component", "site", "exception"}
    | {"device", "event_id", "correlation_id"}
)
# Room kept for `"_omitted":N` so adding it never breaks the bound.
_OMITTED_ROOM = 32


def known_level(level: str) -> LogLevel:
    try:
        return LogLevel(level)
    except ValueError:  # not one of ours: treat it as the most severe, never lose sight of it
        return LogLevel.CRITICAL


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_safe(value: Any, depth: int = 0) -> JsonValue:
    """`value` as plain JSON: strings cut, containers bounded, anything else as its repr."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return cut(value, MAX_VALUE_CHARS)
    if depth < MAX_DEPTH:
        if isinstance(value, Mapping):
            items = islice(value.items(), MAX_ITEMS)
            return {cut(str(k), 64): json_safe(v, depth + 1) for k, v in items}
        if isinstance(value, list | tuple | set | frozenset):
            return [json_safe(v, depth + 1) for v in islice(value, MAX_ITEMS)]
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not cost the whole record
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    return cut(text, MAX_VALUE_CHARS)


def _pair_size(key: str, value: JsonValue) -> int:
    """Bytes `"key":value,` adds to the compact JSON object."""
    encoded = json.dumps({key: value}, separators=(",", ":"), ensure_ascii=False).encode()
    return len(encoded) - 1  # minus the braces, plus the comma


def bounded_fields(record: Mapping[str, Any]) -> dict[str, JsonValue]:
    """Every field not stored elsewhere, in order, while they fit `MAX_FIELDS(_BYTES)`."""
    fields: dict[str, JsonValue] = {}
    size = 2 + _OMITTED_ROOM
    omitted = 0
    for key, value in record.items():
        if key in _OWN_KEYS:
            continue
        name = cut(str(key), 64)
        safe = json_safe(value)
        pair = _pair_size(name, safe)
        if len(fields) >= MAX_FIELDS - 1 or size + pair > MAX_FIELDS_BYTES:
            omitted += 1
            continue
        fields[name] = safe
        size += pair
    if omitted:
        fields[OMITTED_KEY] = omitted
    return fields


def record_timestamp(value: Any, now: datetime) -> datetime:
    """The record's own time (structlog writes ISO 8601 UTC); `now` if it has none."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return now
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return now


def _optional_id(value: Any) -> str | None:
    return None if value is None else cut(str(value), ID_CHARS)


def to_log_record(site: str, level: str, record: Mapping[str, Any], now: datetime) -> LogRecord:
    """The `LogRecord` for one structlog record logged at `level` by this site's agent."""
    exception = record.get("exception")
    return LogRecord(
        site=site,
        level=known_level(level),
        logger=cut(str(record.get("component") or "-"), 128),
        message=cut(str(record.get("event", "")), MAX_MESSAGE_CHARS),
        timestamp=record_timestamp(record.get("timestamp"), now),
        fields=bounded_fields(record),
        device=_optional_id(record.get("device")),
        event_id=_optional_id(record.get("event_id")),
        correlation_id=_optional_id(record.get("correlation_id")),
        # The end of a traceback says most: keep that.
        exception=None if exception is None else str(exception)[-MAX_EXCEPTION_CHARS:],
    )


def drops_record(
    site: str, dropped: int, level: LogLevel, first: datetime, now: datetime
) -> LogRecord:
    """The summary shipped in place of records the full queue could not take."""
    return LogRecord(
        site=site,
        level=level,
        logger="edge_agent.logship",
        message=f"{dropped} records dropped",
        timestamp=now,
        fields={
            "dropped": dropped,
            "first_dropped_at": first.isoformat(),
            "detail": "the log shipping queue was full; the records were printed locally",
        },
    )
