"""The alarms service's pure logic: applying raises, clears and acknowledgements to records,
flap detection, storm notices, site summaries and health. No server.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated

import pytest
import typing_extensions
from pydantic import BaseModel, TypeAdapter

from bus.pullfeed import stream_seq, waiting_in_stream
from schemas import REGISTRY, Event, new_event
from schemas.alarms import (
    AlarmAcknowledged,
    AlarmCleared,
    AlarmRaised,
    AlarmRecord,
    AlarmState,
    NoticeKind,
    Severity,
    SiteHealth,
    alarm_id,
)
from schemas.errors import (
    EventDecodeError,
    InvalidEnvelope,
    MalformedEvent,
    PayloadTooLarge,
    SchemaViolation,
    UnknownEventType,
    UnsupportedVersion,
)
from services.alarms.inputs import (
    CLEARED,
    RAISED,
    ChangeDecoder,
    ClearedEvent,
    ClearedFields,
    RaisedEvent,
    RaisedFields,
    TaggedCleared,
    TaggedRaised,
    origin_problem,
    site_of,
)
from services.alarms.state import (
    AlarmEntry,
    FlapPolicy,
    alarm_key,
    apply_ack,
    apply_cleared,
    apply_raised,
    prunable,
    select,
    settle_flapping,
    summarize,
    totals,
    worst_first,
)
from services.alarms.storm import StormGuard, StormPolicy

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = FlapPolicy(window_s=60, threshold=4, quiet_s=120)
UP = "UP_ALARM"


def raised(
    at: datetime,
    site: str = "s1",
    entity: str = "pump",
    cause: str = "hot",
    severity: Severity = Severity.MAJOR,
    text: str = "hot",
) -> RaisedFields:
    """A raise as the leader gets it (`AlarmRaised(**raised(...))`: the event's data)."""
    return RaisedFields(
        alarm_id=alarm_id(site, entity, cause),
        site=site,
        entity=entity,
        severity=severity,
        probable_cause=cause,
        text=text,
        raised_at=at,
    )


def cleared(
    at: datetime, site: str = "s1", entity: str = "pump", cause: str = "hot"
) -> ClearedFields:
    return ClearedFields(
        alarm_id=alarm_id(site, entity, cause),
        site=site,
        entity=entity,
        probable_cause=cause,
        text="ok",
        cleared_at=at,
    )


def flap(
    record: AlarmEntry | None, changes: list[RaisedFields | ClearedFields], first_seq: int = 1
):
    seq = first_seq
    for change in changes:
        if "raised_at" in change:
            after = apply_raised(record, change, source=UP, seq=seq, now=T0, policy=POLICY)
        else:
            after = apply_cleared(record, change, source=UP, seq=seq, now=T0, policy=POLICY)
        record = after or record
        seq += 1
    return record


# -- raise / clear ------------------------------------------------------------------------------


def test_raise_then_raise_again_is_idempotent_and_keeps_the_first_time() -> None:
    first = apply_raised(None, raised(T0), source=UP, seq=1, now=T0, policy=POLICY)
    assert first is not None and first.state is AlarmState.ACTIVE and first.raised_at == T0
    again = raised(T0 + timedelta(seconds=5), text="still hot")
    assert apply_raised(first, again, source=UP, seq=2, now=T0, policy=POLICY) is None


def test_clear_needs_the_matching_active_alarm() -> None:
    assert apply_cleared(None, cleared(T0), source=UP, seq=1, now=T0, policy=POLICY) is None
    record = apply_raised(None, raised(T0), source=UP, seq=1, now=T0, policy=POLICY)
    done = apply_cleared(
        record, cleared(T0 + timedelta(seconds=9)), source=UP, seq=2, now=T0, policy=POLICY
    )
    assert done is not None and done.state is AlarmState.CLEARED
    assert done.cleared_at == T0 + timedelta(seconds=9) and done.raised_at == T0
    assert apply_cleared(done, cleared(T0), source=UP, seq=3, now=T0, policy=POLICY) is None


def test_a_redelivered_change_is_recognised_by_its_stream_sequence() -> None:
    record = apply_raised(None, raised(T0), source=UP, seq=10, now=T0, policy=POLICY)
    done = apply_cleared(record, cleared(T0), source=UP, seq=11, now=T0, policy=POLICY)
    # The raise at seq 10 comes back after a crash (its ack was lost): not raised again.
    assert apply_raised(done, raised(T0), source=UP, seq=10, now=T0, policy=POLICY) is None
    # A later raise is new.
    again = apply_raised(
        done, raised(T0 + timedelta(minutes=1)), source=UP, seq=12, now=T0, policy=POLICY
    )
    assert again is not None and again.occurrences == 2 and again.transitions == 3


def test_a_new_occurrence_forgets_the_previous_acknowledgement() -> None:
    record = apply_raised(None, raised(T0), source=UP, seq=1, now=T0, policy=POLICY)
    assert record is not None
    ack = AlarmAcknowledged(alarm_id=record.alarm_id, site="s1", raised_at=T0, by="ann", at=T0)
    acked = apply_ack(record, ack, now=T0)
    assert acked is not None and acked.acknowledged and acked.acknowledged_by == "ann"
    assert apply_ack(acked, ack.model_copy(update={"by": "bob"}), now=T0) is None  # first stays
    done = apply_cleared(
        acked, cleared(T0 + timedelta(minutes=5)), source=UP, seq=2, now=T0, policy=POLICY
    )
    assert done is not None and done.acknowledged  # the cleared occurrence stays acknowledged
    later = T0 + timedelta(minutes=10)
    again = apply_raised(done, raised(later), source=UP, seq=3, now=T0, policy=POLICY)
    assert again is not None and not again.acknowledged
    assert apply_ack(again, ack, now=T0) is None  # acknowledges the old occurrence: ignored


# -- flapping -----------------------------------------------------------------------------------


def test_flapping_starts_at_the_threshold_within_the_window_and_settles_when_quiet() -> None:
    changes: list[AlarmRaised | AlarmCleared] = []
    for i in range(10):
        at = T0 + timedelta(seconds=2 * i)
        changes.append(raised(at) if i % 2 == 0 else cleared(at))
    record = flap(None, changes[:3])
    assert record is not None and not record.flapping
    record = flap(record, changes[3:4], first_seq=4)
    assert record.flapping and record.flapping_since == T0 + timedelta(seconds=6)
    record = flap(record, changes[4:], first_seq=5)
    assert record.flapping and record.suppressed == 6 and record.transitions == 10
    assert record.state is AlarmState.CLEARED and record.open  # flapping keeps it in view

    last = record.last_transition_at
    assert settle_flapping(record, last + timedelta(seconds=119), POLICY) is None
    settled = settle_flapping(record, last + timedelta(seconds=120), POLICY)
    assert settled is not None and not settled.flapping and not settled.open


def test_slow_changes_spread_over_windows_never_flap() -> None:
    changes: list[AlarmRaised | AlarmCleared] = []
    for i in range(20):
        at = T0 + timedelta(seconds=20 * i)  # 3 changes per 60 s window, threshold 4
        changes.append(raised(at) if i % 2 == 0 else cleared(at))
    record = flap(None, changes)
    assert record is not None and not record.flapping and record.transitions == 20


def test_storm_guard_rate_limits_per_site_and_summarises() -> None:
    guard = StormGuard(StormPolicy(site_rate_per_s=1, site_burst=3, summary_every_s=10))
    record = apply_raised(None, raised(T0), source=UP, seq=1, now=T0, policy=POLICY)
    assert record is not None
    told = [len(guard.on_change(record, False, now_s=0.0, at=T0)) for _ in range(5)]
    assert told == [1, 1, 1, 0, 0]  # burst of 3, then held back
    other = replace(record, site="s2")
    assert len(guard.on_change(other, False, now_s=0.0, at=T0)) == 1  # budgets are per site
    assert len(guard.on_change(record, False, now_s=1.5, at=T0)) == 1  # refilled 1/s
    assert guard.tick([], now_s=5.0, at=T0) == []  # summary not due yet
    summaries = guard.tick([], now_s=10.0, at=T0)
    assert [(n.notice.kind, n.notice.site, n.notice.suppressed, n.store) for n in summaries] == [
        (NoticeKind.SITE_STORM, "s1", 2, True)
    ]


def test_storm_guard_tells_flapping_once_then_summaries_then_the_end() -> None:
    guard = StormGuard(StormPolicy(site_rate_per_s=100, site_burst=100, summary_every_s=10))
    changes: list[AlarmRaised | AlarmCleared] = []
    for i in range(4):
        at = T0 + timedelta(seconds=i)
        changes.append(raised(at) if i % 2 == 0 else cleared(at))
    entry = flap(None, changes[:3])
    assert entry is not None and not entry.flapping
    flap(entry, changes[3:], first_seq=4)
    started = guard.on_change(entry, False, now_s=0.0, at=T0)
    assert [(n.notice.kind, n.store, n.live) for n in started] == [
        (NoticeKind.FLAPPING_STARTED, True, True)
    ]
    flap(entry, [raised(T0 + timedelta(seconds=5)), cleared(T0 + timedelta(seconds=6))], 5)
    assert guard.on_change(entry, True, now_s=1.0, at=T0) == []  # flapping: summarised later
    summary = guard.tick([entry], now_s=10.0, at=T0)
    assert [(n.notice.kind, n.notice.suppressed) for n in summary] == [(NoticeKind.FLAP_SUMMARY, 2)]
    assert guard.tick([entry], now_s=30.0, at=T0) == []  # nothing new since
    suppressed = entry.suppressed
    assert settle_flapping(entry, T0 + timedelta(hours=1), POLICY) is entry
    ended = guard.on_settled(entry, suppressed, T0 + timedelta(hours=1))
    assert [(n.notice.kind, n.notice.suppressed, n.store) for n in ended] == [
        (NoticeKind.FLAPPING_ENDED, 2, True)
    ]


# -- reads ----------------------------------------------------------------------------------------


def record_of(
    site: str, entity: str, severity: Severity, *, active: bool = True, acked: bool = False
) -> AlarmRecord:
    entry = apply_raised(
        None,
        raised(T0, site=site, entity=entity, severity=severity),
        source=UP,
        seq=1,
        now=T0,
        policy=POLICY,
    )
    assert entry is not None
    if acked:
        ack = AlarmAcknowledged(alarm_id=entry.alarm_id, site=site, raised_at=T0, by="x", at=T0)
        apply_ack(entry, ack, now=T0)
    if not active:
        gone = cleared(T0, site=site, entity=entity)
        apply_cleared(entry, gone, source=UP, seq=2, now=T0, policy=POLICY)
    return entry.record()


def test_summary_counts_open_alarms_and_rolls_up_health() -> None:
    records = [
        record_of("s1", "a", Severity.CRITICAL),
        record_of("s1", "b", Severity.WARNING, acked=True),
        record_of("s2", "a", Severity.MINOR),
        record_of("s2", "b", Severity.CRITICAL, active=False),  # cleared: not counted
        record_of("s3", "a", Severity.WARNING),  # warnings only: still ok
    ]
    per_site = summarize(records)
    assert per_site["s1"].health is SiteHealth.CRITICAL
    assert (per_site["s1"].critical, per_site["s1"].warning, per_site["s1"].unacknowledged) == (
        1,
        1,
        1,
    )
    assert per_site["s2"].health is SiteHealth.DEGRADED and per_site["s2"].critical == 0
    assert per_site["s3"].health is SiteHealth.OK
    assert [s.site for s in worst_first(per_site.values())] == ["s1", "s2", "s3"]
    assert totals(per_site.values()) == {"critical": 1, "major": 0, "minor": 1, "warning": 2}


def test_select_filters_and_orders_worst_first() -> None:
    records = [
        record_of("s1", "a", Severity.WARNING),
        record_of("s1", "b", Severity.CRITICAL),
        record_of("s2", "a", Severity.MAJOR),
        record_of("s2", "b", Severity.MAJOR, active=False),
    ]
    found, total = select(records, site=None, severity=None, include_cleared=False, limit=2)
    assert total == 3 and [r.alarm_id for r in found] == ["s1/b/hot", "s2/a/hot"]
    found, total = select(records, site="s2", severity=None, include_cleared=True, limit=10)
    assert [r.state for r in found] == [AlarmState.ACTIVE, AlarmState.CLEARED]
    found, _ = select(records, site=None, severity=Severity.WARNING, include_cleared=False, limit=9)
    assert [r.alarm_id for r in found] == ["s1/a/hot"]


def test_prunable_only_long_cleared_settled_alarms() -> None:
    gone = AlarmEntry.of(record_of("s1", "a", Severity.MAJOR, active=False))
    assert not prunable(gone, T0 + timedelta(hours=1), retention_s=86400)
    assert prunable(gone, T0 + timedelta(days=2), retention_s=86400)
    still = AlarmEntry.of(record_of("s1", "b", Severity.MAJOR))
    assert not prunable(still, T0 + timedelta(days=9), 86400)


# -- what comes in --------------------------------------------------------------------------------


def test_alarm_keys_are_valid_kv_keys_and_distinct() -> None:
    ids = ["s1/pump/hot", "s1/pump.1/hot", "s1/pump_1/hot", "s1/dev:7/x/y", "s-2/a/b"]
    keys = [alarm_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert keys[0] == "s1.s1=2Fpump=2Fhot"
    assert all(
        k.replace("=", "").replace(".", "").replace("-", "").replace("_", "").isalnum()
        for k in keys
    )


def test_origin_checks_and_subjects() -> None:
    assert site_of("up.s1.alarm.pump") == "s1"
    assert site_of("up.s1.reading.pump") is None
    assert site_of("center.alarm.s7") == "s7"
    assert site_of("center.alarms.ack.s7") == "s7"
    good = raised(T0)
    assert origin_problem("s1", good) is None
    assert origin_problem("s2", good)[0] == "site_mismatch"  # type: ignore[index]
    forged = RaisedFields(**{**good, "alarm_id": "s1/other/hot"})
    assert origin_problem("s1", forged)[0] == "alarm_id_mismatch"  # type: ignore[index]
    assert origin_problem(None, good)[0] == "bad_subject"  # type: ignore[index]
    assert stream_seq("$JS.ACK.UP_ALARM.alarms.1.42.7.1795334654057014800.2") == 42
    assert stream_seq("$JS.ACK.hub.ACCHASH.UP_ALARM.alarms.1.43.7.17953346540.2.tok") == 43


def test_waiting_in_stream_reads_num_pending_of_either_reply_form() -> None:
    from nats.aio.msg import Msg

    for reply in (
        "$JS.ACK.UP_ALARM.alarms.1.42.7.1795334654057014800.2",
        "$JS.ACK.hub.ACCHASH.UP_ALARM.alarms.1.43.7.17953346540.2.tok",
        "$JS.ACK.hub.ACCHASH.UP_ALARM.alarms.1.43.7.17953346540.2",
    ):
        assert waiting_in_stream(reply) == Msg.Metadata._from_reply(reply).num_pending == 2
    assert waiting_in_stream("_INBOX.abc") == 0


def test_change_decoder_reads_both_kinds() -> None:
    decode = ChangeDecoder()
    up = REGISTRY.encode(new_event(AlarmRaised(**raised(T0)), source="/sites/s1"))
    down = REGISTRY.encode(new_event(AlarmCleared(**cleared(T0)), source="/sites/s1"))
    tricky = REGISTRY.encode(
        new_event(
            AlarmRaised(**raised(T0, text='"type":"edgebus.alarm.cleared"')), source="/sites/s1"
        )
    )
    assert isinstance(decode(up).data, AlarmRaised)
    assert isinstance(decode(down).data, AlarmCleared)
    assert isinstance(decode(tricky).data, AlarmRaised)


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda raw: raw.replace(b':v1"', b':v9"'), UnsupportedVersion),  # newer than us
        (lambda raw: raw.replace(b'"site":"s1"', b'"site":7'), SchemaViolation),
        (
            lambda raw: raw.replace(b"edgebus.alarm.raised", b"edgebus.alarm.fixed"),
            UnknownEventType,
        ),
        (lambda raw: raw.replace(b"alarm.raised:v1", b"alarm.cleared:v1"), InvalidEnvelope),
        (lambda raw: raw[:-1], MalformedEvent),
        (lambda raw: raw + b" " * 2_000_000, PayloadTooLarge),
    ],
)
def test_change_decoder_gives_the_registry_s_reasons_for_what_its_fast_path_refuses(
    mangle: Callable[[bytes], bytes], error: type[EventDecodeError]
) -> None:
    """The one tagged validation takes only a current raise or clear; all else goes to the
    registry, which names what is wrong (the reason a dead letter records)."""
    raw = REGISTRY.encode(new_event(AlarmRaised(**raised(T0)), source="/sites/s1"))
    with pytest.raises(error):
        ChangeDecoder()(mangle(raw))


