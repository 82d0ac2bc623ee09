"""The alarm table's rules as pure functions: apply a raise, a clear or an acknowledgement to
an `AlarmRecord`, count flaps, select, summarise and roll up site health. No I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.alarms import (
    AlarmAcknowledged,
    AlarmCleared,
    AlarmRaised,
    AlarmRecord,
    AlarmState,
    Severity,
    SiteAlarmSummary,
    SiteHealth,
)

SEVERITY_ORDER = (Severity.CRITICAL, Severity.MAJOR, Severity.MINOR, Severity.WARNING)
_RANK = {severity: rank for rank, severity in enumerate(SEVERITY_ORDER)}
_HEALTH_RANK = {SiteHealth.CRITICAL: 0, SiteHealth.DEGRADED: 1, SiteHealth.OK: 2}
_KEEP = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # the complement of _KEEP


@dataclass(frozen=True)
class FlapPolicy:
    """An alarm that changes state `threshold` times within `window_s` (its own event times)
    is flapping until it has not changed for `quiet_s`."""

    window_s: float = 60.0
    threshold: int = 6
    quiet_s: float = 120.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.quiet_s <= 0 or self.threshold < 2:
            raise ValueError("need window_s > 0, quiet_s > 0 and threshold >= 2")


@functools.lru_cache(maxsize=65_536)  # per stored change; ids repeat (2.7 µs -> 0.1)
def alarm_key(alarm_id: str) -> str:
    """The KV key of an alarm: `<site>.<alarm id escaped>` (only `[A-Za-z0-9_-]` and `=XX`),
    so every site's alarms share a key prefix and any alarm id is a valid key."""
    site = alarm_id.split("/", 1)[0]
    if not site or not set(site) <= _KEEP:
        site = "_"
    escaped = _UNSAFE.sub(lambda m: f"={ord(m.group()):02X}", alarm_id)
    return f"{site}.{escaped}"


_set_attribute = object.__setattr__


def evolve(record: AlarmRecord, changes: dict[str, Any]) -> AlarmRecord:
    """`record.model_copy(update=changes)` (which does not validate either) without pydantic's
    generic copy machinery: every applied change makes one (measured 7.3 -> 4.6 µs)."""
    values = record.__dict__.copy()
    values.update(changes)
    copy = object.__new__(AlarmRecord)
    _set_attribute(copy, "__dict__", values)
    _set_attribute(copy, "__pydantic_fields_set__", record.__pydantic_fields_set__ | changes.keys())
    _set_attribute(copy, "__pydantic_extra__", None)
    _set_attribute(copy, "__pydantic_private__", None)
    return copy


def _already_applied(record: AlarmRecord | None, source: str, seq: int) -> bool:
    """A change at or before the last one applied from the same stream is a redelivery."""
    return record is not None and record.source == source and seq <= record.seq


def _flap_count(record: AlarmRecord, at: datetime, policy: FlapPolicy) -> tuple[datetime, int]:
    start = record.flap_window_start
    if start is None or at < start or (at - start).total_seconds() >= policy.window_s:
        return at, 1
    return start, record.flap_window_count + 1


def _transition(
    record: AlarmRecord, at: datetime, policy: FlapPolicy, **changes: object
) -> AlarmRecord:
    """A state change of a known alarm: counted for flap detection."""
    start, count = _flap_count(record, at, policy)
    flapping = record.flapping or count >= policy.threshold
    return evolve(
        record,
        {
            **changes,
            "transitions": record.transitions + 1,
            "last_transition_at": at,
            "flap_window_start": start,
            "flap_window_count": count,
            "flapping": flapping,
            "flapping_since": record.flapping_since
            if record.flapping
            else (at if flapping else None),
            "suppressed": record.suppressed + 1 if record.flapping else record.suppressed,
        },
    )


def apply_raised(
    record: AlarmRecord | None,
    raised: AlarmRaised,
    *,
    source: str,
    seq: int,
    now: datetime,
    policy: FlapPolicy,
) -> AlarmRecord | None:
    """The record after a raise; None if nothing changes (already active, or redelivered).

    Raising an active alarm again is idempotent: the first raise's time and text stay.
    """
    if _already_applied(record, source, seq):
        return None
    if record is None:
        return AlarmRecord(
            alarm_id=raised.alarm_id,
            site=raised.site,
            entity=raised.entity,
            probable_cause=raised.probable_cause,
            severity=raised.severity,
            state=AlarmState.ACTIVE,
            text=raised.text,
            raised_at=raised.raised_at,
            last_transition_at=raised.raised_at,
            flap_window_start=raised.raised_at,
            flap_window_count=1,
            source=source,
            seq=seq,
            updated_at=now,
        )
    if record.state is AlarmState.ACTIVE:
        return None
    return _transition(
        record,
        raised.raised_at,
        policy,
        state=AlarmState.ACTIVE,
        severity=raised.severity,
        text=raised.text,
        raised_at=raised.raised_at,
        cleared_at=None,
        clear_text="",
        acknowledged_by=None,
        acknowledged_at=None,
        ack_note="",
        occurrences=record.occurrences + 1,
        source=source,
        seq=seq,
        updated_at=now,
    )


