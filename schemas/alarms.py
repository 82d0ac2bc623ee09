"""Alarm events: raised and cleared at a site (even offline), aggregated at the center.

An alarm's id is derived from (site, entity, probable cause): raising it again is idempotent
and clearing it needs that same id.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

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