def test_change_decoder_s_fast_path_gives_what_the_registry_gives() -> None:
    decode = ChangeDecoder()
    for data in (AlarmRaised(**raised(T0)), AlarmCleared(**cleared(T0))):
        raw = REGISTRY.encode(new_event(data, source="/sites/s1", subject="x", correlation_id="c"))
        fast = decode(raw)
        assert isinstance(fast, TaggedRaised | TaggedCleared)  # not the registry's way
        slow = REGISTRY.decoder_for(type(data))(raw)
        assert fast.model_dump() == slow.model_dump()
        assert REGISTRY.encode(fast) == raw


@pytest.mark.parametrize(
    ("fields", "model"), [(RaisedFields, AlarmRaised), (ClearedFields, AlarmCleared)]
)
def test_the_hot_path_s_dicts_mirror_the_event_models(fields: type, model: type[BaseModel]) -> None:
    """Same names, types and constraints; a field with a default is the one key that may be
    absent. A field added to a model, or a constraint changed, fails here first."""
    hints = typing_extensions.get_type_hints(fields, include_extras=True)
    assert hints.keys() == model.model_fields.keys()
    for name, info in model.model_fields.items():
        hint = hints[name]
        optional = typing_extensions.get_origin(hint) is typing_extensions.NotRequired
        assert optional is not info.is_required(), name
        if optional:
            (hint,) = typing.get_args(hint)
        base, *metadata = typing.get_args(hint) if typing.get_origin(hint) is Annotated else (hint,)
        assert base == info.annotation, name
        # The constraint objects have no equality of their own: compared by what they say.
        assert [repr(m) for meta in metadata for m in meta.metadata] == [
            repr(m) for m in info.metadata
        ], name
    assert fields.__pydantic_config__ == {"extra": model.model_config["extra"]}  # type: ignore[attr-defined]


