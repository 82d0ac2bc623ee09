"""Our events against the official CloudEvents Python SDK (structured JSON mode).

Every type in `schemas.REGISTRY` encoded by us must be read by the SDK with identical
attributes and data, and events the SDK writes must decode with our registry into the
typed model. The SDK's `core` API (cloudevents>=2) is the reference; the legacy `v1.http`
API is checked too because most deployed consumers still use it.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as CoreCloudEvent
from cloudevents.v1.conversion import to_json as legacy_to_json
from cloudevents.v1.http import CloudEvent as LegacyCloudEvent
from cloudevents.v1.http import from_json as legacy_from_json
from hypothesis import find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample
from pydantic import ValidationError

from schemas import REGISTRY, EventData, EventSpec, SchemaViolation, new_event
from schemas.common import ErrorReply
from schemas.devices import DeviceReading
from schemas.logs import LogLevel, LogRecord
from schemas.sync import (
    ConfigChanged,
    ConfigHistory,
    ConfigSet,
    ConfigSetResult,
    ConfigView,
    KeyChange,
    LayerView,
    SiteDiff,
    Target,
)

FORMAT = JSONFormat()

_T0 = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
_GROUP = Target(scope="group", name="plant-a")
_DIFF = SiteDiff(
    site="s001", changes=[KeyChange(key="max_payload_bytes", before=65536, after=16384)]
)
_CHANGED = ConfigChanged(
    kind="ingest",
    target=_GROUP,
    rev=7,
    values={"max_payload_bytes": 16384},
    unset=[],
    actor="ops",
    targeted=2,
    changed_sites=1,
    at=_T0,
)

# Hand-written payloads for the types we know; any other registered type gets one generated
# from its JSON Schema (see `generated_sample`), so new event types are covered automatically.
SAMPLES: dict[tuple[str, int], EventData] = {
    ("edgebus.device.reading", 1): DeviceReading(
        site="s001",
        device="pump-3",
        channel="pressure",
        payload={"bar": 2.75, "ok": True, "labels": ["a", "é"], "raw": None},
        device_time=datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC),
    ),
    ("edgebus.error", 1): ErrorReply(code="handler_failed", message="boom: ünïcode ✓"),
    ("edgebus.log.record", 1): LogRecord(
        site="s001",
        level=LogLevel.WARNING,
        logger="edge_agent.ingest",
        message="payload_rejected",
        timestamp=_T0,
        fields={"reason": "too large", "bytes": 70000, "nested": {"ok": False}},
        device="pump-3",
        event_id="0190c0de-0000-7000-8000-000000000001",
    ),
    ("edgebus.sync.set", 1): ConfigSet(
        kind="ingest", target=_GROUP, values={"max_payload_bytes": 16384}, actor="ops"
    ),
    ("edgebus.sync.set.result", 1): ConfigSetResult(
        kind="ingest",
        target=_GROUP,
        rev=7,
        dry_run=False,
        targeted=2,
        changed=1,
        diffs=[_DIFF],
    ),
    ("edgebus.sync.view", 1): ConfigView(
        kind="ingest",
        site="s001",
        layers=[LayerView(target=_GROUP, values={"max_payload_bytes": 16384}, rev=7)],
        effective={"max_payload_bytes": 16384},
        rev=7,
        digest="ab12",
    ),
    ("edgebus.sync.changed", 1): _CHANGED,
    ("edgebus.sync.history", 1): ConfigHistory(changes=[_CHANGED]),
}

_STRING_CANDIDATES = ("sample-1", "s001", "a", "A1", "x" * 8, "sample text")


def _sample_string(schema: dict[str, Any]) -> str:
    low, high = schema.get("minLength", 0), schema.get("maxLength", 10**9)
    pattern = schema.get("pattern")
    if pattern is None:
        text = "sample-1"
        return (text + "x" * max(0, low - len(text)))[:high]
    for candidate in _STRING_CANDIDATES:
        if re.search(pattern, candidate) and low <= len(candidate) <= high:
            return candidate
    # The simplest string the pattern accepts (hypothesis shrinks to it deterministically).
    found: str = find(
        st.from_regex(pattern, fullmatch=True),
        lambda text: low <= len(text) <= high,
        settings=settings(database=None, max_examples=2000),
    )
    return found


def _value_from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> Any:
    if "$ref" in schema:
        return _value_from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        return _value_from_schema(options[0], defs)
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format") == "date-time":
            return "2026-03-04T05:06:07.5+00:00"
        return _sample_string(schema)
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.5))
    if kind == "boolean":
        return True
    if kind == "array":
        return [_value_from_schema(schema.get("items", {"type": "string"}), defs)]
    if kind == "object":
        properties = schema.get("properties")
        if properties is None:
            values = schema.get("additionalProperties")
            if isinstance(values, dict) and values:  # dict[str, X]
                return {"key": _value_from_schema(values, defs)}
            return {"key": "value", "n": 1}
        return {name: _value_from_schema(sub, defs) for name, sub in properties.items()}
    raise LookupError(f"no sample value for {schema}")


def generated_sample(model: type[EventData]) -> EventData:
    """A payload with every field set, built from the model's own JSON Schema."""
    schema = model.model_json_schema()
    return model.model_validate(_value_from_schema(schema, schema.get("$defs", {})))


