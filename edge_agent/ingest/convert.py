"""Turn one raw device message into a `DeviceReading`, or say exactly why it cannot be one.

Pure functions over bytes and strings: no I/O, tested without any server.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from bus import subjects
from schemas.devices import DeviceReading

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
DEVICE_TIME_KEYS = ("ts", "time", "timestamp")
_EPOCH_MS_THRESHOLD = 100_000_000_000  # numbers above this are milliseconds, not seconds


@dataclass(frozen=True)
class IngestLimits:
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    message_id_field: str | None = None  # see `device_message_key`


@dataclass(frozen=True)
class Rejection:
    """Why a device message was not ingested; `reason` is the dead-letter reason code."""

    reason: str
    detail: str


def reading_from_device_message(
    site: str, subject: str, payload: bytes, limits: IngestLimits = IngestLimits()
) -> DeviceReading | Rejection:
    """The reading a device published on `dev.<site>.<device>.<channel>`, or a Rejection."""
    address = subjects.parse_device_raw(subject)
    if address is None:
        return Rejection("topic", f"not dev/<site>/<device>/<channel>: {subject}")
    topic_site, device, channel = address
    if topic_site != site:
        return Rejection("foreign_site", f"topic is for site {topic_site!r}, this is {site!r}")
    if len(payload) > limits.max_payload_bytes:
        return Rejection(
            "oversize", f"{len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    try:
        body: Any = from_json(payload)
    except ValueError as exc:
        return Rejection("malformed", f"not JSON: {exc}")
    if not isinstance(body, dict):
        return Rejection("shape", f"payload must be a JSON object, got {type(body).__name__}")
    device_time = device_time_of(body)
    if isinstance(device_time, Rejection):
        return device_time
    try:
        return DeviceReading(
            site=site, device=device, channel=channel, payload=body, device_time=device_time
        )
    except ValidationError as exc:
        return Rejection("schema", str(exc.errors(include_url=False)[0]["msg"]))


def device_time_of(body: dict[str, Any]) -> datetime | Rejection | None:
    """The device's own timestamp if it sent one: ISO 8601, or epoch seconds/milliseconds."""
    for key in DEVICE_TIME_KEYS:
        if key in body:
            return _parse_device_time(key, body[key])
    return None


def _parse_device_time(key: str, value: Any) -> datetime | Rejection:
    try:
        if isinstance(value, bool):
            raise ValueError("a boolean is not a time")
        if isinstance(value, int | float):
            seconds = value / 1000 if value > _EPOCH_MS_THRESHOLD else value
            return datetime.fromtimestamp(seconds, UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        raise ValueError(f"unsupported type {type(value).__name__}")
    except (ValueError, OverflowError, OSError) as exc:
        return Rejection("device_time", f"bad device timestamp in {key!r}: {exc}")


def device_message_key(reading: DeviceReading, field: str | None) -> str | None:
    """The replay log's dedup key of a device's own message id (`field` in its payload), or
    None (no field configured, absent, or not a string / integer): a re-sent message then
    dedups against the first one instead of becoming a second reading.

    Scoped to (site, device, channel), so per-channel counters are safe and the key is
    unique at the center too; hashed, so any id is a valid `Nats-Msg-Id`.
    """
    if field is None:
        return None
    value = reading.payload.get(field)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    identity = json.dumps([reading.site, reading.device, reading.channel, value]).encode()
    return f"dev-{hashlib.blake2b(identity, digest_size=16).hexdigest()}"