def test_the_hot_path_s_event_literals_are_the_registered_type_and_version() -> None:
    for event, model, name in (
        (RaisedEvent, AlarmRaised, RAISED),
        (ClearedEvent, AlarmCleared, CLEARED),
    ):
        hints = typing.get_type_hints(event)
        assert typing.get_args(hints["type"]) == (model.event_type,) == (name,)
        assert typing.get_args(hints["dataschema"]) == (model.event_schema_uri,)
    envelope = {name for name in Event.model_fields if name not in ("type", "dataschema", "data")}
    assert set(typing.get_type_hints(RaisedEvent)) == envelope | {"type", "dataschema", "data"}


def test_change_decoder_s_fields_are_the_model_s_fields() -> None:
    decode = ChangeDecoder()
    for data in (
        AlarmRaised(**raised(T0)),
        AlarmCleared(**cleared(T0)),
        AlarmCleared(**{**cleared(T0), "text": ""}),
    ):
        event = new_event(data, source="/sites/s1", subject="x", correlation_id="c")
        raw = REGISTRY.encode(event)
        fields = decode.fields(raw)
        assert fields["type"] == data.event_type
        assert type(data)(**fields["data"]) == data
        assert fields["time"] == event.time and fields["id"] == event.id
    # A clear whose text is left out (the model's default) decodes without it.
    bare = REGISTRY.encode(new_event(AlarmCleared(**cleared(T0)), source="/sites/s1")).replace(
        b',"text":"ok"', b""
    )
    assert "text" not in decode.fields(bare)["data"]
    assert decode(bare).data.text == ""


