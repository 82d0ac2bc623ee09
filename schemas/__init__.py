"""Versioned edgebus events: the CloudEvents envelope, the registry, and every payload model.

Importing this package registers all event types in `REGISTRY`.
"""

from schemas import alarms, common, controller, devices, logs, site, sync
from schemas.catalog import REGISTRY
from schemas.envelope import Event, EventData, new_event, parse_schema_uri, schema_uri
from schemas.errors import (
    EventDecodeError,
    InvalidEnvelope,
    MalformedEvent,
    PayloadTooLarge,
    SchemaViolation,
    UnexpectedEventType,
    UnknownEventType,
    UnsupportedVersion,
)
from schemas.ids import new_event_id
from schemas.registry import EventRegistry, EventSpec

__all__ = [
    "REGISTRY",
    "Event",
    "EventData",
    "EventDecodeError",
    "EventRegistry",
    "EventSpec",
    "InvalidEnvelope",
    "MalformedEvent",
    "PayloadTooLarge",
    "SchemaViolation",
    "UnexpectedEventType",
    "UnknownEventType",
    "UnsupportedVersion",
    "alarms",
    "common",
    "controller",
    "devices",
    "logs",
    "new_event",
    "new_event_id",
    "parse_schema_uri",
    "schema_uri",
    "site",
    "sync",
]
