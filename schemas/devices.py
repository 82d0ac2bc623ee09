"""Device events: what a sensor published over MQTT, turned into a versioned event at ingest.

The event id is assigned once, at the site's ingest; it is the idempotency key to the center.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.catalog import config_kind, event
from schemas.envelope import EventData

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


@event("edgebus.device.reading", version=1)
class DeviceReading(EventData):
    """One JSON object a device published on `dev/<site>/<device>/<channel>`."""

    site: str = Field(pattern=ID_PATTERN)
    device: str = Field(pattern=ID_PATTERN)
    channel: str = Field(pattern=ID_PATTERN)
    # Any, not JsonValue: payloads come from parsed JSON, and JsonValue costs ~20% of decode.
    payload: dict[str, Any]
    device_time: datetime | None = None


@config_kind("ingest")
class IngestConfig(BaseModel):
    """Device-ingest limits a site applies (config kind `ingest`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_payload_bytes: int = Field(
        default=64 * 1024, ge=64, le=1024 * 1024, description="larger payloads are dead-lettered"
    )
    message_id_field: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "payload field a device sets uniquely per message (a UUID, or boot id + counter):"
            " a message re-sent with the same value (QoS 1 after a lost PUBACK) is dropped as"
            " a duplicate, at the site and at the center (6 h), instead of becoming a second"
            " reading; a value reused within 6 h would drop a fresh reading"
        ),
    )
