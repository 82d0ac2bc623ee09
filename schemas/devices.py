"""Device events: what a sensor published over MQTT, turned into a versioned event at ingest.

The event id is assigned once, at the site's ingest; it is the idempotency key to the center.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from schemas.catalog import event
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
