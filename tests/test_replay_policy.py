"""Unit tests of the replay log's alarm policy (pure: no servers).

Near-full hysteresis, loss detection from counter growth, quiet-interval clearing, resets.
"""

from __future__ import annotations

from bus.forwarder import BacklogStats
from bus.streams import ReplayFullPolicy
from edge_agent.config import ReplayConfig
from edge_agent.replay import forwarder_config
from edge_agent.replay.policy import (
    CAUSE_LOSING,
    CAUSE_NEAR_FULL,
    ENTITY,
    Action,
    AlarmChange,
    PolicyState,
    evaluate,
    usage_ratio,
)
from schemas.alarms import Severity

CONFIG = ReplayConfig(max_bytes=1000, near_full_ratio=0.8)
QUIET = 30.0


def backlog(used: int, *, dropped: int = 0, max_bytes: int = 1000) -> BacklogStats:
    return BacklogStats(
        depth=used // 10,
        messages=used // 10,
        bytes=used,
        max_bytes=max_bytes,
        oldest_unsent_age_s=None,
        dropped=dropped,
        first_seq=1,
        last_seq=used // 10,
    )


def step(
    state: PolicyState, used: int, now: float, *, dropped: int = 0, refused: int = 0
) -> tuple[PolicyState, list[AlarmChange]]:
    return evaluate(backlog(used, dropped=dropped), refused, state, CONFIG, now, quiet_s=QUIET)


def causes(changes: list[AlarmChange], action: Action) -> list[str]:
    return [c.probable_cause for c in changes if c.action is action]


def test_quiet_log_raises_nothing() -> None:
    state, changes = step(PolicyState(), 100, 0.0)
    assert changes == []
    assert state == PolicyState(dropped=0, refused=0)


def test_near_full_raises_once_above_ratio_as_major() -> None:
    state, changes = step(PolicyState(), 800, 0.0)
    assert changes == []  # at the ratio is not above it
    state, changes = step(state, 810, 1.0)
    assert len(changes) == 1
    change = changes[0]
    assert (change.action, change.entity, change.probable_cause) == (
        Action.RAISE,
        ENTITY,
        CAUSE_NEAR_FULL,
    )
    assert change.severity is Severity.MAJOR
    assert "81%" in change.text
    state, changes = step(state, 950, 2.0)
    assert changes == []  # already raised


def test_near_full_clears_only_below_hysteresis() -> None:
    state, _ = step(PolicyState(), 900, 0.0)
    assert state.near_full
    for used in (790, 750, 700):  # under the ratio but not under ratio - 0.1
        state, changes = step(state, used, 1.0)
        assert changes == [], used
    state, changes = step(state, 690, 2.0)
    assert causes(changes, Action.CLEAR) == [CAUSE_NEAR_FULL]
    assert changes[0].severity is None
    assert not state.near_full
    state, changes = step(state, 790, 3.0)
    assert changes == []  # re-raise needs the ratio again
    state, changes = step(state, 801, 4.0)
    assert causes(changes, Action.RAISE) == [CAUSE_NEAR_FULL]


def test_unbounded_log_is_never_near_full() -> None:
    unbounded = backlog(10**12, max_bytes=-1)
    assert usage_ratio(unbounded) == 0.0
    _, changes = evaluate(unbounded, 0, PolicyState(), CONFIG, 0.0)
    assert changes == []


def test_growing_dropped_counter_raises_critical_once() -> None:
    state, _ = step(PolicyState(), 100, 0.0)
    state, changes = step(state, 100, 1.0, dropped=5)
    assert causes(changes, Action.RAISE) == [CAUSE_LOSING]
    assert changes[0].severity is Severity.CRITICAL
    assert "5 entries dropped" in changes[0].text
    state, changes = step(state, 100, 2.0, dropped=9)
    assert changes == []  # still active: not raised again
    assert state.last_loss_at == 2.0


def test_growing_refused_counter_raises_and_says_so() -> None:
    config = ReplayConfig(max_bytes=1000, policy=ReplayFullPolicy.REFUSE_NEW)
    _, changes = evaluate(backlog(1000), 3, PolicyState(), config, 0.0, quiet_s=QUIET)
    assert causes(changes, Action.RAISE) == [CAUSE_NEAR_FULL, CAUSE_LOSING]
    losing = next(c for c in changes if c.probable_cause == CAUSE_LOSING)
    assert "3 new entries refused" in losing.text
    assert "refuses new" in losing.text


def test_loss_alarm_clears_after_quiet_interval_with_usage_back_under_threshold() -> None:
    state, _ = step(PolicyState(), 950, 0.0, refused=1)
    assert state.losing
    state, changes = step(state, 950, QUIET + 1)  # quiet, but still full
    assert CAUSE_LOSING not in causes(changes, Action.CLEAR)
    state, changes = step(state, 500, QUIET / 2)  # room again, but not quiet long enough
    assert CAUSE_LOSING not in causes(changes, Action.CLEAR)
    assert causes(changes, Action.CLEAR) == [CAUSE_NEAR_FULL]
    state, changes = step(state, 500, QUIET + 2)
    assert causes(changes, Action.CLEAR) == [CAUSE_LOSING]
    assert not state.losing


def test_new_loss_restarts_the_quiet_interval() -> None:
    state, _ = step(PolicyState(), 100, 0.0, dropped=1)
    state, _ = step(state, 100, QUIET - 1, dropped=2)
    state, changes = step(state, 100, QUIET + 1, dropped=2)
    assert changes == []  # only 2 s since the last loss
    state, changes = step(state, 100, 2 * QUIET, dropped=2)
    assert causes(changes, Action.CLEAR) == [CAUSE_LOSING]


def test_counter_reset_counts_as_growth() -> None:
    state = PolicyState(dropped=50, refused=7)
    state, changes = step(state, 100, 0.0, dropped=2)  # forwarder restarted: 50 -> 2
    assert causes(changes, Action.RAISE) == [CAUSE_LOSING]
    state2, changes = step(PolicyState(dropped=50), 100, 0.0, dropped=0)
    assert changes == []
    assert state2.dropped == 0


def test_forwarder_config_follows_replay_config() -> None:
    replay = ReplayConfig(batch_size=123, publish_timeout_s=2.5, backoff_min_s=0.5)
    config = forwarder_config(replay)
    assert (config.batch_size, config.publish_timeout_s, config.backoff_min_s) == (123, 2.5, 0.5)
    assert config.backoff_max_s == replay.backoff_max_s
