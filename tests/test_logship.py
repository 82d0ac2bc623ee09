"""Log shipping without servers: the `bus.log` tap and live level, the bounded ship queue,
record conversion, `LogConfig`, and the reading helpers of `edgebus logs`."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from bus import log as buslog
from bus.log import LogTap, add_tap, get_logger, remove_tap, set_level
from edge_agent.logship.queue import SHIPPER_COMPONENT, ShipQueue
from edge_agent.logship.records import MAX_VALUE_CHARS, OMITTED_KEY, to_log_record
from edgebus.logs import LogsCommandError, level_filters, parse_level, parse_since
from schemas import REGISTRY, new_event
from schemas.logs import (
    MAX_FIELDS,
    MAX_FIELDS_BYTES,
    LogConfig,
    LogLevel,
    LogRecord,
    fields_size,
    levels_at_or_above,
)
from schemas.sync import config_kinds

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Every test here may change the process's printed level and taps: put them back."""
    get_logger("tests")  # configured before we read the state
    printed, taps = buslog._levels.printed, buslog._levels.taps
    yield
    buslog._levels.printed, buslog._levels.taps = printed, taps


class Collect:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, level: str, record: Mapping[str, Any]) -> None:
        self.records.append((level, dict(record)))

    def events(self) -> list[str]:
        return [record["event"] for _, record in self.records]


# -- bus.log: taps and the live level ---------------------------------------------------------


