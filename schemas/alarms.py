"""Alarm events: raised and cleared at a site (even offline), aggregated at the center; the
center's alarm record and operator requests; the edge's alarm rules (config kind).

An alarm's id is derived from (site, entity, probable cause): raising it again is idempotent
and clearing it needs that same id.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.catalog import config_kind as register_config_kind
from schemas.catalog import event
from schemas.envelope import EventData

ALARM_TOKEN = r"^[A-Za-z0-9_.:/-]{1,128}$"


class Severity(StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"


def alarm_id(site: str, entity: str, probable_cause: str) -> str:
    """The stable identity of one alarm condition at one site."""
    return f"{site}/{entity}/{probable_cause}"


@event("edgebus.alarm.raised", version=1)
class AlarmRaised(EventData):
    alarm_id: str = Field(pattern=ALARM_TOKEN)
    site: str
    entity: str = Field(pattern=ALARM_TOKEN, description="device id or component name")
    severity: Severity
    probable_cause: str = Field(pattern=ALARM_TOKEN)
    text: str = Field(max_length=2000)
    raised_at: datetime


@event("edgebus.alarm.cleared", version=1)
class AlarmCleared(EventData):
    alarm_id: str = Field(pattern=ALARM_TOKEN)
    site: str
    entity: str = Field(pattern=ALARM_TOKEN)
    probable_cause: str = Field(pattern=ALARM_TOKEN)
    text: str = Field(default="", max_length=2000)
    cleared_at: datetime


# -- center state and operator requests (services/alarms) ----------------------------------


class AlarmState(StrEnum):
    ACTIVE = "active"
    CLEARED = "cleared"


class SiteHealth(StrEnum):
    """A site's alarms rolled up: any open critical alarm -> critical; any open major or
    minor -> degraded; otherwise (none, or warnings only) ok."""

    CRITICAL = "critical"
    DEGRADED = "degraded"
    OK = "ok"


class AlarmRecord(BaseModel):
    """The center's state of one alarm (JetStream KV value in bucket ALARMS).

    Kept after the alarm clears (history joins, flap detection) until pruned. `source`/`seq`
    name the last stream message applied: a redelivered change is recognised and skipped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    alarm_id: str = Field(pattern=ALARM_TOKEN)
    site: str
    entity: str = Field(pattern=ALARM_TOKEN)
    probable_cause: str = Field(pattern=ALARM_TOKEN)
    severity: Severity
    state: AlarmState
    text: str = Field(default="", max_length=2000)
    raised_at: datetime
    cleared_at: datetime | None = None
    clear_text: str = Field(default="", max_length=2000)
    acknowledged_by: str | None = Field(default=None, max_length=200)
    acknowledged_at: datetime | None = None
    ack_note: str = Field(default="", max_length=2000)
    occurrences: int = Field(default=1, ge=0, description="times raised since first seen")
    transitions: int = Field(default=1, ge=0, description="raises + clears since first seen")
    last_transition_at: datetime
    flapping: bool = False
    flapping_since: datetime | None = None
    flap_window_start: datetime | None = None
    flap_window_count: int = Field(default=0, ge=0)
    suppressed: int = Field(default=0, ge=0, description="changes not notified while flapping")
    source: str = ""
    seq: int = Field(default=0, ge=0)
    updated_at: datetime

    @property
    def open(self) -> bool:
        """Needs an operator's eye: active now, or flapping (whatever its state this instant)."""
        return self.state is AlarmState.ACTIVE or self.flapping

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_at is not None


@event("edgebus.alarm.acknowledged", version=1)
class AlarmAcknowledged(EventData):
    """An operator acknowledged one occurrence (the one raised at `raised_at`) of an alarm."""

    alarm_id: str = Field(pattern=ALARM_TOKEN)
    site: str
    raised_at: datetime
    by: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=2000)
    at: datetime


