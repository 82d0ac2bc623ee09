"""Typed errors for decoding events: every way an input can be wrong has its own class.

Consumers dead-letter on these with `reason` as the machine-readable cause; nothing else escapes.
"""

from __future__ import annotations


class EventDecodeError(Exception):
    """Base: raw bytes could not become a typed event. `reason` is a stable code."""

    reason = "invalid"

    def __init__(
        self, message: str, *, event_type: str | None = None, event_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.event_type = event_type
        self.event_id = event_id


class PayloadTooLarge(EventDecodeError):
    reason = "oversize"


class MalformedEvent(EventDecodeError):
    """Not JSON, or not a JSON object."""

    reason = "malformed"


class InvalidEnvelope(EventDecodeError):
    """JSON, but not a CloudEvents envelope we accept (missing or bad attributes)."""

    reason = "envelope"


class UnknownEventType(EventDecodeError):
    reason = "unknown_type"


class UnsupportedVersion(EventDecodeError):
    """A version newer than the reader knows, or one with no upcast path."""

    reason = "unsupported_version"


class SchemaViolation(EventDecodeError):
    """The data does not validate against the model of its type and version."""

    reason = "schema"


class UnexpectedEventType(EventDecodeError):
    """A valid event, but not the type this consumer reads."""

    reason = "unexpected_type"