def registered_specs() -> list[EventSpec]:
    return sorted(REGISTRY.specs(), key=lambda s: (s.event_type, s.version))


def spec_id(spec: EventSpec) -> str:
    return f"{spec.event_type}.v{spec.version}"


def sample_for(spec: EventSpec) -> EventData:
    sample = SAMPLES.get((spec.event_type, spec.version)) or generated_sample(spec.model)
    assert type(sample) is spec.model
    return sample


@pytest.mark.parametrize("spec", registered_specs(), ids=spec_id)
def test_every_registered_event_type_has_a_valid_sample(spec: EventSpec) -> None:
    try:
        sample = sample_for(spec)
    except (LookupError, ValidationError, NoSuchExample) as exc:
        pytest.fail(f"add a sample payload for {spec_id(spec)} to SAMPLES in {__file__}: {exc}")
    assert spec.model.model_validate_json(sample.model_dump_json()) == sample


# -- ours -> SDK -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", registered_specs(), ids=spec_id)
def test_sdk_reads_our_event_with_identical_attributes_and_data(spec: EventSpec) -> None:
    event = new_event(
        sample_for(spec),
        source="/site/s001/agent",
        subject="pump-3",
        correlation_id="corr-0001",
        time=datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=timezone(timedelta(hours=2))),
    )
    raw = REGISTRY.encode(event)

    read = FORMAT.read(None, raw)

    assert isinstance(read, CoreCloudEvent)
    assert read.get_specversion() == "1.0"
    assert read.get_id() == event.id
    assert read.get_source() == "/site/s001/agent"
    assert read.get_type() == spec.event_type
    assert read.get_time() == event.time
    assert read.get_time().utcoffset() == timedelta(hours=2)
    assert read.get_subject() == "pump-3"
    assert read.get_datacontenttype() == "application/json"
    assert read.get_dataschema() == spec.schema_uri
    assert read.get_extension("correlationid") == "corr-0001"
    assert read.get_data() == event.data.model_dump(mode="json")
    assert set(read.get_attributes()) == {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "dataschema",
        "correlationid",
    }


@pytest.mark.parametrize("spec", registered_specs(), ids=spec_id)
def test_our_event_survives_a_round_trip_through_the_sdk(spec: EventSpec) -> None:
    event = new_event(sample_for(spec), source="/center", correlation_id="c-9")

    rewritten = FORMAT.write(FORMAT.read(None, REGISTRY.encode(event)))

    assert REGISTRY.decode_as(rewritten, spec.model) == event
    assert REGISTRY.decode(rewritten) == event


@pytest.mark.parametrize("spec", registered_specs(), ids=spec_id)
def test_legacy_sdk_api_reads_our_event(spec: EventSpec) -> None:
    event = new_event(sample_for(spec), source="/center", subject="s", correlation_id="c-1")

    read = legacy_from_json(REGISTRY.encode(event))

    assert read["id"] == event.id
    assert read["type"] == spec.event_type
    assert read["source"] == "/center"
    assert read["dataschema"] == spec.schema_uri
    assert read["subject"] == "s"
    assert read["correlationid"] == "c-1"
    assert read.data == event.data.model_dump(mode="json")


