"""`schemas.wire.encode_new_event`: the direct-to-bytes publish path decodes like `new_event`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import REGISTRY, new_event
from schemas.devices import DeviceReading
from schemas.wire import encode_new_event

READING = DeviceReading(site="s1", device="d1", channel="temp", payload={"value": 21.5, "u": "C"})


def test_wire_bytes_decode_to_the_same_event_new_event_builds() -> None:
    event_id, payload = encode_new_event(
        READING, source="/sites/s1", subject="d1/temp", correlation_id="corr-1"
    )
    decoded = REGISTRY.decode_as(payload, DeviceReading)
    expected = new_event(
        READING,
        source="/sites/s1",
        subject="d1/temp",
        correlation_id="corr-1",
        event_id=event_id,
        time=decoded.time,
    )
    assert decoded == expected
    assert decoded.time.tzinfo is not None


def test_optional_attributes_are_left_out_when_unset() -> None:
    _, payload = encode_new_event(READING, source="/sites/s1")
    decoded = REGISTRY.decode_as(payload, DeviceReading)
    assert decoded.subject is None and decoded.correlationid is None
    assert b'"subject"' not in payload and b"null" not in payload.split(b'"data"')[0]


def test_ids_are_fresh_and_time_ordered() -> None:
    ids = [encode_new_event(READING, source="/s")[0] for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("field", "value"),
    [("source", ""), ("source", "x" * 513), ("subject", ""), ("correlation_id", "c" * 129)],
)
def test_invalid_attributes_are_refused_before_anything_is_sent(field: str, value: str) -> None:
    kwargs = {"source": "/s", field: value}
    with pytest.raises(ValueError, match="CloudEvents attribute"):
        encode_new_event(READING, **kwargs)


def test_an_unregistered_payload_is_refused() -> None:
    from schemas.envelope import EventData

    class Loose(EventData):
        x: int

    with pytest.raises(TypeError, match="not a registered"):
        encode_new_event(Loose(x=1), source="/s")


@settings(max_examples=200, deadline=None)
@given(
    source=st.text(min_size=1, max_size=100),
    subject=st.none() | st.text(min_size=1, max_size=100),
)
def test_any_attribute_text_round_trips_exactly(source: str, subject: str | None) -> None:
    event_id, payload = encode_new_event(READING, source=source, subject=subject)
    decoded = REGISTRY.decode_as(payload, DeviceReading)
    assert (decoded.id, decoded.source, decoded.subject, decoded.data) == (
        event_id,
        source,
        subject,
        READING,
    )


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=4_102_444_800 * 10**9))  # 1970 .. 2100
def test_the_event_clock_prints_what_isoformat_prints_for_the_same_instant(now_ns: int) -> None:
    from datetime import UTC, datetime, timedelta

    from schemas.wire import _UtcClock

    second, rest_ns = divmod(now_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(second, UTC) + timedelta(microseconds=rest_ns // 1000)
    clock = _UtcClock()
    assert clock.at_ns(now_ns) == moment.isoformat(timespec="microseconds")
    assert clock.at_ns(now_ns) == moment.isoformat(timespec="microseconds")  # cached second
