"""Property tests: whatever bytes arrive, decoding returns an event or raises `EventDecodeError`.

A consumer dead-letters on `EventDecodeError`; anything else escaping the registry would crash
it. Each property also checks that what *is* accepted is a well-formed, re-encodable event.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    UnsupportedVersion,
    new_event,
    schema_uri,
)
from schemas.devices import DeviceReading

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

READING = "edgebus.device.reading"


# -- a small multi-version registry whose upcasters can fail on bad old data -----------------


class GaugeV1(EventData):
    level: int


class GaugeV2(EventData):
    level: int
    scale: float


GAUGE = "prop.gauge"
GAUGES = EventRegistry(max_event_bytes=64 * 1024)
GAUGES.register(GaugeV1, GAUGE, 1)
GAUGES.register(GaugeV2, GAUGE, 2)
GAUGES.upcaster(GAUGE, from_version=1)(lambda d: {"level": d["level"] * 10, "scale": 0.1})


# -- helpers ---------------------------------------------------------------------------------


def attempt(decode: Callable[[Any], Event[Any]], raw: Any) -> Event[Any] | EventDecodeError:
    """The event, or the `EventDecodeError`; any other exception fails the property."""
    try:
        return decode(raw)
    except EventDecodeError as exc:
        assert exc.reason, "every decode error carries a machine-readable reason"
        assert isinstance(exc.message, str)
        return exc


def decoders(registry: EventRegistry, model: type[EventData]) -> list[Callable[[Any], Any]]:
    return [
        registry.decode,
        registry.decoder_for(model),
        lambda raw: registry.decode_as(raw, model),
    ]


def check_contract(
    raw: bytes | str, registry: EventRegistry = REGISTRY, model: type[EventData] = DeviceReading
) -> list[Event[Any] | EventDecodeError]:
    """Every decode entry point keeps the contract; accepted events re-encode losslessly."""
    outcomes = [attempt(decode, raw) for decode in decoders(registry, model)]
    for outcome in outcomes:
        if isinstance(outcome, Event):
            again = registry.decode(registry.encode(outcome))
            assert again == registry.decode(registry.encode(again))
            assert again.id == outcome.id
    # decode_as and its cached decoder are the same function: same verdict, same result.
    assert type(outcomes[1]) is type(outcomes[2])
    if isinstance(outcomes[1], Event):
        assert outcomes[1] == outcomes[2]
    return outcomes


def valid_document() -> dict[str, Any]:
    event = new_event(
        DeviceReading(site="s1", device="d1", channel="temp", payload={"v": 1.5, "tags": ["x"]}),
        source="/site/s1",
        subject="d1",
        correlation_id="c1",
        time=datetime(2026, 1, 1, tzinfo=UTC),
    )
    document: dict[str, Any] = json.loads(REGISTRY.encode(event))
    return document


VALID = valid_document()
VALID_RAW = json.dumps(VALID).encode()

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


# -- properties ------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_the_error_contract(raw: bytes) -> None:
    check_contract(raw)
    check_contract(raw, GAUGES, GaugeV2)


@SETTINGS
@given(st.text(max_size=256))
def test_random_text_including_lone_surrogates_never_escapes_the_error_contract(
    raw: str,
) -> None:
    check_contract(raw)


def test_every_truncation_of_a_valid_event_is_malformed() -> None:
    assert isinstance(check_contract(VALID_RAW)[0], Event)
    for cut in range(len(VALID_RAW)):
        for outcome in check_contract(VALID_RAW[:cut]):
            assert isinstance(outcome, MalformedEvent), (cut, VALID_RAW[:cut])


@SETTINGS
@given(
    payload=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    cut=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_truncated_random_valid_events_are_malformed(payload: dict[str, Any], cut: float) -> None:
    raw = json.dumps({**VALID, "data": {**VALID["data"], "payload": payload}}).encode()
    assert isinstance(check_contract(raw)[0], Event)

    for outcome in check_contract(raw[: int(len(raw) * cut)]):
        assert isinstance(outcome, MalformedEvent)


@SETTINGS
@given(field=st.sampled_from(sorted(VALID)), value=json_values)
def test_any_value_in_any_envelope_attribute_keeps_the_contract(field: str, value: Any) -> None:
    outcomes = check_contract(json.dumps({**VALID, field: value}))

    for outcome in outcomes:
        # Accepted only if the value really is acceptable for that attribute ("time" and
        # "data" are parsed into richer types, so they are not compared verbatim).
        if isinstance(outcome, Event) and field not in ("time", "data"):
            assert getattr(outcome, field) == value


@pytest.mark.parametrize(
    ("field", "wrong"),
    [
        ("specversion", 1.0),
        ("id", 123),
        ("id", ["a"]),
        ("source", {"uri": "/x"}),
        ("type", None),
        ("type", 5),
        ("time", [2026, 1, 1]),
        ("time", "2026-13-45T99:00:00Z"),
        ("subject", False),
        ("datacontenttype", None),
        ("dataschema", 1),
        ("correlationid", 7),
    ],
)
def test_wrong_type_for_an_envelope_attribute_is_an_invalid_envelope(
    field: str, wrong: Any
) -> None:
    for outcome in check_contract(json.dumps({**VALID, field: wrong})):
        assert isinstance(outcome, InvalidEnvelope), outcome


@SETTINGS
@given(field=st.sampled_from(sorted(VALID["data"])), value=json_values)
def test_any_value_in_any_data_field_keeps_the_contract(field: str, value: Any) -> None:
    outcomes = check_contract(json.dumps({**VALID, "data": {**VALID["data"], field: value}}))

    for outcome in outcomes:
        assert isinstance(outcome, Event | SchemaViolation), outcome


@pytest.mark.parametrize(
    ("field", "wrong"),
    [
        ("site", 1),
        ("site", "has space"),
        ("site", "a.b"),
        ("device", None),
        ("channel", ""),
        ("channel", "x" * 65),
        ("payload", [1, 2]),
        ("payload", "text"),
        ("device_time", "noon"),
        ("device_time", [2026]),
    ],
)
def test_wrong_type_for_a_data_field_is_a_schema_violation(field: str, wrong: Any) -> None:
    for outcome in check_contract(json.dumps({**VALID, "data": {**VALID["data"], field: wrong}})):
        assert isinstance(outcome, SchemaViolation), outcome


@SETTINGS
@given(
    field=st.sampled_from(["id", "source", "type", "subject", "dataschema", "correlationid"]),
    size=st.integers(min_value=513, max_value=200_000),
)
def test_huge_attribute_strings_are_rejected_cleanly(field: str, size: int) -> None:
    for outcome in check_contract(json.dumps({**VALID, field: "x" * size})):
        assert isinstance(outcome, InvalidEnvelope), outcome


@settings(max_examples=25, deadline=None)
@given(
    extra=st.integers(min_value=1, max_value=256 * 1024),
    where=st.sampled_from(["payload", "extension"]),
)
def test_events_over_the_size_limit_are_payload_too_large(extra: int, where: str) -> None:
    pad = "p" * (REGISTRY.max_event_bytes + extra)
    document = (
        {**VALID, "data": {**VALID["data"], "payload": {"pad": pad}}}
        if where == "payload"
        else {**VALID, "padding": pad}
    )
    for outcome in check_contract(json.dumps(document).encode()):
        assert isinstance(outcome, PayloadTooLarge)


@SETTINGS
@given(version=st.integers(min_value=2, max_value=10**40))
def test_unknown_newer_versions_are_unsupported(version: int) -> None:
    document = {**VALID, "dataschema": schema_uri(READING, version)}
    for outcome in check_contract(json.dumps(document)):
        assert isinstance(outcome, UnsupportedVersion | InvalidEnvelope)  # > 512 chars
        if len(document["dataschema"]) <= 512:
            assert isinstance(outcome, UnsupportedVersion)


@SETTINGS
@given(dataschema=st.text(max_size=80))
def test_arbitrary_dataschema_is_either_ours_or_an_invalid_envelope(dataschema: str) -> None:
    for outcome in check_contract(json.dumps({**VALID, "dataschema": dataschema})):
        if isinstance(outcome, Event):
            assert outcome.dataschema == schema_uri(READING, 1)
        else:
            assert isinstance(outcome, InvalidEnvelope | UnsupportedVersion), outcome


@SETTINGS
@given(json_values)
def test_random_json_values_keep_the_contract(value: Any) -> None:
    for outcome in check_contract(json.dumps(value)):
        assert not isinstance(outcome, Event)


envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.just("1.0") | json_values,
        "id": st.text(min_size=1, max_size=20) | json_values,
        "source": st.just("/s") | json_values,
        "type": st.sampled_from([READING, GAUGE, "edgebus.error", "nope"]) | json_values,
        "time": st.just("2026-01-01T00:00:00Z") | json_values,
        "subject": json_values,
        "datacontenttype": st.just("application/json") | json_values,
        "dataschema": st.sampled_from(
            [schema_uri(GAUGE, v) for v in (0, 1, 2, 3)] + [schema_uri(READING, 1)]
        )
        | json_values,
        "data": st.fixed_dictionaries({}, optional={"level": json_values, "scale": json_values})
        | json_values,
        "ext": json_values,
    },
)


@SETTINGS
@given(envelope_like)
def test_envelope_shaped_objects_keep_the_contract_across_versions(
    document: dict[str, Any],
) -> None:
    raw = json.dumps(document)
    check_contract(raw)
    for outcome in check_contract(raw, GAUGES, GaugeV2):
        if isinstance(outcome, Event):
            assert isinstance(outcome.data, GaugeV2)
            assert outcome.dataschema == schema_uri(GAUGE, 2)


@SETTINGS
@given(level=json_values, extra=st.dictionaries(st.text(max_size=6), json_values, max_size=3))
def test_upcasting_bad_old_data_is_a_schema_violation_never_a_crash(
    level: Any, extra: dict[str, Any]
) -> None:
    document = {
        **VALID,
        "type": GAUGE,
        "dataschema": schema_uri(GAUGE, 1),
        "data": {"level": level, **extra},
    }
    for outcome in check_contract(json.dumps(document), GAUGES, GaugeV2):
        if isinstance(outcome, Event):
            assert outcome.data.level == level * 10
        else:
            assert isinstance(outcome, SchemaViolation), outcome