def apply_cleared(
    record: AlarmRecord | None,
    cleared: AlarmCleared,
    *,
    source: str,
    seq: int,
    now: datetime,
    policy: FlapPolicy,
) -> AlarmRecord | None:
    """The record after a clear; None if nothing changes (unknown or inactive, redelivered)."""
    if record is None or record.state is AlarmState.CLEARED:
        return None
    if _already_applied(record, source, seq):
        return None
    return _transition(
        record,
        cleared.cleared_at,
        policy,
        state=AlarmState.CLEARED,
        cleared_at=cleared.cleared_at,
        clear_text=cleared.text,
        source=source,
        seq=seq,
        updated_at=now,
    )


def apply_ack(
    record: AlarmRecord | None, ack: AlarmAcknowledged, *, now: datetime
) -> AlarmRecord | None:
    """Acknowledge the occurrence raised at `ack.raised_at`; None if it is not the current
    one (raised again since) or was acknowledged already (the first acknowledgement stays)."""
    if record is None or record.raised_at != ack.raised_at or record.acknowledged:
        return None
    return evolve(
        record,
        {
            "acknowledged_by": ack.by,
            "acknowledged_at": ack.at,
            "ack_note": ack.note,
            "updated_at": now,
        },
    )


def settle_flapping(record: AlarmRecord, now: datetime, policy: FlapPolicy) -> AlarmRecord | None:
    """A flapping alarm that has not changed for `quiet_s` is flapping no more (None: still is,
    or was not)."""
    if not record.flapping:
        return None
    if (now - record.last_transition_at).total_seconds() < policy.quiet_s:
        return None
    return evolve(
        record, {"flapping": False, "flapping_since": None, "suppressed": 0, "updated_at": now}
    )


def prunable(record: AlarmRecord, now: datetime, retention_s: float) -> bool:
    """A cleared, settled alarm is forgotten `retention_s` after it cleared (history keeps it)."""
    return (
        not record.open
        and record.cleared_at is not None
        and (now - record.cleared_at).total_seconds() >= retention_s
    )


# -- reads ------------------------------------------------------------------------------------


def sort_key(record: AlarmRecord) -> tuple[int, int, float, str]:
    """Open first, then by severity, then newest raised first."""
    return (
        0 if record.open else 1,
        _RANK[record.severity],
        -record.raised_at.timestamp(),
        record.alarm_id,
    )


def select(
    records: Iterable[AlarmRecord],
    *,
    site: str | None,
    severity: Severity | None,
    include_cleared: bool,
    limit: int,
) -> tuple[list[AlarmRecord], int]:
    """(the first `limit` matching records in `sort_key` order, how many matched)."""
    found = [
        r
        for r in records
        if (include_cleared or r.open)
        and (site is None or r.site == site)
        and (severity is None or r.severity is severity)
    ]
    found.sort(key=sort_key)
    return found[:limit], len(found)


def health_of(summary: SiteAlarmSummary | None) -> SiteHealth:
    if summary is None:
        return SiteHealth.OK
    return summary.health


def _health(critical: int, major: int, minor: int) -> SiteHealth:
    if critical:
        return SiteHealth.CRITICAL
    if major or minor:
        return SiteHealth.DEGRADED
    return SiteHealth.OK


def summarize(records: Iterable[AlarmRecord]) -> dict[str, SiteAlarmSummary]:
    """Per site with at least one open alarm: counts by severity, flapping, unacknowledged."""
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        if not record.open:
            continue
        site = counts.setdefault(
            record.site,
            {"critical": 0, "major": 0, "minor": 0, "warning": 0, "flapping": 0, "unack": 0},
        )
        site[record.severity.value] += 1
        site["flapping"] += record.flapping
        site["unack"] += not record.acknowledged
    return {
        site: SiteAlarmSummary(
            site=site,
            health=_health(c["critical"], c["major"], c["minor"]),
            critical=c["critical"],
            major=c["major"],
            minor=c["minor"],
            warning=c["warning"],
            flapping=c["flapping"],
            unacknowledged=c["unack"],
        )
        for site, c in counts.items()
    }


def worst_first(summaries: Iterable[SiteAlarmSummary]) -> list[SiteAlarmSummary]:
    return sorted(
        summaries,
        key=lambda s: (_HEALTH_RANK[s.health], -s.critical, -s.major, -s.minor, s.site),
    )


def totals(summaries: Iterable[SiteAlarmSummary]) -> dict[str, int]:
    out = {severity.value: 0 for severity in SEVERITY_ORDER}
    for summary in summaries:
        out["critical"] += summary.critical
        out["major"] += summary.major
        out["minor"] += summary.minor
        out["warning"] += summary.warning
    return out
