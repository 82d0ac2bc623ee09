"""Alarm rules as pure decisions over plain data: threshold with hysteresis, silence, rate.

Each function takes a rule, the instance's state and a time or value, and says whether the
alarm must now be raised (True), cleared (False) or left alone (None). No bus, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from schemas.alarms import RateRule, SilenceRule, ThresholdRule

Decision = bool | None  # True: raise, False: clear, None: nothing to do


# -- the value a threshold looks at -----------------------------------------------------


def value_at(payload: Any, path: str) -> float | None:
    """The number at a dotted path (`temp`, `power.l1`, `values.0`), or None if there is none.

    Booleans, strings, NaN and infinities are not numbers here: a rule cannot cross on them.
    """
    node = payload
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    value = float(node)
    return value if math.isfinite(value) else None


# -- threshold with hysteresis -----------------------------------------------------------


def threshold_decision(rule: ThresholdRule, active: bool, value: float) -> Decision:
    """Raise past `raise_at`, clear only back past `clear_at`: in between nothing changes."""
    if rule.direction == "above":
        if not active and value >= rule.raise_at:
            return True
        if active and value <= rule.clear_at:
            return False
        return None
    if not active and value <= rule.raise_at:
        return True
    if active and value >= rule.clear_at:
        return False
    return None


def threshold_text(rule: ThresholdRule, value: float, decision: bool) -> str:
    if decision:
        sign = ">=" if rule.direction == "above" else "<="
        detail = f"{rule.path}={value:g} {sign} {rule.raise_at:g}"
    else:
        sign = "<=" if rule.direction == "above" else ">="
        detail = f"{rule.path}={value:g} {sign} {rule.clear_at:g} (back to normal)"
    return f"{rule.text}: {detail}" if rule.text else detail


# -- silence ----------------------------------------------------------------------------------


def silence_decision(rule: SilenceRule, active: bool, last_seen: float, now: float) -> Decision:
    """On a tick: raise once nothing came for longer than `after_s`."""
    if not active and now - last_seen > rule.after_s:
        return True
    return None


def silence_heard(active: bool) -> Decision:
    """A reading arrived: a silent device is silent no more."""
    return False if active else None


def silence_text(rule: SilenceRule, silent_s: float | None) -> str:
    detail = (
        f"no reading for {silent_s:.0f}s (limit {rule.after_s:g}s)"
        if silent_s is not None
        else "readings again"
    )
    return f"{rule.text}: {detail}" if rule.text else detail


# -- rate ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateWindow:
    """Readings counted in the current window, which started at `start`."""

    start: float
    count: int = 0
    active: bool = False


def _roll(rule: RateRule, window: RateWindow, now: float) -> tuple[RateWindow, Decision]:
    """Close the window if it has ended: an active alarm clears if it stayed within the limit.

    A gap of several windows means the windows in between were empty (within the limit).
    """
    if now < window.start + rule.window_s and now >= window.start:
        return window, None
    quiet = window.count <= rule.max_events or now >= window.start + 2 * rule.window_s
    decision: Decision = False if window.active and quiet else None
    active = window.active and not quiet
    return RateWindow(start=now, count=0, active=active), decision


def rate_event(rule: RateRule, window: RateWindow, now: float) -> tuple[RateWindow, Decision]:
    """One reading at `now`: raise at once when the window holds more than `max_events`."""
    window, decision = _roll(rule, window, now)
    count = window.count + 1
    if not window.active and count > rule.max_events:
        return RateWindow(window.start, count, True), True
    return RateWindow(window.start, count, window.active), decision


def rate_tick(rule: RateRule, window: RateWindow, now: float) -> tuple[RateWindow, Decision]:
    """No reading: windows still end (and a calm one clears the alarm)."""
    return _roll(rule, window, now)


def rate_text(rule: RateRule, decision: bool) -> str:
    if decision:
        detail = f"more than {rule.max_events} readings within {rule.window_s:g}s"
    else:
        detail = f"at most {rule.max_events} readings in {rule.window_s:g}s (back to normal)"
    return f"{rule.text}: {detail}" if rule.text else detail
