"""Alarm changes coming in: decode a stored raise or clear (any version), and check that it
comes from where it claims (the subject names the site; the alarm id must be its own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Final, Literal, NotRequired, cast

from pydantic import AwareDatetime, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic refuses `typing.TypedDict` before 3.12

from bus import subjects
from schemas import REGISTRY, Event, EventRegistry
from schemas.alarms import ALARM_TOKEN, AlarmCleared, AlarmRaised, Severity, alarm_id
from schemas.errors import UnexpectedEventType

AlarmChange = Event[AlarmRaised] | Event[AlarmCleared]
# `AlarmRaised.event_type` and `AlarmCleared.event_type` as literals, for type narrowing.
RAISED: Final = "edgebus.alarm.raised"
CLEARED: Final = "edgebus.alarm.cleared"

# Unescaped quotes cannot occur inside a JSON string value, so this byte pattern only
# matches the envelope's own `type` attribute: a cheap hint of which decoder to try first.
_CLEARED_HINT = b'"type":"edgebus.alarm.cleared"'


class TaggedRaised(Event[AlarmRaised]):
    """`Event[AlarmRaised]` of the raise's type and current version: one side of `_TAGGED`."""

    type: Literal[AlarmRaised.event_type]  # type: ignore[valid-type]
    dataschema: Literal[AlarmRaised.event_schema_uri]  # type: ignore[valid-type]


class TaggedCleared(Event[AlarmCleared]):
    """`Event[AlarmCleared]` of the clear's type and current version: the other side."""

    type: Literal[AlarmCleared.event_type]  # type: ignore[valid-type]
    dataschema: Literal[AlarmCleared.event_schema_uri]  # type: ignore[valid-type]


# One validator for both kinds, picking the side by `type` inside pydantic-core: about 0.2 µs
# less a change than the hint and a registry decoder per kind (3.1 against 3.3 µs, medians of
# interleaved offline runs over the storm's events).
_TAGGED = TypeAdapter(
    Annotated[TaggedRaised | TaggedCleared, Field(discriminator="type")]
).validate_json


# -- the leader's hot path: the same events validated into dicts -------------------------
#
# Decoding is the largest part of a change in the alarm storm's leader. The same validation
# into TypedDicts instead of models took 2.7-3.2 against 4.3-4.9 µs an event (offline, the
# storm's events, collector off): no model instances, no field sets. These mirror the models
# field for field, constraint for constraint (tests/test_alarm_state.py holds them to the
# models); a default of the model is a `NotRequired` key here.


@with_config(ConfigDict(extra="forbid"))
class RaisedFields(TypedDict):
    """`AlarmRaised`'s fields."""

    alarm_id: Annotated[str, Field(pattern=ALARM_TOKEN)]
    site: str
    entity: Annotated[str, Field(pattern=ALARM_TOKEN)]
    severity: Severity
    probable_cause: Annotated[str, Field(pattern=ALARM_TOKEN)]
    text: Annotated[str, Field(max_length=2000)]
    raised_at: datetime


@with_config(ConfigDict(extra="forbid"))
class ClearedFields(TypedDict):
    """`AlarmCleared`'s fields (`text` may be absent: the model's default is "")."""

    alarm_id: Annotated[str, Field(pattern=ALARM_TOKEN)]
    site: str
    entity: Annotated[str, Field(pattern=ALARM_TOKEN)]
    probable_cause: Annotated[str, Field(pattern=ALARM_TOKEN)]
    text: NotRequired[Annotated[str, Field(max_length=2000)]]
    cleared_at: datetime


# CloudEvents extension attributes are accepted, unconstrained, as `Event` accepts them, but
# not kept: the leader reads none, and copying them into each dict cost about 10% of a
# decode (3.2-3.4 against 3.5-4.3 µs an event offline, the storm's events).
@with_config(ConfigDict(extra="ignore"))
class _Envelope(TypedDict):
    """`Event`'s attributes other than `type`, `dataschema` and `data`."""

    specversion: NotRequired[Literal["1.0"]]
    id: Annotated[str, Field(min_length=1, max_length=128)]
    source: Annotated[str, Field(min_length=1, max_length=512)]
    time: AwareDatetime
    subject: NotRequired[Annotated[str | None, Field(min_length=1, max_length=512)]]
    datacontenttype: NotRequired[Literal["application/json"]]
    correlationid: NotRequired[Annotated[str | None, Field(max_length=128)]]


