"""The edge alarm rules as pure decisions: hysteresis, silence, rate, field paths, the config.

No server: the rule functions take plain state and a value or a time.
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from edge_agent.alarms.rules import (
    RateWindow,
    rate_event,
    rate_tick,
    silence_decision,
    silence_heard,
    threshold_decision,
    threshold_text,
    value_at,
)
from schemas.alarms import AlarmRulesConfig, RateRule, SilenceRule, ThresholdRule


def hot(**overrides: object) -> ThresholdRule:
    fields: dict[str, object] = {"id": "hot", "path": "temp", "raise_at": 80, "clear_at": 70}
    return ThresholdRule.model_validate({**fields, **overrides})


def run_threshold(rule: ThresholdRule, values: list[float]) -> list[bool | None]:
    active, out = False, []
    for value in values:
        decision = threshold_decision(rule, active, value)
        if decision is not None:
            active = decision
        out.append(decision)
    return out


# -- threshold with hysteresis ------------------------------------------------------------


def test_threshold_raises_at_the_limit_and_clears_only_below_the_clear_level() -> None:
    decisions = run_threshold(hot(), [60, 79.9, 80, 95, 75, 71, 70.5, 70, 65, 79, 81])
    assert decisions == [None, None, True, None, None, None, None, False, None, None, True]


def test_threshold_hovering_inside_the_band_does_not_flap() -> None:
    decisions = run_threshold(hot(), [81, 79, 81, 72, 79.99, 71, 80, 70.01])
    assert decisions == [True, None, None, None, None, None, None, None]


def test_threshold_below_direction_mirrors_above() -> None:
    low = hot(id="cold", direction="below", raise_at=5, clear_at=10)
    assert run_threshold(low, [20, 6, 5, 0, 9, 10, 4]) == [
        None,
        None,
        True,
        None,
        None,
        False,
        True,
    ]


def test_threshold_config_rejects_a_band_on_the_wrong_side() -> None:
    with pytest.raises(ValidationError, match="clear_at < raise_at"):
        hot(clear_at=90)
    with pytest.raises(ValidationError, match="clear_at > raise_at"):
        hot(direction="below", raise_at=5, clear_at=5)


def test_threshold_text_says_what_crossed() -> None:
    rule = hot(text="boiler too hot")
    assert threshold_text(rule, 85, True) == "boiler too hot: temp=85 >= 80"
    assert "back to normal" in threshold_text(rule, 69, False)


def test_value_at_follows_dotted_paths_and_refuses_non_numbers() -> None:
    payload = {"temp": 21.5, "power": {"l1": 3}, "values": [1, {"x": 7}], "ok": True, "s": "9"}
    assert value_at(payload, "temp") == 21.5
    assert value_at(payload, "power.l1") == 3.0
    assert value_at(payload, "values.1.x") == 7.0
    for missing in ("nope", "power.l2", "values.5", "values.x", "temp.deeper", "ok", "s"):
        assert value_at(payload, missing) is None, missing
    assert value_at({"v": math.nan}, "v") is None
    assert value_at({"v": math.inf}, "v") is None


# -- silence --------------------------------------------------------------------------------


def test_silence_raises_after_the_limit_and_clears_on_the_next_reading() -> None:
    rule = SilenceRule(id="quiet", after_s=10)
    assert silence_decision(rule, False, last_seen=100.0, now=110.0) is None  # exactly T: not yet
    assert silence_decision(rule, False, last_seen=100.0, now=110.5) is True
    assert silence_decision(rule, True, last_seen=100.0, now=500.0) is None  # raised once
    assert silence_heard(True) is False
    assert silence_heard(False) is None


# -- rate -------------------------------------------------------------------------------------


def test_rate_raises_as_soon_as_the_window_holds_too_many() -> None:
    rule = RateRule(id="chatty", max_events=3, window_s=10)
    window = RateWindow(start=0.0)
    decisions = []
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        window, decision = rate_event(rule, window, t)
        decisions.append(decision)
    assert decisions == [None, None, None, True, None]
    assert window.active and window.count == 5


def test_rate_stays_raised_through_a_busy_window_and_clears_after_a_calm_one() -> None:
    rule = RateRule(id="chatty", max_events=2, window_s=10)
    window = RateWindow(start=0.0)
    for t in (0.0, 1.0, 2.0):  # raised in window [0, 10)
        window, _ = rate_event(rule, window, t)
    assert window.active
    window, decision = rate_tick(rule, window, 10.0)  # the busy window ends: still raised
    assert decision is None and window.active
    window, decision = rate_event(rule, window, 12.0)  # one reading in [10, 20): calm
    assert decision is None
    window, decision = rate_tick(rule, window, 19.0)
    assert decision is None
    window, decision = rate_tick(rule, window, 20.0)  # the calm window ends: clear
    assert decision is False and not window.active


def test_rate_clears_after_a_silent_gap_longer_than_a_window() -> None:
    rule = RateRule(id="chatty", max_events=1, window_s=5)
    window = RateWindow(start=0.0)
    for t in (0.0, 0.5):
        window, _ = rate_event(rule, window, t)
    assert window.active
    window, decision = rate_event(rule, window, 30.0)  # nothing for 6 windows
    assert decision is False and window.count == 1 and not window.active


def test_rate_with_zero_allowed_raises_on_the_first_event() -> None:
    rule = RateRule(id="never", max_events=0, window_s=60)
    _, decision = rate_event(rule, RateWindow(start=0.0), 0.0)
    assert decision is True


# -- the config model -------------------------------------------------------------------------


def test_rules_config_is_a_defaulted_strict_config_kind() -> None:
    assert AlarmRulesConfig.config_kind == "alarm_rules"
    assert AlarmRulesConfig().rules == []
    config = AlarmRulesConfig.model_validate(
        {
            "rules": [
                {"kind": "threshold", "id": "hot", "path": "temp", "raise_at": 80, "clear_at": 70},
                {"kind": "silence", "id": "quiet", "device": "d1", "after_s": 30},
                {"kind": "rate", "id": "chatty", "max_events": 100, "window_s": 1},
            ]
        }
    )
    assert [type(r) for r in config.rules] == [ThresholdRule, SilenceRule, RateRule]
    assert AlarmRulesConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValidationError, match="extra"):
        AlarmRulesConfig.model_validate({"rules": [], "surprise": 1})
    with pytest.raises(ValidationError, match="used twice"):
        AlarmRulesConfig(
            rules=[SilenceRule(id="a", after_s=1), RateRule(id="a", max_events=1, window_s=1)]
        )
    with pytest.raises(ValidationError):
        SilenceRule(id="bad id", after_s=1)
    with pytest.raises(ValidationError):
        ThresholdRule(id="x", path="a..b", raise_at=2, clear_at=1)
