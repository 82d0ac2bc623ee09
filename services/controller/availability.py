"""Site availability as a state machine over heartbeats: online, degraded, offline.

Pure: given the current state, the last heartbeat and the clock, say what the state is now.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from schemas.controller import Availability, Inventory

# Better states rank higher; a grace period may delay a downgrade, never cause an upgrade.
_RANK = {
    Availability.OFFLINE: 0,
    Availability.PENDING: 1,
    Availability.DEGRADED: 2,
    Availability.ONLINE: 3,
}


@dataclass(frozen=True)
class AvailabilityPolicy:
    """Thresholds, in seconds since the last heartbeat (and health signals it carries)."""

    heartbeat_interval_s: float = 30.0
    degraded_after_s: float = 75.0  # two and a half intervals without a heartbeat
    offline_after_s: float = 120.0  # four intervals without a heartbeat
    backlog_age_degraded_s: float = 300.0  # the site owes the center events this old

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_s < self.degraded_after_s < self.offline_after_s:
            raise ValueError(
                "need 0 < heartbeat_interval_s < degraded_after_s < offline_after_s, got "
                f"{self.heartbeat_interval_s}, {self.degraded_after_s}, {self.offline_after_s}"
            )
        if self.backlog_age_degraded_s <= 0:
            raise ValueError("backlog_age_degraded_s must be positive")

    @classmethod
    def for_interval(
        cls,
        heartbeat_interval_s: float,
        *,
        degraded_after_s: float | None = None,
        offline_after_s: float | None = None,
        backlog_age_degraded_s: float = 300.0,
    ) -> AvailabilityPolicy:
        """Thresholds scaled from the interval (2.5x degraded, 4x offline) unless given."""
        offline = offline_after_s if offline_after_s is not None else 4 * heartbeat_interval_s
        degraded = (
            degraded_after_s
            if degraded_after_s is not None
            else min(2.5 * heartbeat_interval_s, (heartbeat_interval_s + offline) / 2)
        )
        return cls(heartbeat_interval_s, degraded, offline, backlog_age_degraded_s)


@dataclass(frozen=True)
class Assessment:
    availability: Availability
    reason: str


def assess(
    last_seen: datetime | None,
    inventory: Inventory | None,
    now: datetime,
    policy: AvailabilityPolicy,
) -> Assessment:
    """The availability a site should have now."""
    if last_seen is None:
        return Assessment(Availability.PENDING, "never seen")
    silent_s = (now - last_seen).total_seconds()
    if silent_s >= policy.offline_after_s:
        return Assessment(Availability.OFFLINE, f"no heartbeat for {silent_s:.1f}s")
    if silent_s >= policy.degraded_after_s:
        return Assessment(Availability.DEGRADED, f"heartbeat late by {silent_s:.1f}s")
    backlog_age = inventory.replay_oldest_unsent_age_s if inventory else 0.0
    if inventory is not None and backlog_age >= policy.backlog_age_degraded_s:
        return Assessment(
            Availability.DEGRADED,
            f"replay backlog {inventory.replay_backlog} events, oldest "
            f"{inventory.replay_oldest_unsent_age_s:.0f}s unsent",
        )
    return Assessment(Availability.ONLINE, "heartbeating")


def transition(current: Availability, assessment: Assessment) -> Availability | None:
    """The new state if it changed, else None (the caller emits an event per transition)."""
    return assessment.availability if assessment.availability != current else None


def reassess(
    current: Availability,
    heard: datetime | None,
    inventory: Inventory | None,
    grace_from: datetime,
    now: datetime,
    policy: AvailabilityPolicy,
) -> Assessment:
    """The availability now, for a controller that has listened since `grace_from`.

    `heard` is the last heartbeat this controller received itself. Before it hears one
    (after a restart, a failover or a lost connection to NATS), silence is counted from
    `grace_from`, and only to downgrade: the persisted state stands until then, so a
    restart neither revives an offline site nor declares every site offline at once.
    """
    if heard is not None and heard >= grace_from:
        return assess(heard, inventory, now, policy)
    if current in (Availability.PENDING, Availability.OFFLINE):
        return Assessment(current, "no heartbeat heard yet")
    graced = assess(grace_from, inventory, now, policy)
    if _RANK[graced.availability] >= _RANK[current]:
        return Assessment(current, "within the grace period after a controller (re)start")
    silent_s = (now - grace_from).total_seconds()
    return Assessment(
        graced.availability, f"no heartbeat in {silent_s:.1f}s since the controller (re)started"
    )


def next_check(
    heard: datetime | None, grace_from: datetime, now: datetime, policy: AvailabilityPolicy
) -> datetime | None:
    """When the state can next change without a heartbeat arriving (None: not before one)."""
    seen = heard if heard is not None and heard >= grace_from else grace_from
    for threshold_s in (policy.degraded_after_s, policy.offline_after_s):
        at = seen + timedelta(seconds=threshold_s)
        if at > now:
            return at
    return None


class AlarmAction(StrEnum):
    NONE = "none"
    RAISE = "raise"
    CLEAR = "clear"


SITE_ALARM_ENTITY = "site"
SITE_OFFLINE_CAUSE = "site_offline"


def alarm_on_transition(
    previous: Availability, current: Availability, managed: bool
) -> AlarmAction:
    """Going offline raises the site-offline alarm, coming back clears it; unmanaged: neither."""
    if not managed or previous == current:
        return AlarmAction.NONE
    if current == Availability.OFFLINE:
        return AlarmAction.RAISE
    if previous == Availability.OFFLINE:
        return AlarmAction.CLEAR
    return AlarmAction.NONE


def alarm_on_managed_change(
    availability: Availability, was_managed: bool, managed: bool
) -> AlarmAction:
    """Unmanaging an offline site clears its alarm; managing it again re-raises it."""
    if availability != Availability.OFFLINE or was_managed == managed:
        return AlarmAction.NONE
    return AlarmAction.RAISE if managed else AlarmAction.CLEAR
