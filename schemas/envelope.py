"""The CloudEvents 1.0 envelope every edgebus event travels in, and the base of all payloads.

Versions live in `dataschema` (urn:edgebus:<type>:v<N>) so `type` stays stable for filters.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.ids import new_event_id

SPEC_VERSION = "1.0"
JSON_CONTENT_TYPE = "application/json"

_SCHEMA_URI = re.compile(r"^urn:edgebus:(?P<type>[A-Za-z0-9._-]+):v(?P<version>[1-9][0-9]*)$")


def schema_uri(event_type: str, version: int) -> str:
    """The `dataschema` value naming one version of one event type."""
    return f"urn:edgebus:{event_type}:v{version}"


def parse_schema_uri(uri: str) -> tuple[str, int] | None:
    """(type, version) from a `dataschema` value, or None if it is not one of ours."""
    match = _SCHEMA_URI.fullmatch(uri)  # not .match: "$" would accept a trailing newline
    if match is None:
        return None
    return match["type"], int(match["version"])


def utc_now() -> datetime:
    return datetime.now(UTC)


class EventData(BaseModel):
    """Base of every event payload. Registration sets the type and version it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str] = ""
    event_version: ClassVar[int] = 0
    # Set at registration: the concrete `Event[ThisModel]` class (cached; parametrizing is slow).
    envelope_model: ClassVar[type[Event[Any]] | None] = None
    # Set at registration: `schema_uri(event_type, event_version)`, built once, not per event.
    event_schema_uri: ClassVar[str] = ""


DataT = TypeVar("DataT", bound=EventData)


def _is_none(value: object) -> bool:
    return value is None


class Event(BaseModel, Generic[DataT]):
    """A CloudEvents 1.0 event in structured JSON mode, with typed `data`.

    Optional attributes that are unset are left out of the JSON (CloudEvents has no nulls).
    Unknown extension attributes are kept, so events from other producers round-trip.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=512)
    type: str = Field(min_length=1, max_length=256)
    time: AwareDatetime  # RFC 3339 requires an offset; the CloudEvents SDK rejects naive times
    subject: str | None = Field(default=None, min_length=1, max_length=512, exclude_if=_is_none)
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str = Field(min_length=1, max_length=512)
    correlationid: str | None = Field(default=None, max_length=128, exclude_if=_is_none)
    data: DataT

    @property
    def version(self) -> int:
        parsed = parse_schema_uri(self.dataschema)
        return parsed[1] if parsed else 0


class RawEvent(Event[Any]):
    """An envelope whose data is still plain JSON: the first step of decoding any version."""

    data: Any = None


def new_event(
    data: DataT,
    *,
    source: str,
    subject: str | None = None,
    correlation_id: str | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
) -> Event[DataT]:
    """Wrap a registered payload in a fresh envelope (new time-ordered id unless given).

    Uses the envelope class cached at registration: parametrizing `Event[Model]` on every
    call costs more than the validation itself. The attributes are validated exactly as
    `envelope(**attributes)` would, by calling its validator directly (no `__init__` detour).
    """
    model = type(data)
    envelope = model.envelope_model
    if envelope is None:
        raise TypeError(f"{model.__name__} is not a registered event payload")
    attributes: dict[str, Any] = {
        "id": event_id or new_event_id(),
        "source": source,
        "type": model.event_type,
        "time": time or utc_now(),
        "dataschema": model.event_schema_uri or schema_uri(model.event_type, model.event_version),
        "data": data,
    }
    if subject is not None:
        attributes["subject"] = subject
    if correlation_id is not None:
        attributes["correlationid"] = correlation_id
    event: Event[DataT] = envelope.__pydantic_validator__.validate_python(attributes)
    return event