def test_a_tap_sees_its_levels_whatever_is_printed(
    logging_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    collect = Collect()
    tap = LogTap(collect, level=30)
    add_tap(tap)
    log = get_logger("tests.tap", device="d1")
    set_level("error")
    log.info("quiet_info")
    log.warning("tapped_warning", n=1)
    log.error("tapped_error")
    assert collect.events() == ["tapped_warning", "tapped_error"]
    level, record = collect.records[0]
    assert (level, record["component"], record["device"], record["n"]) == (
        "warning",
        "tests.tap",
        "d1",
        1,
    )
    assert "timestamp" in record
    printed = capsys.readouterr().err
    assert "tapped_error" in printed and "tapped_warning" not in printed

    # The same logger object follows a level change made later (live, no re-creation).
    set_level("debug")
    log.debug("now_printed")
    assert "now_printed" in capsys.readouterr().err
    tap.level = 10
    log.debug("now_tapped")
    assert collect.events()[-1] == "now_tapped"

    remove_tap(tap)
    log.error("after_removal")
    assert "after_removal" not in collect.events()


def test_a_record_logged_inside_a_tap_is_printed_but_not_tapped_again(
    logging_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    inner = get_logger("tests.inner")

    def write(level: str, record: Mapping[str, Any]) -> None:
        calls.append(record["event"])
        inner.warning("logged_from_the_tap")  # would recurse for ever without the guard

    add_tap(LogTap(write, level=30))
    set_level("warning")
    get_logger("tests.outer").warning("outer")
    assert calls == ["outer"]
    assert "logged_from_the_tap" in capsys.readouterr().err


def test_a_failing_tap_does_not_break_logging(
    logging_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(level: str, record: Mapping[str, Any]) -> None:
        raise RuntimeError("sink down")

    collect = Collect()
    add_tap(LogTap(broken, level=30))
    add_tap(LogTap(collect, level=30))
    set_level("warning")
    get_logger("tests.broken").warning("still_printed")
    assert "still_printed" in capsys.readouterr().err
    assert collect.events() == ["still_printed"]  # the next tap still got it


def test_unknown_level_names_are_refused(logging_state: None) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        set_level("loud")


# -- the ship queue ---------------------------------------------------------------------------


def rec(event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "component": "tests", "timestamp": NOW.isoformat(), **fields}


def test_queue_is_bounded_and_reports_drops_at_the_highest_level_dropped() -> None:
    queue = ShipQueue("s1", capacity=3)
    for n in range(3):
        queue.write("warning", rec("kept", n=n))
    queue.write("warning", rec("dropped"))
    queue.write("error", rec("dropped"))
    queue.write("warning", rec("dropped"))
    assert (len(queue), queue.dropped_total) == (3, 3)

    kept = queue.take(10)
    assert [r.fields["n"] for r in kept] == [0, 1, 2] and len(queue) == 0
    summary = queue.take_drops(NOW)
    assert summary is not None
    assert summary.message == "3 records dropped" and summary.level is LogLevel.ERROR
    assert summary.fields["dropped"] == 3 and summary.logger == SHIPPER_COMPONENT
    assert queue.take_drops(NOW) is None  # reported once
    queue.write("warning", rec("room_again"))
    assert [r.message for r in queue.take(10)] == ["room_again"]


def test_queue_skips_the_shippers_own_records_and_other_sites() -> None:
    woken: list[int] = []
    queue = ShipQueue("s1")
    queue.set_waker(lambda: woken.append(1))
    queue.write("error", {**rec("own_trouble"), "component": SHIPPER_COMPONENT})
    queue.write("error", rec("other_site", site="s2"))
    queue.write("error", rec("this_site", site="s1"))
    queue.write("error", rec("no_site_bound"))
    # About a shipped record (the forwarder dead-lettering one): shipping it would loop.
    queue.write("warning", {**rec("dead_letter"), "subject": "replay.s1.log.warning"})
    queue.write("warning", {**rec("about_a_reading"), "subject": "replay.s1.reading.d1"})
    assert [r.message for r in queue.take(10)] == ["this_site", "no_site_bound", "about_a_reading"]
    assert woken == [1]  # woken once: when it stopped being empty


def test_queue_takes_real_log_calls_at_the_ship_level(logging_state: None) -> None:
    queue = ShipQueue("s1", ship_level="warning")
    add_tap(queue.tap)
    set_level("critical")  # nothing printed, yet shipped
    log = get_logger("tests.ship", device="pump-7", event_id="01HX", correlation_id="c-9")
    log.info("not_shipped")
    log.warning("shipped", reason="overheat")
    get_logger(SHIPPER_COMPONENT).error("never_shipped")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("crashed")
    queue.set_ship_level("info")
    log.info("shipped_after_change")
    records = queue.take(10)
    assert [(r.message, r.level) for r in records] == [
        ("shipped", LogLevel.WARNING),
        ("crashed", LogLevel.ERROR),
        ("shipped_after_change", LogLevel.INFO),
    ]
    first = records[0]
    assert (first.device, first.event_id, first.correlation_id) == ("pump-7", "01HX", "c-9")
    assert first.fields == {"reason": "overheat"} and first.logger == "tests.ship"
    assert abs(first.timestamp - datetime.now(UTC)) < timedelta(seconds=30)
    assert records[1].exception is not None and "ValueError: boom" in records[1].exception


# -- conversion -------------------------------------------------------------------------------


def test_conversion_bounds_fields_and_keeps_them_json() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    record = rec(
        "big",
        text="x" * 5000,
        nested={"a": [1, 2, {"b": float("nan")}], "when": NOW},
        obj=Opaque(),
        **{f"k{i}": "v" * 200 for i in range(40)},
    )
    converted = to_log_record("s1", "warning", record, NOW)
    fields = converted.fields
    assert len(fields["text"]) == MAX_VALUE_CHARS  # type: ignore[arg-type]
    assert fields["nested"] == {"a": [1, 2, {"b": "nan"}], "when": NOW.isoformat()}
    assert fields["obj"] == "<opaque>"
    assert fields[OMITTED_KEY] > 0  # type: ignore[operator]
    assert len(fields) <= MAX_FIELDS and fields_size(dict(fields)) <= MAX_FIELDS_BYTES
    assert converted.timestamp == NOW
    # It travels: encoded and decoded by the registry like any event.
    event = new_event(converted, source="/sites/s1", time=converted.timestamp)
    decoded = REGISTRY.decode_as(REGISTRY.encode(event), LogRecord)
    assert decoded.data == converted and decoded.time == NOW


def test_record_schema_refuses_unbounded_fields() -> None:
    with pytest.raises(ValidationError, match="bytes as JSON"):
        LogRecord(
            site="s1",
            level=LogLevel.WARNING,
            logger="x",
            message="m",
            timestamp=NOW,
            fields={"big": "x" * (MAX_FIELDS_BYTES + 1)},
        )
    with pytest.raises(ValidationError):
        LogRecord(site="s1", level="loud", logger="x", message="m", timestamp=NOW)  # type: ignore[arg-type]


def test_log_config_is_a_strict_config_kind() -> None:
    assert config_kinds()["log"] is LogConfig and LogConfig.config_kind == "log"
    assert LogConfig().model_dump() == {"level": "info", "ship_level": "warning"}
    assert LogConfig(level="debug", ship_level="error").ship_level == "error"
    with pytest.raises(ValidationError):
        LogConfig(level="verbose")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        LogConfig.model_validate({"level": "info", "colour": True})


# -- reading helpers ------------------------------------------------------------------------


def test_levels_and_subject_filters() -> None:
    assert levels_at_or_above("warning") == (LogLevel.WARNING, LogLevel.ERROR, LogLevel.CRITICAL)
    assert level_filters("s1", "error") == ["up.s1.log.error", "up.s1.log.critical"]
    assert level_filters(None, "WARNING") == [
        "up.*.log.warning",
        "up.*.log.error",
        "up.*.log.critical",
    ]
    assert level_filters("s1", "debug") == ["up.s1.log.*"]  # every level: one filter
    with pytest.raises(LogsCommandError, match="not a level"):
        parse_level("loud")
    with pytest.raises(ValueError):
        level_filters("s.1", "error")  # not a subject token


def test_since_parses_durations_and_times() -> None:
    assert parse_since("10m", NOW) == NOW - timedelta(minutes=10)
    assert parse_since("1h", NOW) == NOW - timedelta(hours=1)
    assert parse_since("2d", NOW) == NOW - timedelta(days=2)
    assert parse_since("90", NOW) == NOW - timedelta(seconds=90)
    assert parse_since("2025-03-01T08:00:00Z", NOW) == datetime(2025, 3, 1, 8, tzinfo=UTC)
    assert parse_since("2025-03-01T08:00:00", NOW) == datetime(2025, 3, 1, 8, tzinfo=UTC)
    with pytest.raises(LogsCommandError, match="not a time"):
        parse_since("yesterday", NOW)


def test_json_lines_are_json() -> None:
    from edgebus.logs import ShippedLog, log_json

    record = to_log_record("s1", "error", rec("failed", device="d1", n=2), NOW)
    line = log_json(ShippedLog(record, "01ID", "up.s1.log.error", 7, NOW))
    assert json.loads(json.dumps(line)) == {
        "time": "2025-03-01T12:00:00.000Z",
        "site": "s1",
        "level": "error",
        "logger": "tests",
        "message": "failed",
        "fields": {"n": 2},
        "device": "d1",
        "id": "01ID",
        "seq": 7,
        "stored_at": "2025-03-01T12:00:00.000Z",
    }