class NoticeKind(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"
    ACKNOWLEDGED = "acknowledged"
    FLAPPING_STARTED = "flapping_started"
    FLAP_SUMMARY = "flap_summary"
    FLAPPING_ENDED = "flapping_ended"
    SITE_STORM = "site_storm"  # per-site summary of changes not notified one by one


@event("edgebus.alarm.notice", version=1)
class AlarmNotice(EventData):
    """What operators are told (live on `center.alarms.notice.<site>`). Storms are rate-limited
    into summaries; flapping/storm summaries are also stored in the alarm activity history."""

    kind: NoticeKind
    site: str
    alarm_id: str | None = None
    severity: Severity | None = None
    state: AlarmState | None = None
    text: str = Field(default="", max_length=2000)
    transitions: int = Field(default=0, ge=0, description="changes this notice stands for")
    suppressed: int = Field(default=0, ge=0, description="changes not notified one by one")
    at: datetime


MAX_LIST = 1000
MAX_HISTORY = 1000


@event("edgebus.alarm.list", version=1)
class AlarmsQuery(EventData):
    """Operator: the open alarms (active or flapping), or every known alarm with `all`."""

    site: str | None = None
    severity: Severity | None = None
    include_cleared: bool = False
    limit: int = Field(default=200, ge=1, le=MAX_LIST)


@event("edgebus.alarm.listed", version=1)
class AlarmsList(EventData):
    alarms: list[AlarmRecord]
    total: int = Field(ge=0, description="matching alarms, of which `alarms` holds the first")


class SiteAlarmSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str
    health: SiteHealth
    critical: int = 0
    major: int = 0
    minor: int = 0
    warning: int = 0
    flapping: int = 0
    unacknowledged: int = 0


@event("edgebus.alarm.summary.query", version=1)
class AlarmsSummaryQuery(EventData):
    """Operator: per-site counts of open alarms by severity and the site health.

    `sites` given: exactly those sites (ok when they have none); empty: every site with one.
    """

    sites: list[str] = Field(default_factory=list, max_length=50_000)
    limit: int = Field(default=500, ge=0, le=MAX_LIST)


@event("edgebus.alarm.summary", version=1)
class AlarmsSummary(EventData):
    sites: list[SiteAlarmSummary] = Field(description="worst health first, at most `limit`")
    health: dict[str, SiteHealth] = Field(
        default_factory=dict, description="every site that is not ok (or each asked for)"
    )
    totals: dict[str, int] = Field(default_factory=dict, description="open alarms by severity")
    truncated: bool = False
    at: datetime


class HistoryKind(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"
    ACKNOWLEDGED = "acknowledged"
    FLAPPING_STARTED = "flapping_started"
    FLAP_SUMMARY = "flap_summary"
    FLAPPING_ENDED = "flapping_ended"
    SITE_STORM = "site_storm"


class AlarmHistoryEntry(BaseModel):
    """One thing that happened to an alarm, at its original time (`at`); `received_at` is
    when the center stored it (later than `at` for what a site owed after an outage)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: datetime
    kind: HistoryKind
    site: str
    alarm_id: str | None = None
    entity: str | None = None
    probable_cause: str | None = None
    severity: Severity | None = None
    text: str = ""
    by: str | None = None
    event_id: str
    received_at: datetime | None = None


@event("edgebus.alarm.history.query", version=1)
class AlarmHistoryQuery(EventData):
    site: str | None = None
    severity: Severity | None = None
    since: datetime
    until: datetime | None = None
    limit: int = Field(default=200, ge=1, le=MAX_HISTORY)


@event("edgebus.alarm.history", version=1)
class AlarmHistory(EventData):
    entries: list[AlarmHistoryEntry] = Field(description="oldest first, at most `limit`")
    truncated: bool = Field(default=False, description="more matched than `limit`, or scan cap")
    scanned: int = Field(default=0, ge=0)


@event("edgebus.alarm.ack", version=1)
class AlarmAck(EventData):
    """Operator: acknowledge the current occurrence of an alarm."""

    alarm_id: str = Field(pattern=ALARM_TOKEN)
    by: str = Field(default="operator", min_length=1, max_length=200)
    note: str = Field(default="", max_length=2000)


@event("edgebus.alarm.ack.reply", version=1)
class AlarmAckReply(EventData):
    """`accepted`: stored (or already acknowledged); `applied`: the state shows it already."""

    accepted: bool
    applied: bool = False
    reason: str = ""
    record: AlarmRecord | None = None


@event("edgebus.alarm.stats.query", version=1)
class AlarmsStatsQuery(EventData):
    """Every replica answers with its own counters (the leader's say what was processed)."""


@event("edgebus.alarm.stats", version=1)
class AlarmsStats(EventData):
    replica: str
    leader: bool
    records: int = Field(ge=0, description="alarm records this replica sees")
    counters: dict[str, int] = Field(default_factory=dict)
    at: datetime
    partitions: list[int] = Field(
        default_factory=list, description="the alarm partitions this replica leads"
    )


# -- edge rules (config kind "alarm_rules", applied by edge_agent/alarms) -----------------

RULE_ID = r"^[A-Za-z0-9_-]{1,64}$"
DEVICE_OR_ANY = r"^(\*|[A-Za-z0-9_-]{1,64})$"
FIELD_PATH = r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}$"
MAX_RULES = 500


class _Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=RULE_ID, description="the alarm's probable cause")
    severity: Severity = Severity.MAJOR
    device: str = Field(default="*", pattern=DEVICE_OR_ANY, description="device id or *")
    channel: str = Field(default="*", pattern=DEVICE_OR_ANY, description="channel or *")
    text: str = Field(default="", max_length=500, description="operator text, before details")


class ThresholdRule(_Rule):
    """Raise when `path` of a reading crosses `raise_at`, clear only once it is back past
    `clear_at` (hysteresis). `above`: raise at value >= raise_at, clear at value <= clear_at;
    `below`: raise at value <= raise_at, clear at value >= clear_at."""

    kind: Literal["threshold"] = "threshold"
    path: str = Field(pattern=FIELD_PATH, description="dotted path into the payload: temp, a.b.0")
    direction: Literal["above", "below"] = "above"
    raise_at: float
    clear_at: float

    @model_validator(mode="after")
    def _hysteresis(self) -> ThresholdRule:
        if self.direction == "above" and not self.clear_at < self.raise_at:
            raise ValueError(f"rule {self.id}: 'above' needs clear_at < raise_at")
        if self.direction == "below" and not self.clear_at > self.raise_at:
            raise ValueError(f"rule {self.id}: 'below' needs clear_at > raise_at")
        return self


class SilenceRule(_Rule):
    """Raise when a device (a channel of it, if given) sent nothing for longer than `after_s`;
    clear at its next reading. `device="*"`: every device seen since the agent started."""

    kind: Literal["silence"] = "silence"
    after_s: float = Field(gt=0, le=30 * 24 * 3600.0)


class RateRule(_Rule):
    """Raise as soon as a device sent more than `max_events` readings within one window of
    `window_s`; clear at the end of the first window with at most `max_events`."""

    kind: Literal["rate"] = "rate"
    max_events: int = Field(ge=0)
    window_s: float = Field(gt=0, le=24 * 3600.0)


AlarmRule = Annotated[ThresholdRule | SilenceRule | RateRule, Field(discriminator="kind")]


@register_config_kind("alarm_rules")
class AlarmRulesConfig(BaseModel):
    """The alarm rules a site evaluates on its own device readings (config kind
    `alarm_rules`). Rules are keyed by id: a new config that drops a rule clears its alarms."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    config_kind: ClassVar[str] = "alarm_rules"

    rules: list[AlarmRule] = Field(default_factory=list, max_length=MAX_RULES)

    @model_validator(mode="after")
    def _unique_ids(self) -> AlarmRulesConfig:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
        return self
