"""The site's own alarms: idempotent raise and clear, published locally and owed to the center.

Each change goes out on `evt.<site>.alarm` and into the replay log (kind "alarm", key = entity);
with a store, the active set survives a restart of the agent.
"""

from __future__ import annotations

import re
from collections import deque
from datetime import UTC, datetime
from typing import Any

from bus import subjects
from bus.client import Bus
from bus.log import get_logger
from bus.replaylog import AppendStatus, LogEntry, ReplayLog
from edge_agent.alarms.store import ActiveAlarmStore, Stored
from schemas import Event
from schemas.alarms import AlarmCleared, AlarmRaised, Severity, alarm_id

ALARM_KIND = "alarm"
DEFAULT_MAX_PENDING = 1000
_NOT_A_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def replay_key(entity: str) -> str:
    """The replay-log key (one subject token) for an entity; it only groups entries for order."""
    return _NOT_A_TOKEN.sub("_", entity)[:64] or "_"


class LocalAlarms:
    """Active alarms of one site. Raising an active alarm or clearing an inactive one does nothing.

    An alarm change the replay log refuses (full, refuse_new) waits in a small bounded list and
    is retried, in order, before the next change and on every `flush_pending` (monitor tick):
    an alarm about a full log must still reach the center once there is room. A log that
    drops entries (drop_oldest, max age) may drop an alarm's own entry before it is forwarded:
    `reassert` logs the active alarms again (same event ids: the center keeps one copy).
    """

    def __init__(
        self,
        bus: Bus,
        replay_log: ReplayLog,
        site: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        store: ActiveAlarmStore | None = None,
    ) -> None:
        self.site = subjects.site_id(site)
        self._bus = bus
        self._replay_log = replay_log
        self._store = store
        # The event that raised each active alarm, and its owner (restored: what this agent
        # raised before it restarted).
        self._raised: dict[str, Stored] = store.load() if store else {}
        self._active: dict[str, AlarmRaised] = {i: s.event.data for i, s in self._raised.items()}
        self._reasserted = 0
        self._pending: deque[LogEntry] = deque()
        self._max_pending = max_pending
        self.lost = 0  # changes dropped from a full pending list (logged as errors)
        self._log = get_logger("edge_agent.alarms", site=self.site)

    def active(self) -> list[AlarmRaised]:
        return list(self._active.values())

    def is_active(self, entity: str, probable_cause: str) -> bool:
        return alarm_id(self.site, entity, probable_cause) in self._active

    def owned_by(self, owner: str) -> list[AlarmRaised]:
        """The active alarms `owner` raised (e.g. before a restart: it still owes their clears)."""
        return [s.event.data for s in self._raised.values() if s.owner == owner]

    @property
    def pending(self) -> int:
        """Alarm changes published locally but not yet in the replay log."""
        return len(self._pending)

    async def raise_(
        self,
        entity: str,
        probable_cause: str,
        severity: Severity,
        text: str,
        *,
        at: datetime | None = None,
        owner: str = "",
    ) -> bool:
        """Raise an alarm (at `at`, default now); False (nothing published) if already active.
        `owner`: the part of the agent that will clear it (kept across restarts)."""
        identity = alarm_id(self.site, entity, probable_cause)
        if identity in self._active:
            return False
        data = AlarmRaised(
            alarm_id=identity,
            site=self.site,
            entity=entity,
            severity=severity,
            probable_cause=probable_cause,
            text=text,
            raised_at=at or datetime.now(UTC),
        )
        self._active[identity] = data
        self._log.warning("alarm_raised", alarm_id=identity, severity=str(severity), text=text)
        event = self._bus.event(data, subject=identity)
        self._raised[identity] = Stored(event, owner)
        self._save()
        await self._publish(entity, event)
        return True

    async def clear(
        self, entity: str, probable_cause: str, text: str = "", *, at: datetime | None = None
    ) -> bool:
        """Clear an alarm (at `at`, default now); False (nothing published) if not active."""
        identity = alarm_id(self.site, entity, probable_cause)
        if self._active.pop(identity, None) is None:
            return False
        self._raised.pop(identity, None)
        self._save()
        data = AlarmCleared(
            alarm_id=identity,
            site=self.site,
            entity=entity,
            probable_cause=probable_cause,
            text=text,
            cleared_at=at or datetime.now(UTC),
        )
        self._log.info("alarm_cleared", alarm_id=identity, text=text)
        await self._publish(entity, self._bus.event(data, subject=identity))
        return True

    async def reassert(self) -> int:
        """Log every active alarm's raise event again; call after the log dropped entries.

        A fresh append id per copy (the log's own dedup would refuse the event id again);
        the forwarder sends each copy with the event id, so the center stores it once.
        """
        for identity, stored in self._raised.items():
            self._reasserted += 1
            entity, event = self._active[identity].entity, stored.event
            self._enqueue(
                LogEntry(
                    kind=ALARM_KIND,
                    key=replay_key(entity),
                    event=event,
                    dedup_id=f"{event.id}.{self._reasserted}",
                )
            )
        return await self.flush_pending()

    async def flush_pending(self) -> int:
        """Append waiting alarm changes to the replay log, oldest first; returns how many remain."""
        while self._pending:
            entry = self._pending[0]
            try:
                result = await self._replay_log.append(entry)
            except Exception as exc:  # the site's JetStream is not answering: retry later
                self._log.warning("alarm_append_failed", event_id=entry.event.id, error=repr(exc))
                break
            if result.status is AppendStatus.REFUSED:
                break
            self._pending.popleft()
        return len(self._pending)

    def _save(self) -> None:
        if self._store is None:
            return
        try:
            self._store.save(self._raised)
        except OSError as exc:  # the disk is full: the alarm still goes out, unremembered
            self._log.error("alarm_store_failed", error=repr(exc))

    async def _publish(self, entity: str, event: Event[Any]) -> None:
        try:
            await self._bus.publish(subjects.site_event(self.site, ALARM_KIND), event)
        except Exception as exc:  # local subscribers miss it; the replay log still has it
            self._log.warning("alarm_publish_failed", event_id=event.id, error=repr(exc))
        self._enqueue(LogEntry(kind=ALARM_KIND, key=replay_key(entity), event=event))
        if await self.flush_pending():
            self._log.warning("alarm_change_pending", event_id=event.id, pending=self.pending)

    def _enqueue(self, entry: LogEntry) -> None:
        if len(self._pending) >= self._max_pending:
            lost = self._pending.popleft()
            self.lost += 1
            self._log.error(
                "alarm_change_lost",
                event_id=lost.event.id,
                detail="replay log refused alarm changes for too long; oldest dropped",
            )
        self._pending.append(entry)