class RaisedEvent(_Envelope):
    """`Event[AlarmRaised]` of the current version."""

    type: Literal["edgebus.alarm.raised"]
    dataschema: Literal["urn:edgebus:edgebus.alarm.raised:v1"]
    data: RaisedFields


class ClearedEvent(_Envelope):
    """`Event[AlarmCleared]` of the current version."""

    type: Literal["edgebus.alarm.cleared"]
    dataschema: Literal["urn:edgebus:edgebus.alarm.cleared:v1"]
    data: ClearedFields


ChangeFields = RaisedEvent | ClearedEvent
_EVENT_KEYS = frozenset(RaisedEvent.__annotations__) | frozenset(_Envelope.__annotations__)
# pydantic-core's validator itself: `TypeAdapter.validate_json` adds a Python call with
# keyword handling around it (3.3-3.6 against 3.6-3.8 µs an event, offline, the storm's).
_TAGGED_FIELDS: Callable[[bytes], ChangeFields] = TypeAdapter(
    Annotated[RaisedEvent | ClearedEvent, Field(discriminator="type")]
).validator.validate_json


class ChangeDecoder:
    """Decode a raise or a clear; `EventDecodeError` (with its reason) for anything else.

    The current version of either kind takes one tagged validation; anything else (an older
    version, another type, an invalid event) goes through the registry, which upcasts it or
    says precisely what is wrong. `fields` gives the same event as plain dicts."""

    def __init__(self, registry: EventRegistry = REGISTRY) -> None:
        self._raised = registry.decoder_for(AlarmRaised)
        self._cleared = registry.decoder_for(AlarmCleared)
        self._max_bytes = registry.max_event_bytes

    def __call__(self, raw: bytes) -> AlarmChange:
        if len(raw) <= self._max_bytes:
            try:
                return _TAGGED(raw)
            except ValidationError:
                pass
        return self._by_registry(raw)

    def fields(self, raw: bytes) -> ChangeFields:
        """The event as `RaisedEvent` or `ClearedEvent`: one validation for the current
        version; anything else as `__call__` takes it (upcast, or refused with its reason)."""
        if len(raw) <= self._max_bytes:
            try:
                return _TAGGED_FIELDS(raw)
            except ValidationError:
                pass
        event = self._by_registry(raw)
        fields = event.model_dump(exclude_none=True)
        return cast(ChangeFields, {k: v for k, v in fields.items() if k in _EVENT_KEYS})

    def _by_registry(self, raw: bytes) -> AlarmChange:
        if _CLEARED_HINT in raw:
            try:
                return self._cleared(raw)
            except UnexpectedEventType:
                return self._raised(raw)
        try:
            return self._raised(raw)
        except UnexpectedEventType:
            return self._cleared(raw)


@functools.lru_cache(maxsize=65_536)  # per stored change; a site's alarm subjects repeat
def site_of(subject: str) -> str | None:
    """The site a stored alarm change is about, from its subject (`up.<site>.alarm...` from
    the site itself, `center.alarm.<site>` from a center service, `center.alarms.ack.<site>`)."""
    if subject.startswith("up."):
        parsed = subjects.parse_up(subject)
        return parsed[0] if parsed is not None and parsed[1] == "alarm" else None
    parts = subject.split(".")
    if len(parts) == 3 and parts[:2] == ["center", "alarm"]:
        return parts[2]
    if len(parts) == 4 and parts[:2] == ["center", "alarms"]:
        return parts[3]
    return None


def origin_problem(
    subject_site: str | None, data: RaisedFields | ClearedFields
) -> tuple[str, str] | None:
    """(reason, detail) if the change must not be believed; None if it is consistent."""
    if subject_site is None:
        return "bad_subject", "not an alarm subject of a site"
    site = data["site"]
    if site != subject_site:
        return "site_mismatch", f"alarm of site {site!r} sent as {subject_site!r}"
    expected = alarm_id(site, data["entity"], data["probable_cause"])
    if data["alarm_id"] != expected:
        return "alarm_id_mismatch", f"alarm id {data['alarm_id']!r} is not {expected!r}"
    return None
