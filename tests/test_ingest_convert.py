"""`edge_agent.ingest.convert`: raw device message -> `DeviceReading` or a precise `Rejection`.

Pure: no server. Every rejection reason, every accepted timestamp form, topic parsing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from bus import subjects
from edge_agent.ingest.bridge import ingest_subject_for_topic
from edge_agent.ingest.convert import (
    IngestLimits,
    Rejection,
    device_message_key,
    device_time_of,
    reading_from_device_message,
)
from edge_agent.ingest.ordering import SequenceGate
from edge_agent.ingest.worker import delivery_of
from schemas.devices import DeviceReading

SITE = "s1"
SUBJECT = "dev.s1.pump-7.temp"


def convert(payload: bytes, subject: str = SUBJECT, **limits: int) -> DeviceReading | Rejection:
    return reading_from_device_message(SITE, subject, payload, IngestLimits(**limits))


def rejected(outcome: DeviceReading | Rejection) -> Rejection:
    assert isinstance(outcome, Rejection), f"expected a rejection, got {outcome!r}"
    return outcome


def accepted(outcome: DeviceReading | Rejection) -> DeviceReading:
    assert isinstance(outcome, DeviceReading), f"expected a reading, got {outcome!r}"
    return outcome


# -- accepted ------------------------------------------------------------------------


def test_reading_takes_device_and_channel_from_the_topic() -> None:
    reading = accepted(convert(b'{"temp": 21.5, "unit": "C", "nested": {"a": [1, 2]}}'))
    assert (reading.site, reading.device, reading.channel) == ("s1", "pump-7", "temp")
    assert reading.payload == {"temp": 21.5, "unit": "C", "nested": {"a": [1, 2]}}
    assert reading.device_time is None


def test_payload_fields_never_override_the_topic_address() -> None:
    # A device may not claim to be another device or site through its payload.
    reading = accepted(convert(b'{"device": "other", "site": "s9", "channel": "x", "v": 1}'))
    assert (reading.site, reading.device, reading.channel) == ("s1", "pump-7", "temp")
    assert reading.payload["device"] == "other"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            "2026-11-22T10:00:00.250Z",
            datetime(2026, 11, 22, 10, 0, 0, 250000, tzinfo=UTC),
            id="iso-z",
        ),
        pytest.param(
            "2026-11-22T12:00:00+02:00",
            datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC),
            id="iso-offset",
        ),
        pytest.param(
            "2026-11-22T10:00:00", datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC), id="iso-naive"
        ),
        pytest.param(1_795_000_000, datetime.fromtimestamp(1_795_000_000, UTC), id="epoch-s"),
        pytest.param(
            1_795_000_000.5, datetime.fromtimestamp(1_795_000_000.5, UTC), id="epoch-s-float"
        ),
        pytest.param(
            1_795_000_000_123,
            datetime.fromtimestamp(1_795_000_000.123, UTC),
            id="epoch-ms",
        ),
    ],
)
def test_device_timestamp_forms(value: object, expected: datetime) -> None:
    reading = accepted(convert(json.dumps({"ts": value, "v": 1}).encode()))
    assert reading.device_time is not None
    assert reading.device_time.tzinfo is not None
    assert abs(reading.device_time - expected) < timedelta(milliseconds=1)


def test_epoch_seconds_and_milliseconds_mean_the_same_instant() -> None:
    seconds = accepted(convert(b'{"ts": 1795000000}')).device_time
    millis = accepted(convert(b'{"ts": 1795000000000}')).device_time
    assert seconds == millis


@pytest.mark.parametrize("key", ["ts", "time", "timestamp"])
def test_every_timestamp_key_is_recognised(key: str) -> None:
    reading = accepted(convert(json.dumps({key: "2026-01-02T03:04:05Z"}).encode()))
    assert reading.device_time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_timestamp_key_precedence_is_ts_first() -> None:
    body = {"timestamp": "2020-01-01T00:00:00Z", "ts": "2026-01-01T00:00:00Z"}
    assert device_time_of(body) == datetime(2026, 1, 1, tzinfo=UTC)


def test_device_time_keeps_the_instant_of_an_offset() -> None:
    reading = accepted(convert(b'{"ts": "2026-11-22T05:30:00-04:30"}'))
    assert reading.device_time == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def test_payload_at_exactly_the_limit_is_accepted() -> None:
    body = b'{"v": "' + b"x" * 100 + b'"}'
    accepted(convert(body, max_payload_bytes=len(body)))


# -- rejected ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "payload", "reason"),
    [
        pytest.param("dev.s1.d1", b"{}", "topic", id="three-tokens"),
        pytest.param("dev.s1.d1.temp.extra", b"{}", "topic", id="five-tokens"),
        pytest.param("sensors.s1.d1.temp", b"{}", "topic", id="not-dev"),
        pytest.param("dev.s1.d1.", b"{}", "topic", id="empty-token"),
        pytest.param("dev.s2.d1.temp", b"{}", "foreign_site", id="foreign-site"),
        pytest.param(SUBJECT, b"not json", "malformed", id="not-json"),
        pytest.param(SUBJECT, b'{"v": 1', "malformed", id="truncated-json"),
        pytest.param(SUBJECT, b"\xff\xfe\x00", "malformed", id="binary"),
        pytest.param(SUBJECT, b"", "malformed", id="empty"),
        pytest.param(SUBJECT, b"[1, 2, 3]", "shape", id="array"),
        pytest.param(SUBJECT, b"42", "shape", id="number"),
        pytest.param(SUBJECT, b'"text"', "shape", id="string"),
        pytest.param(SUBJECT, b"null", "shape", id="null"),
        pytest.param(SUBJECT, b'{"ts": "yesterday"}', "device_time", id="bad-iso"),
        pytest.param(SUBJECT, b'{"ts": true}', "device_time", id="bool-time"),
        pytest.param(SUBJECT, b'{"ts": [1]}', "device_time", id="list-time"),
        pytest.param(SUBJECT, b'{"ts": 1e300}', "device_time", id="time-overflow"),
    ],
)
def test_rejection_reasons(subject: str, payload: bytes, reason: str) -> None:
    rejection = rejected(convert(payload, subject=subject))
    assert rejection.reason == reason
    assert rejection.detail  # always says why, for the dead-letter record


def test_oversize_is_rejected_before_parsing() -> None:
    body = json.dumps({"v": "x" * 200}).encode()
    rejection = rejected(convert(body, max_payload_bytes=100))
    assert rejection.reason == "oversize"
    assert str(len(body)) in rejection.detail and "100" in rejection.detail
    # Even a non-JSON body that is too large is reported as oversize, not malformed.
    assert rejected(convert(b"x" * 101, max_payload_bytes=100)).reason == "oversize"


def test_topic_is_checked_before_the_payload() -> None:
    assert rejected(convert(b"not json", subject="dev.s2.d1.t")).reason == "foreign_site"
    assert rejected(convert(b"not json", subject="dev.s1.d1")).reason == "topic"


def test_every_reason_is_a_valid_dead_letter_subject_token() -> None:
    reasons = {"topic", "foreign_site", "oversize", "malformed", "shape", "device_time", "schema"}
    for reason in reasons:
        assert subjects.dead_letter(SITE, "ingest", reason)


# -- topic and subject parsing -------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("dev.s1.d1.temp", ("s1", "d1", "temp")),
        ("dev.site_2.dev-9.ch_1", ("site_2", "dev-9", "ch_1")),
        ("dev.s1.d1", None),
        ("dev.s1.d1.temp.x", None),
        ("evt.s1.d1.temp", None),
        ("dev.s1.d 1.temp", None),
    ],
)
def test_parse_device_raw(subject: str, expected: tuple[str, str, str] | None) -> None:
    assert subjects.parse_device_raw(subject) == expected


def test_device_raw_round_trips_through_the_mqtt_topic() -> None:
    topic = subjects.mqtt_device_topic("s1", "d1", "temp")
    assert topic == "dev/s1/d1/temp"
    assert ingest_subject_for_topic("s1", topic) == subjects.device_raw("s1", "d1", "temp")
    assert subjects.parse_device_raw(subjects.device_raw("s1", "d1", "temp")) == (
        "s1",
        "d1",
        "temp",
    )


@pytest.mark.parametrize(
    "topic",
    [
        "dev/s1/d1",  # too short
        "dev/s1/d1/temp/x",  # too long
        "dev/s2/d1/temp",  # another site
        "dev/s1/d.1/temp",  # a dot would add a subject token
        "dev/s1/d1/t*",  # wildcard
        "dev/s1//temp",  # empty level
        "other/s1/d1/temp",
    ],
)
def test_bridge_rejects_topics_that_are_not_four_valid_tokens(topic: str) -> None:
    assert ingest_subject_for_topic("s1", topic) is None


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.INGEST.ingest.1.42.40.1700000000000000000.7", (1, 42)),
        ("$JS.ACK.s1.ACCHASH.INGEST.ingest.3.42.40.1700000000000000000.7.tok", (3, 42)),
        ("$JS.ACK.s1.ACCHASH.INGEST.ingest.2.9.8.1700000000000000000.0", (2, 9)),
    ],
)
def test_delivery_of_parses_both_ack_subject_formats(reply: str, expected: tuple[int, int]) -> None:
    assert delivery_of(reply) == expected


# -- stream-order gate (edge_agent.ingest.ordering, pure) ----------------------------


def test_gate_passes_a_contiguous_run_straight_through() -> None:
    gate: SequenceGate[str] = SequenceGate(next_seq=5)
    for seq in (5, 6, 7):
        gate.offer(seq, f"m{seq}")
    assert gate.release() == ["m5", "m6", "m7"]
    assert gate.next_seq == 8 and gate.blocked_at is None and len(gate) == 0


def test_gate_holds_newer_messages_behind_a_gap_until_it_fills() -> None:
    gate: SequenceGate[str] = SequenceGate(next_seq=1)
    for seq in (4, 5, 3):
        gate.offer(seq, f"m{seq}")
    assert gate.release() == []
    assert (gate.blocked_at, gate.lowest_waiting) == (1, 3)
    gate.offer(2, "m2")
    assert gate.release() == []
    gate.offer(1, "m1")
    assert gate.release() == ["m1", "m2", "m3", "m4", "m5"]


def test_gate_skips_a_gap_that_is_gone_from_the_stream() -> None:
    gate: SequenceGate[str] = SequenceGate(next_seq=1)
    gate.offer(7, "m7")
    gate.offer(8, "m8")
    assert gate.waiting() == ["m7", "m8"]
    gate.skip_to(7)
    assert gate.release() == ["m7", "m8"]
    gate.skip_to(3)  # never backwards
    assert gate.next_seq == 9


def test_gate_hands_on_late_redeliveries_at_once_and_dedupes_copies() -> None:
    gate: SequenceGate[str] = SequenceGate(next_seq=10)
    gate.offer(4, "late")  # already passed: a redelivery, idempotent downstream
    gate.offer(11, "old-copy")
    gate.offer(11, "new-copy")  # redelivered while waiting: one copy kept
    assert gate.release() == ["late"]
    gate.offer(10, "m10")
    assert gate.release() == ["m10", "new-copy"]


def _reading(device: str = "d1", channel: str = "t", **payload: object) -> DeviceReading:
    return DeviceReading(site="s1", device=device, channel=channel, payload=payload)


def test_device_message_key_dedups_a_resent_message_and_nothing_else() -> None:
    key = device_message_key(_reading(msg="a-1", v=1), "msg")
    assert key is not None and key.startswith("dev-")
    assert device_message_key(_reading(msg="a-1", v=2), "msg") == key  # a re-send
    assert device_message_key(_reading(device="d2", msg="a-1"), "msg") != key
    assert device_message_key(_reading(channel="h", msg="a-1"), "msg") != key
    assert device_message_key(_reading(msg="a-2"), "msg") != key
    assert device_message_key(_reading(msg=7), "msg") != device_message_key(
        _reading(msg="7"), "msg"
    )


def test_device_message_key_falls_back_when_there_is_no_usable_id() -> None:
    assert device_message_key(_reading(msg="a-1"), None) is None  # not configured
    assert device_message_key(_reading(other=1), "msg") is None  # absent
    for value in (True, 1.5, None, {"a": 1}, [1]):
        assert device_message_key(_reading(msg=value), "msg") is None, value
