"""Controller decisions without any server: tokens, availability, liveness wheel, records,
selection and paging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.controller import (
    Availability,
    Capacity,
    Inventory,
    Load,
    SiteChange,
    SiteRecord,
    SitesQuery,
)
from services.controller import records, tokens
from services.controller.availability import (
    AlarmAction,
    AvailabilityPolicy,
    alarm_on_managed_change,
    alarm_on_transition,
    assess,
    next_check,
    reassess,
    transition,
)
from services.controller.liveness import DeadlineWheel, Sighting
from services.controller.records import Refusal
from services.controller.selection import page, select
from services.controller.tokens import BootstrapToken, TokenVerdict

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
POLICY = AvailabilityPolicy(
    heartbeat_interval_s=10, degraded_after_s=25, offline_after_s=40, backlog_age_degraded_s=300
)
ON, DEG, OFF, PEND = (
    Availability.ONLINE,
    Availability.DEGRADED,
    Availability.OFFLINE,
    Availability.PENDING,
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def inventory(backlog_age_s: float = 0.0, version: str = "1.0.0") -> Inventory:
    return Inventory(
        agent_version=version,
        capacity=Capacity(cores=4, memory_bytes=8 << 30, disk_bytes=100 << 30),
        load=Load(cpu_percent=12.5, load1=0.4, memory_used_bytes=1 << 30, disk_used_bytes=5 << 30),
        device_count=3,
        replay_backlog=1000 if backlog_age_s else 0,
        replay_oldest_unsent_age_s=backlog_age_s,
    )


def record(site: str = "s1", **fields: object) -> SiteRecord:
    return SiteRecord.model_validate({"site": site, "added_at": T0, **fields})


# -- tokens ------------------------------------------------------------------------------


def test_a_minted_token_is_valid_once_and_until_it_expires() -> None:
    secret, rec = tokens.mint("s1", T0, ttl_s=60)

    assert secret not in rec.model_dump_json()  # only the hash is kept
    assert tokens.check(rec, secret, at(59)) == TokenVerdict.VALID
    assert tokens.check(rec, secret, at(60)) == TokenVerdict.EXPIRED
    assert tokens.check(rec, secret + "x", at(1)) == TokenVerdict.WRONG
    assert tokens.check(None, secret, at(1)) == TokenVerdict.UNKNOWN
    used = records.mark_token_used(rec, at(2), "UKEY1")
    assert tokens.check(used, secret, at(3)) == TokenVerdict.USED
    assert tokens.check(used, secret, at(3), "UOTHER") == TokenVerdict.USED
    # A used token stays "used" rather than "expired" once its time has passed too.
    assert tokens.check(used, secret, at(120)) == TokenVerdict.USED


def test_the_key_that_used_a_token_may_repeat_within_its_lifetime_only() -> None:
    secret, rec = tokens.mint("s1", T0, ttl_s=60)
    used = records.mark_token_used(rec, at(2), "UKEY1")
    onboarded = records.mark_onboarded(record(), at(2), "UKEY1", None)

    assert tokens.check(used, secret, at(3), "UKEY1") == TokenVerdict.REPEAT
    assert tokens.check(used, secret, at(60), "UKEY1") == TokenVerdict.USED  # expired
    assert tokens.check(used, "x" * 32, at(3), "UKEY1") == TokenVerdict.WRONG
    anonymous = records.mark_token_used(rec, at(2), None)
    assert tokens.check(anonymous, secret, at(3), None) == TokenVerdict.USED
    # The registry must agree: onboarded, and with that very key.
    assert records.onboard_verdict(onboarded, used, secret, at(3), "UKEY1") == TokenVerdict.REPEAT
    assert records.onboard_verdict(record(), used, secret, at(3), "UKEY1") == TokenVerdict.USED
    rekeyed = records.mark_onboarded(record(), at(2), "UKEY2", None)
    assert records.onboard_verdict(rekeyed, used, secret, at(3), "UKEY1") == TokenVerdict.USED


def test_two_mints_for_one_site_have_different_secrets() -> None:
    first, _ = tokens.mint("s1", T0, 60)
    second, rec = tokens.mint("s1", T0, 60)

    assert first != second
    assert tokens.check(rec, first, at(1)) == TokenVerdict.WRONG


def test_bootstrap_token_round_trips_and_rejects_garbage() -> None:
    token = BootstrapToken("s1", "sekret-" * 4, ("nats://center:4222", "nats://c2:4222"))

    text = token.encode()

    assert text.startswith("ebt1.") and "\n" not in text
    assert BootstrapToken.decode(f"  {text}\n") == token
    with pytest.raises(ValueError, match="prefix"):
        BootstrapToken.decode("abc")
    with pytest.raises(ValueError, match="malformed"):
        BootstrapToken.decode("ebt1.bm90IGpzb24")


def test_onboard_verdict_needs_the_site_in_the_registry() -> None:
    secret, rec = tokens.mint("s1", T0, 60)

    assert records.onboard_verdict(None, rec, secret, at(1)) == TokenVerdict.UNKNOWN
    assert records.onboard_verdict(record(), rec, secret, at(1)) == TokenVerdict.VALID


def test_every_refusal_has_a_message_that_names_the_site_and_the_fix() -> None:
    _, rec = tokens.mint("s7", T0, 60)
    used = records.mark_token_used(rec, at(5), None)

    for verdict, token in [
        (TokenVerdict.UNKNOWN, None),
        (TokenVerdict.WRONG, rec),
        (TokenVerdict.EXPIRED, rec),
        (TokenVerdict.USED, used),
    ]:
        message = records.refusal_message(verdict, "s7", token)
        assert "s7" in message, verdict
    assert "expired at" in records.refusal_message(TokenVerdict.EXPIRED, "s7", rec)
    assert "already used" in records.refusal_message(TokenVerdict.USED, "s7", used)


# -- availability --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("silent_s", "expected"),
    [(0, ON), (24.9, ON), (25, DEG), (39.9, DEG), (40, OFF), (4000, OFF)],
)
def test_assess_uses_the_thresholds(silent_s: float, expected: Availability) -> None:
    assert assess(T0, inventory(), at(silent_s), POLICY).availability == expected


def test_assess_never_seen_is_pending_and_an_old_backlog_degrades() -> None:
    assert assess(None, None, T0, POLICY).availability == PEND
    stale = assess(T0, inventory(backlog_age_s=301), at(1), POLICY)
    assert stale.availability == DEG
    assert "backlog" in stale.reason
    assert transition(ON, stale) == DEG
    assert transition(DEG, stale) is None


def test_policy_refuses_thresholds_out_of_order_and_scales_from_the_interval() -> None:
    with pytest.raises(ValueError):
        AvailabilityPolicy(heartbeat_interval_s=10, degraded_after_s=50, offline_after_s=40)
    scaled = AvailabilityPolicy.for_interval(0.2)
    assert (scaled.degraded_after_s, scaled.offline_after_s) == pytest.approx((0.5, 0.8))
    short = AvailabilityPolicy.for_interval(0.2, offline_after_s=0.5)
    assert 0.2 < short.degraded_after_s < 0.5


def test_reassess_after_a_restart_grants_one_grace_period_and_never_upgrades() -> None:
    grace = at(100)  # the controller (re)started here; nothing heard since
    # Persisted online: stays online through the grace, then degrades, then goes offline.
    assert reassess(ON, None, None, grace, at(110), POLICY).availability == ON
    assert reassess(ON, None, None, grace, at(125), POLICY).availability == DEG
    late = reassess(ON, None, None, grace, at(140), POLICY)
    assert late.availability == OFF
    assert "since the controller" in late.reason
    # A degraded site is not promoted by the grace, an offline one not revived.
    assert reassess(DEG, None, None, grace, at(101), POLICY).availability == DEG
    assert reassess(OFF, None, None, grace, at(101), POLICY).availability == OFF
    assert reassess(PEND, None, None, grace, at(101), POLICY).availability == PEND
    # A heartbeat heard before the grace started counts as nothing heard.
    assert reassess(DEG, at(99), None, grace, at(101), POLICY).availability == DEG


def test_reassess_with_a_heartbeat_heard_is_plain_assess() -> None:
    grace = at(0)
    assert reassess(OFF, at(50), inventory(), grace, at(51), POLICY).availability == ON
    assert reassess(PEND, at(50), inventory(), grace, at(51), POLICY).availability == ON
    assert reassess(ON, at(50), inventory(), grace, at(80), POLICY).availability == DEG


def test_next_check_is_the_next_threshold_still_ahead() -> None:
    grace = at(0)
    assert next_check(at(10), grace, at(10), POLICY) == at(35)
    assert next_check(at(10), grace, at(36), POLICY) == at(50)
    assert next_check(at(10), grace, at(50), POLICY) is None
    # Nothing heard since the grace began: thresholds count from the grace.
    assert next_check(None, at(100), at(100), POLICY) == at(125)


def test_alarm_on_transition_raises_on_offline_and_clears_on_return() -> None:
    assert alarm_on_transition(DEG, OFF, managed=True) == AlarmAction.RAISE
    assert alarm_on_transition(ON, OFF, managed=True) == AlarmAction.RAISE
    assert alarm_on_transition(OFF, ON, managed=True) == AlarmAction.CLEAR
    assert alarm_on_transition(OFF, DEG, managed=True) == AlarmAction.CLEAR
    assert alarm_on_transition(ON, DEG, managed=True) == AlarmAction.NONE
    assert alarm_on_transition(PEND, ON, managed=True) == AlarmAction.NONE
    assert alarm_on_transition(ON, OFF, managed=False) == AlarmAction.NONE
    assert alarm_on_transition(OFF, ON, managed=False) == AlarmAction.NONE


def test_managing_or_unmanaging_an_offline_site_raises_or_clears_its_alarm() -> None:
    assert alarm_on_managed_change(OFF, was_managed=True, managed=False) == AlarmAction.CLEAR
    assert alarm_on_managed_change(OFF, was_managed=False, managed=True) == AlarmAction.RAISE
    assert alarm_on_managed_change(ON, was_managed=False, managed=True) == AlarmAction.NONE
    assert alarm_on_managed_change(OFF, was_managed=True, managed=True) == AlarmAction.NONE


# -- liveness wheel --------------------------------------------------------------------------


def test_wheel_pops_only_due_sites_and_a_reschedule_moves_a_site() -> None:
    wheel = DeadlineWheel(resolution_s=1.0)
    wheel.schedule("a", 10.2)
    wheel.schedule("b", 12.0)
    wheel.schedule("c", 30.0)
    wheel.schedule("a", 20.0)  # a heartbeat pushed a's deadline out

    assert wheel.pop_due(11.0) == []
    assert wheel.pop_due(12.5) == ["b"]
    assert wheel.next_due() == 20.0
    assert wheel.pop_due(100.0) == ["a", "c"]
    assert len(wheel) == 0 and wheel.next_due() is None


def test_wheel_schedule_earlier_never_postpones_and_cancel_removes() -> None:
    wheel = DeadlineWheel(resolution_s=0.5)
    wheel.schedule("a", 5.0)
    wheel.schedule_earlier("a", 9.0)
    wheel.schedule_earlier("b", 9.0)
    wheel.cancel("b")

    assert "b" not in wheel
    assert wheel.pop_due(5.0) == ["a"]
    assert wheel.pop_due(50.0) == []


def test_wheel_with_many_sites_pops_each_exactly_once() -> None:
    wheel = DeadlineWheel(resolution_s=1.0)
    for i in range(10_000):
        wheel.schedule(f"s{i}", float(i % 100))
    for i in range(0, 10_000, 2):  # half of them heartbeat: pushed far out
        wheel.schedule(f"s{i}", 1000.0)

    due = wheel.pop_due(99.0)

    assert len(due) == len(set(due)) == 5000
    assert len(wheel) == 5000


# -- records ------------------------------------------------------------------------------------


def test_plan_add_creates_readds_pending_and_refuses_onboarded_or_reserved() -> None:
    fresh = records.plan_add(None, "s1", "g1", {"k": "v"}, T0)
    assert (fresh.site, fresh.group, fresh.labels) == ("s1", "g1", {"k": "v"})
    assert fresh.availability == PEND

    readded = records.plan_add(fresh, "s1", "g2", {}, at(5))
    assert (readded.group, readded.labels, readded.added_at) == ("g2", {}, T0)

    onboarded = records.mark_onboarded(fresh, at(1), "UKEY", inventory())
    with pytest.raises(Refusal) as caught:
        records.plan_add(onboarded, "s1", "g1", {}, at(5))
    assert caught.value.code == "site_exists"
    with pytest.raises(Refusal) as reserved:
        records.plan_add(None, "center", "g1", {}, T0)
    assert reserved.value.code == "site_id_invalid"


def test_apply_change_sets_and_removes_labels_and_flags() -> None:
    before = record(labels={"a": "1", "b": "2"}, group="g1")
    change = SiteChange(
        site="s1", managed=False, group="g2", set_labels={"c": "3", "a": "9"}, remove_labels=["b"]
    )

    after = records.apply_change(before, change)

    assert after.labels == {"a": "9", "c": "3"}
    assert (after.managed, after.group) == (False, "g2")
    assert records.apply_change(before, SiteChange(site="s1")) == before
    assert records.describe_change(change) == (
        "unmanage, group=g2, label a=9, label c=3, remove label b"
    )


def test_sightings_never_move_last_seen_back_and_persist_is_rate_limited() -> None:
    rec = record(last_seen=at(100), inventory=inventory())
    older = Sighting(heard=at(50), inventory=inventory(), seq=1)
    newer = Sighting(heard=at(130), inventory=inventory(), seq=2)

    assert records.with_sighting(rec, older) is rec
    assert records.with_sighting(rec, newer).last_seen == at(130)
    assert not records.persist_due(rec, Sighting(at(200), inventory(), 3), every_s=300)
    assert records.persist_due(rec, Sighting(at(400), inventory(), 3), every_s=300)
    # A new software version is written at once (rollouts are watched).
    assert records.persist_due(rec, Sighting(at(101), inventory(version="2.0"), 4), every_s=300)
    assert records.persist_due(record(), older, every_s=300)  # never persisted yet


# -- selection ----------------------------------------------------------------------------------


def test_select_filters_by_group_state_labels_and_site() -> None:
    recs = [
        record("s3", group="g1", labels={"env": "prod"}, availability="online"),
        record("s1", group="g1", labels={"env": "dev"}, availability="offline"),
        record("s2", group="g2", labels={"env": "prod", "tier": "a"}, availability="online"),
    ]

    def sites(**query: object) -> list[str]:
        return [r.site for r in select(recs, SitesQuery.model_validate(query))]

    assert sites() == ["s1", "s2", "s3"]
    assert sites(group="g1") == ["s1", "s3"]
    assert sites(availability="online") == ["s2", "s3"]
    assert sites(label_selector={"env": "prod"}) == ["s2", "s3"]
    assert sites(label_selector={"env": "prod", "tier": "a"}) == ["s2"]
    assert sites(site="s1", group="g2") == []


def test_pages_cover_every_record_once() -> None:
    recs = [record(f"s{i:04d}") for i in range(1234)]
    chosen = select(recs, SitesQuery())
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        items, after = page(chosen, after, 500)
        seen += [r.site for r in items]
        pages += 1
        if after is None:
            break

    assert pages == 3
    assert seen == sorted(r.site for r in recs)
    assert page(chosen, "zzz", 500) == ([], None)
