"""What the controller tells the rest of the center: audit events, availability, site alarms.

Every event is stored in a center stream (JetStream publish, `Nats-Msg-Id` = event id).
"""

from __future__ import annotations

from datetime import datetime

from bus import subjects
from bus.client import Bus
from bus.log import get_logger
from schemas.alarms import AlarmCleared, AlarmRaised, Severity, alarm_id
from schemas.controller import AuditEvent, AvailabilityChanged
from schemas.envelope import EventData
from services.controller.availability import (
    SITE_ALARM_ENTITY,
    SITE_OFFLINE_CAUSE,
    AlarmAction,
)

PUBLISH_TIMEOUT_S = 5.0


class Emitter:
    """Publishes controller events; a failed store is logged and counted, never raised
    (the registry write it reports has already happened)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.failures = 0
        self.published = 0
        self._log = get_logger("controller.emitter")

    async def _store(
        self, subject: str, data: EventData, *, site: str | None, correlation_id: str | None
    ) -> None:
        # The CloudEvents `subject` is the site the event is about.
        event = self._bus.event(data, subject=site, correlation_id=correlation_id)
        try:
            await self._bus.publish_js(subject, event, timeout=PUBLISH_TIMEOUT_S)
            self.published += 1
        except Exception as exc:
            self.failures += 1
            self._log.error(
                "event_store_failed", subject=subject, event_id=event.id, error=repr(exc)
            )

    async def audit(
        self,
        action: str,
        *,
        site: str | None,
        allowed: bool,
        reason: str,
        actor: str,
        at: datetime,
        correlation_id: str | None = None,
    ) -> None:
        data = AuditEvent(
            action=action,
            site=site,
            outcome="allowed" if allowed else "refused",
            reason=reason[:500],
            actor=actor[:200],
            at=at,
        )
        await self._store(subjects.audit(action), data, site=site, correlation_id=correlation_id)

    async def availability(self, changed: AvailabilityChanged) -> None:
        self._log.info(
            "availability_changed",
            site=changed.site,
            previous=changed.previous.value,
            current=changed.current.value,
            reason=changed.reason,
        )
        await self._store(
            subjects.site_availability(changed.site),
            changed,
            site=changed.site,
            correlation_id=None,
        )

    async def site_alarm(self, action: AlarmAction, site: str, text: str, at: datetime) -> None:
        """Raise or clear the site-offline alarm (`center.alarm.<site>`)."""
        if action == AlarmAction.NONE:
            return
        ident = alarm_id(site, SITE_ALARM_ENTITY, SITE_OFFLINE_CAUSE)
        data: EventData
        if action == AlarmAction.RAISE:
            data = AlarmRaised(
                alarm_id=ident,
                site=site,
                entity=SITE_ALARM_ENTITY,
                severity=Severity.MAJOR,
                probable_cause=SITE_OFFLINE_CAUSE,
                text=text[:2000],
                raised_at=at,
            )
        else:
            data = AlarmCleared(
                alarm_id=ident,
                site=site,
                entity=SITE_ALARM_ENTITY,
                probable_cause=SITE_OFFLINE_CAUSE,
                text=text[:2000],
                cleared_at=at,
            )
        self._log.info("site_alarm", site=site, action=action.value, alarm_id=ident)
        await self._store(subjects.center_alarm(site), data, site=site, correlation_id=None)