def test_change_decoder_s_fields_by_the_registry_are_the_fast_path_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the one validation does not take (an older version, once there is one) is decoded
    by the registry and given as the same dicts."""
    import services.alarms.inputs as inputs

    raw = REGISTRY.encode(
        new_event(AlarmCleared(**cleared(T0)), source="/sites/s1", subject="x", correlation_id="c")
    )
    fast = ChangeDecoder().fields(raw)

    def refuse(raw: bytes) -> None:
        TypeAdapter(int).validate_json(raw)  # raises: an event is no int

    monkeypatch.setattr(inputs, "_TAGGED_FIELDS", refuse)
    assert ChangeDecoder().fields(raw) == fast


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw.replace(b'"site":"s1"', b'"site":7'),
        lambda raw: raw.replace(b'"entity":"pump"', b'"entity":"pu mp"'),  # pattern
        lambda raw: raw.replace(b'"severity":"major"', b'"severity":"dire"'),
        lambda raw: raw.replace(b'"raised_at":"', b'"raised_at":"x'),
        lambda raw: raw.replace(b'"text":"hot"', b'"text":"hot","extra":1'),  # data is closed
        lambda raw: raw.replace(b'"text":"hot"', b'"text":"' + b"h" * 2001 + b'"'),
        lambda raw: raw.replace(b'"specversion":"1.0"', b'"specversion":"0.3"'),
        lambda raw: raw.replace(b'"source":"/sites/s1"', b'"source":""'),
        lambda raw: raw.replace(b'Z"', b'"', 1),  # a naive event time
        lambda raw: raw.replace(b',"subject":"x"', b',"subject":""'),
    ],
)
def test_change_decoder_s_fields_refuse_what_the_models_refuse(
    mangle: Callable[[bytes], bytes],
) -> None:
    good = REGISTRY.encode(new_event(AlarmRaised(**raised(T0)), source="/sites/s1", subject="x"))
    raw = mangle(good)
    assert raw != good
    with pytest.raises(EventDecodeError) as by_models:
        REGISTRY.decoder_for(AlarmRaised)(raw)
    with pytest.raises(EventDecodeError) as by_fields:
        ChangeDecoder().fields(raw)
    assert by_fields.value.reason == by_models.value.reason


def test_extension_attributes_pass_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted whatever their value, as `Event` accepts them; the dicts leave them out, by
    the one validation and by the registry alike."""
    import services.alarms.inputs as inputs

    raw = REGISTRY.encode(new_event(AlarmRaised(**raised(T0)), source="/sites/s1"))
    raw = raw.replace(b'{"specversion"', b'{"traceparent":"00-ab","ext":{"n":[1]},"specversion"')
    fast = ChangeDecoder().fields(raw)
    assert fast["data"]["site"] == "s1"
    assert "traceparent" not in fast and "ext" not in fast
    assert ChangeDecoder()(raw).data.site == "s1"

    def refuse(raw: bytes) -> None:
        TypeAdapter(int).validate_json(raw)

    monkeypatch.setattr(inputs, "_TAGGED_FIELDS", refuse)
    assert ChangeDecoder().fields(raw) == fast


