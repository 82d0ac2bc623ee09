"""Registry of event types and their versions: decode any version, upcast to the newest.

Decoding never raises anything but a subclass of `EventDecodeError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError

from schemas.envelope import Event, EventData, RawEvent, parse_schema_uri, schema_uri
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

D = TypeVar("D", bound=EventData)
M = TypeVar("M", bound=type[EventData])

JsonObject = dict[str, Any]
Upcaster = Callable[[JsonObject], JsonObject]

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EventSpec:
    """One version of one event type: its payload model and its concrete envelope model."""

    event_type: str
    version: int
    model: type[EventData]
    envelope: type[Event[Any]]

    @property
    def schema_uri(self) -> str:
        return schema_uri(self.event_type, self.version)


@dataclass
class EventRegistry:
    """Every known (type, version), plus the upcasters between consecutive versions."""

    _specs: dict[str, dict[int, EventSpec]] = field(default_factory=dict)
    _upcasters: dict[tuple[str, int], Upcaster] = field(default_factory=dict)
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES

    # -- registration -------------------------------------------------------------

    def register(self, model: type[EventData], event_type: str, version: int) -> None:
        if version < 1:
            raise ValueError("event versions start at 1")
        versions = self._specs.setdefault(event_type, {})
        if version in versions and versions[version].model is not model:
            raise ValueError(f"{event_type} v{version} is already registered")
        model.event_type = event_type
        model.event_version = version
        envelope = Event[model]  # type: ignore[valid-type]
        model.envelope_model = envelope
        model.event_schema_uri = schema_uri(event_type, version)
        versions[version] = EventSpec(event_type, version, model, envelope)

    def event(self, event_type: str, *, version: int) -> Callable[[M], M]:
        """Class decorator: `@registry.event("edgebus.x", version=2)`."""

        def decorate(model: M) -> M:
            self.register(model, event_type, version)
            return model

        return decorate

    def upcaster(self, event_type: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Function decorator for the step from `from_version` to `from_version + 1`."""

        def decorate(fn: Upcaster) -> Upcaster:
            self._upcasters[(event_type, from_version)] = fn
            return fn

        return decorate

    # -- lookup -------------------------------------------------------------------

    def specs(self) -> Iterator[EventSpec]:
        for versions in self._specs.values():
            yield from versions.values()

    def latest(self, event_type: str) -> EventSpec:
        versions = self._specs.get(event_type)
        if not versions:
            raise UnknownEventType(f"unknown event type {event_type!r}", event_type=event_type)
        return versions[max(versions)]

    def spec_for(self, model: type[EventData]) -> EventSpec:
        versions = self._specs.get(model.event_type, {})
        spec = versions.get(model.event_version)
        if spec is None or spec.model is not model:
            raise KeyError(f"{model.__name__} is not registered in this registry")
        return spec

    # -- encode / decode ----------------------------------------------------------

    @staticmethod
    def encode(event: Event[Any]) -> bytes:
        return event.__pydantic_serializer__.to_json(event)

    def decode(self, raw: bytes | str) -> Event[Any]:
        """Any registered event, upcast to the newest version of its type."""
        envelope = self._parse_envelope(raw)
        target = self.latest(envelope.type)
        return self._finish(envelope, target)

    def decode_as(self, raw: bytes | str, model: type[D]) -> Event[D]:
        """An event of `model`'s type, upcast to `model`'s version; fast when it already is."""
        return self.decoder_for(model)(raw)

    def decoder_for(self, model: type[D]) -> Callable[[bytes | str], Event[D]]:
        """A decode function bound to one model: the hot path of every typed subscriber."""
        spec = self.spec_for(model)
        # The validator itself: `model_validate_json` is a Python wrapper adding ~15% per call.
        validate = spec.envelope.__pydantic_validator__.validate_json
        expected_type, expected_schema = spec.event_type, spec.schema_uri
        max_bytes = self.max_event_bytes

        def decode(raw: bytes | str) -> Event[D]:
            if len(raw) <= max_bytes:
                try:
                    event: Event[D] = validate(raw)
                except ValidationError:
                    pass
                else:
                    if event.type == expected_type and event.dataschema == expected_schema:
                        return event
            return self._decode_slow(raw, spec)

        return decode

    def _decode_slow(self, raw: bytes | str, spec: EventSpec) -> Event[Any]:
        """Older version, other type, or invalid: find out which, precisely."""
        if len(raw) > self.max_event_bytes:
            raise PayloadTooLarge(f"event of {len(raw)} bytes exceeds {self.max_event_bytes}")
        envelope = self._parse_envelope(raw)
        if envelope.type != spec.event_type:
            if envelope.type not in self._specs:
                raise UnknownEventType(
                    f"unknown event type {envelope.type!r} (expected {spec.event_type})",
                    event_type=envelope.type,
                    event_id=envelope.id,
                )
            raise UnexpectedEventType(
                f"expected {spec.event_type}, got {envelope.type}",
                event_type=envelope.type,
                event_id=envelope.id,
            )
        return self._finish(envelope, spec)

    # -- internals ----------------------------------------------------------------

    def _parse_envelope(self, raw: bytes | str) -> RawEvent:
        if len(raw) > self.max_event_bytes:
            raise PayloadTooLarge(f"event of {len(raw)} bytes exceeds {self.max_event_bytes}")
        try:
            return RawEvent.model_validate_json(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            if any(e["type"] in ("json_invalid", "model_type") for e in errors):
                raise MalformedEvent(f"not a JSON object: {_first_message(exc)}") from None
            raise InvalidEnvelope(f"bad envelope: {_summarize(exc)}") from None
        except (ValueError, UnicodeDecodeError) as exc:  # e.g. invalid UTF-8 in str input
            raise MalformedEvent(f"not decodable: {exc}") from None

    def _finish(self, envelope: RawEvent, target: EventSpec) -> Event[Any]:
        """Check version, upcast data step by step, validate it with the target model."""
        parsed = parse_schema_uri(envelope.dataschema)
        if parsed is None or parsed[0] != envelope.type:
            raise InvalidEnvelope(
                f"dataschema {envelope.dataschema!r} does not name a version of {envelope.type}",
                event_type=envelope.type,
                event_id=envelope.id,
            )
        version = parsed[1]
        data = self._upcast(envelope, version, target)
        try:
            typed_data = target.model.model_validate(data)
        except ValidationError as exc:
            raise SchemaViolation(
                f"{target.event_type} v{target.version}: {_summarize(exc)}",
                event_type=envelope.type,
                event_id=envelope.id,
            ) from None
        attributes = envelope.model_dump(exclude={"data", "dataschema"})
        try:
            return target.envelope(**attributes, dataschema=target.schema_uri, data=typed_data)
        except ValidationError as exc:  # an extension attribute that cannot be re-validated
            raise InvalidEnvelope(_summarize(exc), event_id=envelope.id) from None

    def _upcast(self, envelope: RawEvent, version: int, target: EventSpec) -> Any:
        if version > target.version:
            raise UnsupportedVersion(
                f"{envelope.type} v{version} is newer than this reader (v{target.version})",
                event_type=envelope.type,
                event_id=envelope.id,
            )
        if version not in self._specs.get(envelope.type, {}):
            raise UnsupportedVersion(
                f"{envelope.type} v{version} is not a known version",
                event_type=envelope.type,
                event_id=envelope.id,
            )
        data = envelope.data
        for step in range(version, target.version):
            upcast = self._upcasters.get((envelope.type, step))
            if upcast is None:
                raise UnsupportedVersion(
                    f"no upcaster from {envelope.type} v{step} to v{step + 1}",
                    event_type=envelope.type,
                    event_id=envelope.id,
                )
            if not isinstance(data, dict):
                raise SchemaViolation(
                    f"{envelope.type} v{step} data is not an object",
                    event_type=envelope.type,
                    event_id=envelope.id,
                )
            try:
                data = upcast(dict(data))
            except Exception as exc:  # an upcaster rejecting old data is a schema problem
                raise SchemaViolation(
                    f"upcast {envelope.type} v{step}->v{step + 1} failed: {exc}",
                    event_type=envelope.type,
                    event_id=envelope.id,
                ) from None
        return data


def _first_message(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    return str(errors[0]["msg"]) if errors else str(exc)


def _summarize(exc: ValidationError, limit: int = 3) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors]
    more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


__all__ = ["DEFAULT_MAX_EVENT_BYTES", "EventDecodeError", "EventRegistry", "EventSpec"]