def test_sdk_reads_an_event_with_only_required_and_our_mandatory_attributes() -> None:
    event = new_event(SAMPLES[("edgebus.error", 1)], source="/center")

    read = FORMAT.read(None, REGISTRY.encode(event))

    assert read.get_subject() is None
    assert read.get_extension("correlationid") is None
    assert read.get_time() == event.time


# -- SDK -> ours -------------------------------------------------------------------------


def sdk_attributes(spec: EventSpec, **extra: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "type": spec.event_type,
        "source": "https://third-party.example/producer",
        "dataschema": spec.schema_uri,
        "datacontenttype": "application/json",
    }
    attributes.update(extra)
    return attributes


@pytest.mark.parametrize("spec", registered_specs(), ids=spec_id)
def test_event_written_by_the_sdk_decodes_into_our_typed_model(spec: EventSpec) -> None:
    data = sample_for(spec).model_dump(mode="json")
    sdk_event = CoreCloudEvent(
        sdk_attributes(spec, subject="pump-3", correlationid="corr-7", traceid="abc123"),
        data,
    )
    raw = FORMAT.write(sdk_event)

    decoded = REGISTRY.decode_as(raw, spec.model)

    assert isinstance(decoded.data, spec.model)
    assert decoded.data == sample_for(spec)
    assert decoded.id == sdk_event.get_id()
    uuid.UUID(decoded.id)  # the SDK's own id (UUID4) is kept, not replaced
    assert decoded.source == "https://third-party.example/producer"
    assert decoded.time == sdk_event.get_time()
    assert decoded.subject == "pump-3"
    assert decoded.correlationid == "corr-7"
    assert decoded.model_extra == {"traceid": "abc123"}
    assert REGISTRY.decode(raw) == decoded
    # ...and what we re-emit is still the same event to the SDK.
    again = FORMAT.read(None, REGISTRY.encode(decoded))
    assert again.get_attributes() == sdk_event.get_attributes()
    assert again.get_data() == data


def test_sdk_event_without_datacontenttype_defaults_to_json() -> None:
    spec = REGISTRY.spec_for(DeviceReading)
    attributes = sdk_attributes(spec)
    del attributes["datacontenttype"]
    raw = FORMAT.write(CoreCloudEvent(attributes, sample_for(spec).model_dump(mode="json")))
    assert "datacontenttype" not in json.loads(raw)

    decoded = REGISTRY.decode_as(raw, DeviceReading)

    assert decoded.datacontenttype == "application/json"
    assert decoded.data == sample_for(spec)


def test_event_written_by_the_legacy_sdk_decodes_into_our_typed_model() -> None:
    spec = REGISTRY.spec_for(DeviceReading)
    data = sample_for(spec).model_dump(mode="json")
    legacy = LegacyCloudEvent(sdk_attributes(spec, subject="pump-3"), data)

    decoded = REGISTRY.decode_as(legacy_to_json(legacy), DeviceReading)

    assert decoded.id == legacy["id"]
    assert decoded.subject == "pump-3"
    assert decoded.data == sample_for(spec)


def test_sdk_event_with_binary_data_is_rejected_as_not_our_schema() -> None:
    spec = REGISTRY.spec_for(DeviceReading)
    raw = FORMAT.write(CoreCloudEvent(sdk_attributes(spec), b"\x00\x01binary"))
    assert "data_base64" in json.loads(raw)

    with pytest.raises(SchemaViolation):
        REGISTRY.decode_as(raw, DeviceReading)
    with pytest.raises(SchemaViolation):
        REGISTRY.decode(raw)


# -- things the SDK would refuse, we must never produce --------------------------------------


def test_we_cannot_produce_a_naive_time_the_sdk_would_refuse() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        new_event(SAMPLES[("edgebus.error", 1)], source="/c", time=datetime(2026, 1, 1))


def test_we_cannot_produce_an_empty_subject_the_sdk_would_refuse() -> None:
    with pytest.raises(ValidationError, match="subject"):
        new_event(SAMPLES[("edgebus.error", 1)], source="/c", subject="")