def test_flap_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FlapPolicy(threshold=1)


def test_storm_guard_limits_the_whole_fleet_and_summarises_per_site() -> None:
    policy = StormPolicy(
        site_rate_per_s=100, site_burst=100, fleet_rate_per_s=1, fleet_burst=4, summary_every_s=10
    )
    guard = StormGuard(policy)
    told: dict[str, int] = {}
    for n in range(10):  # ten calm sites, one change each, all at once: a regional storm
        site = f"s{n}"
        record = apply_raised(None, raised(T0, site=site), source=UP, seq=1, now=T0, policy=POLICY)
        assert record is not None
        told[site] = len(guard.on_change(record, False, now_s=0.0, at=T0))
    assert sum(told.values()) == 4  # the fleet's burst, though each site had budget left
    assert guard.held_back == 6
    late = apply_raised(None, raised(T0, site="s0"), source=UP, seq=2, now=T0, policy=POLICY)
    assert late is not None
    assert len(guard.on_change(late, False, now_s=2.0, at=T0)) == 1  # refilled 1/s
    summaries = guard.tick([], now_s=10.0, at=T0)
    held = {n.notice.site: n.notice.suppressed for n in summaries}
    assert held == {f"s{n}": 1 for n in range(4, 10)}
    assert all(n.notice.kind is NoticeKind.SITE_STORM and n.store for n in summaries)


def test_the_rules_change_an_entry_in_place_and_its_record_is_the_validated_one() -> None:
    entry = apply_raised(None, raised(T0), source=UP, seq=1, now=T0, policy=POLICY)
    assert entry is not None
    ack = AlarmAcknowledged(alarm_id=entry.alarm_id, site="s1", raised_at=T0, by="ann", at=T0)
    assert apply_ack(entry, ack, now=T0) is entry
    done = apply_cleared(entry, cleared(T0), source=UP, seq=2, now=T0, policy=POLICY)
    assert done is entry and entry.state is AlarmState.CLEARED and entry.transitions == 2
    record = entry.record()
    # Written without building the record: the bytes the validated record serialises to.
    validated = AlarmRecord.model_validate(asdict(entry))
    assert entry.encoded() == validated.model_dump_json().encode()
    assert record == validated
    assert AlarmEntry.of(record) == entry
    flap(entry, [raised(T0 + timedelta(seconds=n)) if n % 2 else cleared(T0) for n in range(9)], 3)
    assert entry.flapping and entry.flapping_since is not None  # optional fields set too
    assert entry.encoded() == AlarmRecord.model_validate(asdict(entry)).model_dump_json().encode()
    assert record.acknowledged and not record.open and record.seq == 2
