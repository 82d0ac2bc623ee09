"""Which replay-log alarms to raise or clear, from its backlog and counters: pure, no I/O.

`evaluate(observation, previous state, config, now)` -> (next state, alarm changes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from bus.forwarder import BacklogStats
from bus.streams import ReplayFullPolicy
from edge_agent.config import ReplayConfig
from schemas.alarms import Severity

ENTITY = "replay-log"
CAUSE_NEAR_FULL = "replay-log-near-full"
CAUSE_LOSING = "replay-log-losing-entries"  # dropping (drop_oldest, max age) or refusing
HYSTERESIS = 0.1  # "near full" clears only below near_full_ratio - HYSTERESIS
DEFAULT_QUIET_S = 60.0  # "losing entries" clears after this long without a new loss


class Action(StrEnum):
    RAISE = "raise"
    CLEAR = "clear"


@dataclass(frozen=True)
class AlarmChange:
    action: Action
    entity: str
    probable_cause: str
    severity: Severity | None  # None for a clear
    text: str


@dataclass(frozen=True)
class PolicyState:
    """What the previous evaluation saw and decided (start with `PolicyState()`)."""

    near_full: bool = False
    losing: bool = False
    dropped: int = 0
    refused: int = 0
    last_loss_at: float | None = None  # `now` of the last evaluation that saw a new loss


def usage_ratio(backlog: BacklogStats) -> float:
    """Bytes used over the byte bound; 0 for an unbounded log."""
    return backlog.bytes / backlog.max_bytes if backlog.max_bytes > 0 else 0.0


def _growth(current: int, previous: int) -> int:
    # A counter below its previous value was reset (process restart): all of it is new.
    return current - previous if current >= previous else current


def evaluate(
    backlog: BacklogStats,
    refused: int,
    state: PolicyState,
    config: ReplayConfig,
    now: float,
    *,
    quiet_s: float = DEFAULT_QUIET_S,
) -> tuple[PolicyState, list[AlarmChange]]:
    """Decide the replay log's alarms; `now` is any monotonic clock in seconds."""
    ratio = usage_ratio(backlog)
    changes: list[AlarmChange] = []

    near_full = state.near_full
    if not near_full and ratio > config.near_full_ratio:
        near_full = True
        changes.append(
            AlarmChange(
                Action.RAISE,
                ENTITY,
                CAUSE_NEAR_FULL,
                Severity.MAJOR,
                f"replay log {ratio:.0%} full ({backlog.bytes} of {backlog.max_bytes} bytes, "
                f"{backlog.depth} entries owed to the center)",
            )
        )
    elif near_full and ratio < round(config.near_full_ratio - HYSTERESIS, 9):  # 0.8-0.1 > 0.7
        near_full = False
        changes.append(
            AlarmChange(Action.CLEAR, ENTITY, CAUSE_NEAR_FULL, None, f"replay log {ratio:.0%} full")
        )

    dropped_now = _growth(backlog.dropped, state.dropped)
    refused_now = _growth(refused, state.refused)
    last_loss_at = now if dropped_now or refused_now else state.last_loss_at
    losing = state.losing
    if (dropped_now or refused_now) and not losing:
        losing = True
        changes.append(
            AlarmChange(
                Action.RAISE,
                ENTITY,
                CAUSE_LOSING,
                Severity.CRITICAL,
                _loss_text(config.policy, dropped_now, refused_now),
            )
        )
    elif (
        losing
        and last_loss_at is not None
        and now - last_loss_at >= quiet_s
        and ratio < config.near_full_ratio
    ):
        losing = False
        changes.append(
            AlarmChange(
                Action.CLEAR,
                ENTITY,
                CAUSE_LOSING,
                None,
                f"no entry lost for {quiet_s:.0f}s; replay log {ratio:.0%} full",
            )
        )

    next_state = replace(
        state,
        near_full=near_full,
        losing=losing,
        dropped=backlog.dropped,
        refused=refused,
        last_loss_at=last_loss_at,
    )
    return next_state, changes


def _loss_text(policy: str, dropped: int, refused: int) -> str:
    parts = []
    if dropped:
        parts.append(f"{dropped} entries dropped before reaching the center")
    if refused:
        parts.append(f"{refused} new entries refused")
    how = "drops oldest" if policy == ReplayFullPolicy.DROP_OLDEST else "refuses new"
    return f"replay log full or expiring (policy: {how}): " + ", ".join(parts)
