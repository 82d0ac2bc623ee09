"""Unit tests of the event envelope, ids, registry (versions, upcasting, errors) and export.

No servers. Registry behaviour is tested on fresh `EventRegistry()` instances with test-only
models, so nothing here depends on (or pollutes) the process-wide `schemas.REGISTRY`.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from schemas import (
    REGISTRY,
    Event,
    EventData,
    EventDecodeError,
    EventRegistry,
    InvalidEnvelope,
    MalformedEvent,
    PayloadTooLarge,
    SchemaViolation,
    UnexpectedEventType,
    UnknownEventType,
    UnsupportedVersion,
    new_event,
    new_event_id,
    parse_schema_uri,
    schema_uri,
)
from schemas import ids as ids_module
from schemas.devices import DeviceReading
from schemas.export import export_json_schemas

THERMO = "test.thermo"
SWITCH = "test.switch"

# -- test-only models --------------------------------------------------------------------
# Registering sets ClassVars on the model, so each registry below gets its own classes.


class ThermoV1(EventData):
    """v1: temperature in Fahrenheit."""

    temp_f: float


class ThermoV2(EventData):
    """v2: Celsius instead of Fahrenheit."""

    temp_c: float


class ThermoV3(EventData):
    """v3: adds the sensor name and an explicit unit."""

    temp_c: float
    sensor: str = Field(min_length=1)
    unit: Literal["C"] = "C"


class SwitchV1(EventData):
    on: bool


def f_to_c(data: dict[str, Any]) -> dict[str, Any]:
    return {"temp_c": round((data.pop("temp_f") - 32) * 5 / 9, 6)}


def add_sensor(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "sensor": "unknown", "unit": "C"}


def thermo_registry(*, upcasters: bool = True, max_event_bytes: int | None = None) -> EventRegistry:
    registry = (
        EventRegistry()
        if max_event_bytes is None
        else EventRegistry(max_event_bytes=max_event_bytes)
    )
    registry.register(ThermoV1, THERMO, 1)
    registry.register(ThermoV2, THERMO, 2)
    registry.register(ThermoV3, THERMO, 3)
    registry.register(SwitchV1, SWITCH, 1)
    if upcasters:
        registry.upcaster(THERMO, from_version=1)(f_to_c)
        registry.upcaster(THERMO, from_version=2)(add_sensor)
    return registry


@pytest.fixture
def registry() -> EventRegistry:
    return thermo_registry()


def raw_event(event_type: str, version: int, data: Any, **attributes: Any) -> bytes:
    """Bytes of an envelope as some other producer might have written them."""
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": new_event_id(),
        "source": "/test/producer",
        "type": event_type,
        "time": "2026-01-02T03:04:05.123456Z",
        "datacontenttype": "application/json",
        "dataschema": schema_uri(event_type, version),
        "data": data,
    }
    document.update(attributes)
    return json.dumps(document).encode()


def reading() -> DeviceReading:
    return DeviceReading(
        site="s001",
        device="dev-7",
        channel="temp",
        payload={"value": 21.5, "ok": True, "tags": ["a", "b"], "nested": {"n": None}},
        device_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


# -- envelope ----------------------------------------------------------------------------


def test_envelope_round_trips_every_attribute_through_json() -> None:
    event = new_event(reading(), source="/site/s001", subject="dev-7", correlation_id="corr-42")

    raw = REGISTRY.encode(event)
    decoded = REGISTRY.decode(raw)
    decoded_as = REGISTRY.decode_as(raw, DeviceReading)

    assert decoded == event
    assert decoded_as == event
    assert isinstance(decoded_as.data, DeviceReading)
    assert decoded_as.data.payload["tags"] == ["a", "b"]
    document = json.loads(raw)
    assert document["specversion"] == "1.0"
    assert document["type"] == "edgebus.device.reading"
    assert document["dataschema"] == "urn:edgebus:edgebus.device.reading:v1"
    assert document["datacontenttype"] == "application/json"
    assert document["correlationid"] == "corr-42"
    assert document["time"].endswith("Z")


def test_unset_optional_attributes_are_left_out_not_null() -> None:
    document = json.loads(REGISTRY.encode(new_event(reading(), source="/s")))

    assert "subject" not in document
    assert "correlationid" not in document
    assert None not in {v for v in document.values() if not isinstance(v, dict)}


def test_new_event_stamps_type_version_fresh_id_and_utc_time() -> None:
    before = datetime.now(UTC)
    first = new_event(reading(), source="/s")
    second = new_event(reading(), source="/s")

    assert first.type == "edgebus.device.reading"
    assert first.version == 1
    assert first.id != second.id
    assert uuid.UUID(first.id).version == 7
    assert before - timedelta(seconds=1) <= first.time <= datetime.now(UTC)
    assert first.time.utcoffset() == timedelta(0)


def test_new_event_refuses_an_unregistered_payload_model() -> None:
    class Stray(EventData):
        x: int = 1

    with pytest.raises(TypeError, match="not a registered"):
        new_event(Stray(), source="/s")


def test_schema_uri_parse_and_format_are_inverse_and_strict() -> None:
    assert parse_schema_uri(schema_uri("edgebus.device.reading", 12)) == (
        "edgebus.device.reading",
        12,
    )
    for bad in (
        "urn:edgebus:x:v0",
        "urn:edgebus:x:v01",
        "urn:edgebus:x:1",
        "urn:other:x:v1",
        "urn:edgebus:x:v1:extra",
        "urn:edgebus:x:v1\n",
        " urn:edgebus:x:v1",
        "",
    ):
        assert parse_schema_uri(bad) is None, bad


# -- ids ---------------------------------------------------------------------------------


def test_event_ids_are_uuid7_unique_and_sorted_in_creation_order() -> None:
    before_ms = datetime.now(UTC).timestamp() * 1000
    ids = [new_event_id() for _ in range(100_000)]
    after_ms = datetime.now(UTC).timestamp() * 1000

    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for text in (ids[0], ids[len(ids) // 2], ids[-1]):
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical, lower-case, 36 characters
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    assert before_ms - 1 <= ids_module.event_id_millis(ids[0]) <= after_ms + 1
    # Borrowing future milliseconds when the counter runs out must stay bounded.
    assert ids_module.event_id_millis(ids[-1]) <= after_ms + 100


def test_ids_stay_ordered_when_the_clock_stands_still_or_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1_700_000_000_000 * 1_000_000]
    # The generator's clock seam: a module-level `_time_ns` (or the `time` module).
    if hasattr(ids_module, "_time_ns"):
        monkeypatch.setattr(ids_module, "_time_ns", lambda: clock[0])
    else:
        monkeypatch.setattr(ids_module.time, "time_ns", lambda: clock[0])
    generator = ids_module._Generator()
    # 10k ids in one frozen millisecond exhaust the 12-bit counter twice over.
    frozen = [generator.next_id() for _ in range(10_000)]
    clock[0] -= 5_000 * 1_000_000  # the wall clock steps back 5 s
    stepped_back = [generator.next_id() for _ in range(100)]
    ids = frozen + stepped_back

    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 for i in (ids[0], ids[4096], ids[-1]))
    # 10k ids need three 4096-id milliseconds: two were borrowed, no more.
    assert ids_module.event_id_millis(frozen[0]) == 1_700_000_000_000
    assert ids_module.event_id_millis(ids[-1]) == 1_700_000_000_002


# -- registry: versions and upcasting -----------------------------------------------------


def test_v1_and_v2_events_are_upcast_to_v3(registry: EventRegistry) -> None:
    v1 = raw_event(THERMO, 1, {"temp_f": 212.0})
    v2 = raw_event(THERMO, 2, {"temp_c": 21.0})

    from_v1 = registry.decode(v1)
    from_v2 = registry.decode(v2)

    assert isinstance(from_v1.data, ThermoV3)
    assert from_v1.data == ThermoV3(temp_c=100.0, sensor="unknown")
    assert from_v2.data == ThermoV3(temp_c=21.0, sensor="unknown")
    assert from_v1.dataschema == schema_uri(THERMO, 3)
    assert from_v1.version == 3
    assert from_v1.id == json.loads(v1)["id"]  # the idempotency key survives upcasting


def test_decode_as_an_older_model_upcasts_only_that_far(registry: EventRegistry) -> None:
    event = registry.decode_as(raw_event(THERMO, 1, {"temp_f": 32.0}), ThermoV2)

    assert event.data == ThermoV2(temp_c=0.0)
    assert event.dataschema == schema_uri(THERMO, 2)


def test_current_version_decodes_unchanged_on_fast_and_slow_paths(
    registry: EventRegistry,
) -> None:
    raw = raw_event(THERMO, 3, {"temp_c": 5.5, "sensor": "roof"})

    assert registry.decode_as(raw, ThermoV3).data == ThermoV3(temp_c=5.5, sensor="roof")
    assert registry.decode(raw).data == ThermoV3(temp_c=5.5, sensor="roof")


def test_version_newer_than_the_reader_is_unsupported(registry: EventRegistry) -> None:
    raw = raw_event(THERMO, 4, {"temp_c": 1.0, "sensor": "x", "humidity": 3})

    with pytest.raises(UnsupportedVersion, match="newer") as caught:
        registry.decode(raw)
    assert caught.value.reason == "unsupported_version"
    assert caught.value.event_type == THERMO
    assert caught.value.event_id == json.loads(raw)["id"]
    with pytest.raises(UnsupportedVersion):
        registry.decode_as(raw, ThermoV3)
    # No downcasting: a v3 event is too new for a consumer that reads v2.
    with pytest.raises(UnsupportedVersion):
        registry.decode_as(raw_event(THERMO, 3, {"temp_c": 1.0, "sensor": "x"}), ThermoV2)


def test_missing_upcaster_is_unsupported_version() -> None:
    registry = thermo_registry(upcasters=False)
    registry.upcaster(THERMO, from_version=2)(add_sensor)  # v1 -> v2 is missing

    with pytest.raises(UnsupportedVersion, match=r"no upcaster from test\.thermo v1 to v2"):
        registry.decode(raw_event(THERMO, 1, {"temp_f": 50.0}))
    assert registry.decode(raw_event(THERMO, 2, {"temp_c": 10.0})).data.sensor == "unknown"


def test_version_gap_that_was_never_registered_is_unsupported() -> None:
    registry = EventRegistry()
    registry.register(ThermoV1, THERMO, 1)
    registry.register(ThermoV3, THERMO, 3)

    with pytest.raises(UnsupportedVersion, match="not a known version"):
        registry.decode(raw_event(THERMO, 2, {"temp_c": 1.0}))


def test_upcaster_that_rejects_old_data_is_a_schema_violation(registry: EventRegistry) -> None:
    with pytest.raises(SchemaViolation, match=r"upcast test\.thermo v1->v2"):
        registry.decode(raw_event(THERMO, 1, {"fahrenheit": 1.0}))  # KeyError in f_to_c
    with pytest.raises(SchemaViolation, match="not an object"):
        registry.decode(raw_event(THERMO, 1, [1, 2, 3]))


def test_registering_two_models_for_one_version_is_refused(registry: EventRegistry) -> None:
    class Other(EventData):
        temp_k: float

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Other, THERMO, 2)
    with pytest.raises(ValueError, match="start at 1"):
        registry.register(Other, "test.other", 0)


def test_event_decorator_registers_and_latest_is_the_highest_version() -> None:
    registry = EventRegistry()

    @registry.event("test.deco", version=2)
    class DecoV2(EventData):
        x: int

    @registry.event("test.deco", version=1)
    class DecoV1(EventData):
        x: int

    assert registry.latest("test.deco").model is DecoV2
    assert registry.spec_for(DecoV1).schema_uri == "urn:edgebus:test.deco:v1"
    assert {(s.event_type, s.version) for s in registry.specs()} == {
        ("test.deco", 1),
        ("test.deco", 2),
    }
    with pytest.raises(UnknownEventType):
        registry.latest("test.nope")


# -- registry: every kind of bad input has its own error ---------------------------------


def test_unknown_event_type_is_rejected(registry: EventRegistry) -> None:
    with pytest.raises(UnknownEventType) as caught:
        registry.decode(raw_event("test.never-registered", 1, {"a": 1}))
    assert caught.value.reason == "unknown_type"
    assert caught.value.event_type == "test.never-registered"


def test_decode_as_an_unknown_type_says_unknown_not_unexpected(registry: EventRegistry) -> None:
    # A typed subscriber must tell "nobody knows this type" (a producer on a newer schema
    # release) from "a known type routed to the wrong consumer".
    with pytest.raises(UnknownEventType) as caught:
        registry.decode_as(raw_event("test.never-registered", 1, {"a": 1}), ThermoV3)
    assert caught.value.reason == "unknown_type"


def test_decode_as_another_known_type_is_unexpected(registry: EventRegistry) -> None:
    raw = raw_event(SWITCH, 1, {"on": True})

    with pytest.raises(UnexpectedEventType) as caught:
        registry.decode_as(raw, ThermoV3)
    assert caught.value.reason == "unexpected_type"
    assert caught.value.event_type == SWITCH
    assert caught.value.event_id == json.loads(raw)["id"]
    assert registry.decode_as(raw, SwitchV1).data.on is True


@pytest.mark.parametrize(
    "data",
    [
        {"temp_c": "warm", "sensor": "roof"},  # wrong type
        {"temp_c": 1.0},  # missing required field
        {"temp_c": 1.0, "sensor": "roof", "extra": 1},  # models forbid extra fields
        {"temp_c": 1.0, "sensor": "roof", "unit": "F"},  # not the literal
        {"temp_c": 1.0, "sensor": ""},  # constraint
        "not an object",
        None,
    ],
)
def test_data_that_does_not_match_the_model_is_a_schema_violation(
    registry: EventRegistry, data: Any
) -> None:
    raw = raw_event(THERMO, 3, data)

    with pytest.raises(SchemaViolation) as caught:
        registry.decode(raw)
    assert caught.value.reason == "schema"
    assert caught.value.event_id == json.loads(raw)["id"]
    with pytest.raises(SchemaViolation):
        registry.decode_as(raw, ThermoV3)


def test_payload_over_the_limit_is_too_large_and_at_the_limit_is_fine() -> None:
    registry = thermo_registry(max_event_bytes=2048)
    base = raw_event(SWITCH, 1, {"on": True}, pad="")
    padding = 2048 - len(base)
    at_limit = raw_event(SWITCH, 1, {"on": True}, pad="p" * padding)
    over_limit = raw_event(SWITCH, 1, {"on": True}, pad="p" * (padding + 1))
    assert (len(at_limit), len(over_limit)) == (2048, 2049)

    assert registry.decode(at_limit).data.on is True
    assert registry.decode_as(at_limit, SwitchV1).data.on is True
    for decode in (registry.decode, registry.decoder_for(SwitchV1)):
        with pytest.raises(PayloadTooLarge) as caught:
            decode(over_limit)
        assert caught.value.reason == "oversize"
    # Oversize is judged before parsing: even garbage of that size is "oversize".
    with pytest.raises(PayloadTooLarge):
        registry.decode(b"\xff" * 4096)


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"{", b"[1, 2]", b'"a string"', b"42", b"null", b"\xff\xfe\x00"],
)
def test_input_that_is_not_a_json_object_is_malformed(registry: EventRegistry, raw: bytes) -> None:
    for decode in (registry.decode, registry.decoder_for(ThermoV3)):
        with pytest.raises(MalformedEvent) as caught:
            decode(raw)
        assert caught.value.reason == "malformed"


@pytest.mark.parametrize("attribute", ["id", "source", "type", "time", "dataschema"])
def test_missing_required_attribute_is_an_invalid_envelope(
    registry: EventRegistry, attribute: str
) -> None:
    document = json.loads(raw_event(THERMO, 3, {"temp_c": 1.0, "sensor": "s"}))
    del document[attribute]
    raw = json.dumps(document)

    for decode in (registry.decode, registry.decoder_for(ThermoV3)):
        with pytest.raises(InvalidEnvelope, match=rf"\b{attribute}: Field required"):
            decode(raw)


@pytest.mark.parametrize(
    "attributes",
    [
        pytest.param({"specversion": "0.3"}, id="specversion-0.3"),
        pytest.param({"id": ""}, id="empty-id"),
        pytest.param({"id": 7}, id="numeric-id"),
        pytest.param({"source": ""}, id="empty-source"),
        pytest.param({"time": "yesterday"}, id="time-not-a-timestamp"),
        # RFC 3339 (and the CloudEvents SDK) require an offset.
        pytest.param({"time": "2026-01-02T03:04:05"}, id="time-without-offset"),
        # CloudEvents: subject, if present, must not be empty.
        pytest.param({"subject": ""}, id="empty-subject"),
        pytest.param({"subject": 5}, id="numeric-subject"),
        pytest.param({"datacontenttype": "text/plain"}, id="not-json-content"),
        pytest.param({"dataschema": "https://example.com/schema.json"}, id="foreign-dataschema"),
        pytest.param({"dataschema": "urn:edgebus:test.switch:v3"}, id="dataschema-other-type"),
        pytest.param({"dataschema": "urn:edgebus:test.thermo:v3\n"}, id="dataschema-newline"),
    ],
)
def test_bad_attribute_values_are_an_invalid_envelope(
    registry: EventRegistry, attributes: dict[str, Any]
) -> None:
    raw = raw_event(THERMO, 3, {"temp_c": 1.0, "sensor": "s"}, **attributes)

    for decode in (registry.decode, registry.decoder_for(ThermoV3)):
        with pytest.raises(InvalidEnvelope) as caught:
            decode(raw)
        assert caught.value.reason == "envelope"


def test_every_decode_error_is_an_event_decode_error_with_a_distinct_reason() -> None:
    classes = [
        PayloadTooLarge,
        MalformedEvent,
        InvalidEnvelope,
        UnknownEventType,
        UnsupportedVersion,
        SchemaViolation,
        UnexpectedEventType,
    ]
    assert all(issubclass(cls, EventDecodeError) for cls in classes)
    reasons = [cls.reason for cls in classes]
    assert len(set(reasons)) == len(reasons)
    assert all(re.fullmatch(r"[a-z_]+", r) for r in reasons)  # usable as a subject token


# -- extension attributes -------------------------------------------------------------------


def test_extension_attributes_round_trip(registry: EventRegistry) -> None:
    extensions = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "partitionkey": "dev-7",
        "sequence": 42,
        "sampled": True,
    }
    raw = raw_event(THERMO, 3, {"temp_c": 1.0, "sensor": "s"}, correlationid="c-1", **extensions)

    for event in (registry.decode(raw), registry.decode_as(raw, ThermoV3)):
        assert event.model_extra == extensions
        assert event.correlationid == "c-1"
        document = json.loads(registry.encode(event))
        assert {k: document[k] for k in extensions} == extensions
        assert document["correlationid"] == "c-1"


def test_extension_attributes_survive_upcasting(registry: EventRegistry) -> None:
    event = registry.decode(raw_event(THERMO, 1, {"temp_f": 32.0}, tenant="acme"))

    assert event.version == 3
    assert event.model_extra == {"tenant": "acme"}
    assert json.loads(registry.encode(event))["tenant"] == "acme"


# -- mixed-version fleets -----------------------------------------------------------------


class OldMeterV1(EventData):
    kwh: float


class NewMeterV1(EventData):
    kwh: float


class NewMeterV2(EventData):
    wh: int
    phase: int = 1


METER = "test.meter"


def test_old_producer_and_new_consumer_interoperate_during_a_rolling_update() -> None:
    old = EventRegistry()  # a site not yet updated: knows only v1
    old.register(OldMeterV1, METER, 1)
    new = EventRegistry()  # an updated service: knows v1 and v2
    new.register(NewMeterV1, METER, 1)
    new.register(NewMeterV2, METER, 2)
    new.upcaster(METER, from_version=1)(lambda d: {"wh": round(d["kwh"] * 1000)})

    from_old = old.encode(new_event(OldMeterV1(kwh=1.5), source="/site/old"))
    from_new = new.encode(new_event(NewMeterV2(wh=7, phase=3), source="/site/new"))
    from_new_as_v1 = new.encode(new_event(NewMeterV1(kwh=0.25), source="/site/new"))

    # New consumers read everything, upcast to what they know.
    assert new.decode(from_old).data == NewMeterV2(wh=1500)
    assert new.decode_as(from_old, NewMeterV2).data == NewMeterV2(wh=1500)
    assert new.decode_as(from_old, NewMeterV1).data == NewMeterV1(kwh=1.5)
    assert new.decode(from_new).data == NewMeterV2(wh=7, phase=3)
    # Old consumers read v1 from anyone, and refuse (for dead-lettering) what they can't.
    assert old.decode(from_new_as_v1).data == OldMeterV1(kwh=0.25)
    assert old.decode_as(from_new_as_v1, OldMeterV1).data == OldMeterV1(kwh=0.25)
    with pytest.raises(UnsupportedVersion):
        old.decode(from_new)
    with pytest.raises(UnsupportedVersion):
        old.decode_as(from_new, OldMeterV1)


# -- JSON Schema export ---------------------------------------------------------------------


class _SchemaError(AssertionError):
    pass


_IGNORED_KEYWORDS = {"title", "description", "default", "$id", "$defs", "examples"}


def validate_json_schema(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    """A small JSON Schema validator for the keywords pydantic emits.

    `jsonschema` is not a dependency of this project; an unknown keyword fails loudly so
    this never passes by ignoring something it should have checked.
    """
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        jsonschema.validate(instance, root)
    _validate(instance, schema, root)


def _validate(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    types = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "null": type(None),
    }
    for keyword, value in schema.items():
        if keyword in _IGNORED_KEYWORDS:
            continue
        if keyword == "$ref":
            assert value.startswith("#/$defs/"), value
            _validate(instance, root["$defs"][value.removeprefix("#/$defs/")], root)
        elif keyword == "type":
            ok = isinstance(instance, types[value])
            if isinstance(instance, bool) and value in ("integer", "number"):
                ok = False
            if not ok:
                raise _SchemaError(f"{instance!r} is not of type {value}")
        elif keyword == "const":
            if instance != value:
                raise _SchemaError(f"{instance!r} != const {value!r}")
        elif keyword == "enum":
            if instance not in value:
                raise _SchemaError(f"{instance!r} not in {value!r}")
        elif keyword == "anyOf":
            errors = []
            for option in value:
                try:
                    _validate(instance, option, root)
                    break
                except _SchemaError as exc:
                    errors.append(str(exc))
            else:
                raise _SchemaError(f"{instance!r} matches no anyOf option: {errors}")
        elif keyword in ("minLength", "maxLength", "pattern", "format"):
            if not isinstance(instance, str):
                continue
            if keyword == "minLength" and len(instance) < value:
                raise _SchemaError(f"{instance!r} shorter than {value}")
            if keyword == "maxLength" and len(instance) > value:
                raise _SchemaError(f"{instance!r} longer than {value}")
            if keyword == "pattern" and not re.search(value, instance):
                raise _SchemaError(f"{instance!r} does not match {value}")
            if keyword == "format":
                assert value == "date-time", value
                try:
                    datetime.fromisoformat(instance)
                except ValueError:
                    raise _SchemaError(f"{instance!r} is not a date-time") from None
        elif keyword == "required":
            missing = [name for name in value if name not in instance]
            if isinstance(instance, dict) and missing:
                raise _SchemaError(f"missing required {missing}")
        elif keyword == "properties":
            if isinstance(instance, dict):
                for name, sub in value.items():
                    if name in instance:
                        _validate(instance[name], sub, root)
        elif keyword == "additionalProperties":
            if isinstance(instance, dict):
                extra = set(instance) - set(schema.get("properties", {}))
                if value is False and extra:
                    raise _SchemaError(f"additional properties {sorted(extra)}")
                if isinstance(value, dict):
                    for name in extra:
                        _validate(instance[name], value, root)
        elif keyword == "items":
            if isinstance(instance, list):
                for item in instance:
                    _validate(item, value, root)
        elif keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if isinstance(instance, (int, float)) and not isinstance(instance, bool):
                ok = {
                    "minimum": instance >= value,
                    "maximum": instance <= value,
                    "exclusiveMinimum": instance > value,
                    "exclusiveMaximum": instance < value,
                }[keyword]
                if not ok:
                    raise _SchemaError(f"{instance!r} violates {keyword} {value}")
        else:
            raise AssertionError(f"schema keyword {keyword!r} is not checked by this test")


def test_json_schema_export_writes_one_file_per_version_that_validates_real_events(
    tmp_path: Path,
) -> None:
    written = export_json_schemas(REGISTRY, tmp_path / "schemas")

    specs = sorted(REGISTRY.specs(), key=lambda s: (s.event_type, s.version))
    assert [p.name for p in written] == [f"{s.event_type}.v{s.version}.schema.json" for s in specs]
    assert all(p.is_file() for p in written)
    schema_file = tmp_path / "schemas" / "edgebus.device.reading.v1.schema.json"
    schema = json.loads(schema_file.read_text())
    assert schema["$id"] == "urn:edgebus:edgebus.device.reading:v1"
    assert set(schema["required"]) >= {"id", "source", "type", "time", "dataschema", "data"}

    event = json.loads(
        REGISTRY.encode(new_event(reading(), source="/s", subject="dev-7", correlation_id="c"))
    )
    validate_json_schema(event, schema, schema)
    # The validator is not a rubber stamp: broken events fail it.
    with pytest.raises(_SchemaError, match="additional"):
        validate_json_schema({**event, "data": {**event["data"], "rogue": 1}}, schema, schema)
    with pytest.raises(_SchemaError, match="does not match"):
        validate_json_schema({**event, "data": {**event["data"], "site": "a.b"}}, schema, schema)
    with pytest.raises(_SchemaError, match="missing required"):
        validate_json_schema({k: v for k, v in event.items() if k != "id"}, schema, schema)


def test_json_schema_export_covers_every_version_of_a_type(tmp_path: Path) -> None:
    registry = thermo_registry()

    written = export_json_schemas(registry, tmp_path)

    assert sorted(p.name for p in written) == [
        "test.switch.v1.schema.json",
        "test.thermo.v1.schema.json",
        "test.thermo.v2.schema.json",
        "test.thermo.v3.schema.json",
    ]
    samples = {1: {"temp_f": 1.0}, 2: {"temp_c": 1.0}, 3: {"temp_c": 1.0, "sensor": "s"}}
    for version, data in samples.items():
        schema = json.loads((tmp_path / f"test.thermo.v{version}.schema.json").read_text())
        assert schema["$id"] == schema_uri(THERMO, version)
        validate_json_schema(json.loads(raw_event(THERMO, version, data)), schema, schema)
        other = {1: {"temp_c": 1.0}, 2: {"temp_f": 1.0}, 3: {"temp_f": 1.0}}[version]
        with pytest.raises(_SchemaError):
            validate_json_schema(json.loads(raw_event(THERMO, version, other)), schema, schema)


def test_event_class_is_cached_per_model() -> None:
    # new_event relies on the envelope class set at registration; parametrizing again
    # must give the very same class, or decoded events would not compare equal.
    assert DeviceReading.envelope_model is Event[DeviceReading]
    event = new_event(reading(), source="/s", time=datetime(2026, 1, 1, tzinfo=UTC))
    assert type(event) is Event[DeviceReading]
