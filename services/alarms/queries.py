"""Operator requests every replica answers (queue group): list, summary, history, ack, stats.

Reads come from this replica's copy of the ALARMS bucket; an acknowledgement is stored as an
event (alarm history) that the leader applies, and the answer waits until the copy shows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bus import subjects
from bus.client import Bus
from bus.kvmirror import KvMirror
from schemas.alarms import (
    AlarmAck,
    AlarmAcknowledged,
    AlarmAckReply,
    AlarmHistoryQuery,
    AlarmRecord,
    AlarmsList,
    AlarmsQuery,
    AlarmsStats,
    AlarmsStatsQuery,
    AlarmsSummary,
    AlarmsSummaryQuery,
    SiteAlarmSummary,
    SiteHealth,
)
from schemas.envelope import Event, EventData, utc_now
from services.alarms.config import AlarmsConfig
from services.alarms.history import read_history
from services.alarms.state import alarm_key, select, summarize, totals, worst_first

MAX_HEALTH_ENTRIES = 40_000  # keeps a summary reply under NATS' 1 MiB default payload
_ACK_POLL_S = 0.05


class AlarmRequests:
    """Handlers for `Bus.serve`; `counters` and `led` describe this replica for `stats`."""

    def __init__(
        self,
        bus: Bus,
        mirror: KvMirror[AlarmRecord],
        config: AlarmsConfig,
        *,
        counters: Callable[[], dict[str, int]],
        led: Callable[[], list[int]],
    ) -> None:
        self._bus = bus
        self._mirror = mirror
        self._config = config
        self._counters = counters
        self._led = led

    def lookup(self, alarm_id: str) -> AlarmRecord | None:
        return self._mirror.get(alarm_key(alarm_id))

    def _records(self) -> list[AlarmRecord]:
        return [record for _, record in self._mirror.items()]

    async def list_(self, request: Event[AlarmsQuery]) -> EventData:
        query = request.data
        found, total = select(
            self._records(),
            site=query.site,
            severity=query.severity,
            include_cleared=query.include_cleared,
            limit=query.limit,
        )
        return AlarmsList(alarms=found, total=total)

    async def summary(self, request: Event[AlarmsSummaryQuery]) -> EventData:
        query = request.data
        per_site = summarize(self._records())
        if query.sites:
            chosen = [
                per_site.get(site) or SiteAlarmSummary(site=site, health=SiteHealth.OK)
                for site in dict.fromkeys(query.sites)
            ]
        else:
            chosen = list(per_site.values())
        ordered = worst_first(chosen)
        health = {s.site: s.health for s in ordered if query.sites or s.health is not SiteHealth.OK}
        truncated = len(ordered) > query.limit or len(health) > MAX_HEALTH_ENTRIES
        if len(health) > MAX_HEALTH_ENTRIES:
            health = dict(list(health.items())[:MAX_HEALTH_ENTRIES])
        return AlarmsSummary(
            sites=ordered[: query.limit],
            health=health,
            totals=totals(chosen),
            truncated=truncated,
            at=utc_now(),
        )

    async def history(self, request: Event[AlarmHistoryQuery]) -> EventData:
        return await read_history(
            self._bus.nc,
            self._bus.js,
            request.data,
            self.lookup,
            max_scan=self._config.history_max_scan,
        )

    async def ack(self, request: Event[AlarmAck]) -> EventData:
        query = request.data
        record = self.lookup(query.alarm_id)
        if record is None:
            return AlarmAckReply(accepted=False, reason=f"no alarm {query.alarm_id}")
        if record.acknowledged:
            return AlarmAckReply(
                accepted=True,
                applied=True,
                reason=f"already acknowledged by {record.acknowledged_by}",
                record=record,
            )
        acknowledged = AlarmAcknowledged(
            alarm_id=record.alarm_id,
            site=record.site,
            raised_at=record.raised_at,
            by=query.by,
            note=query.note,
            at=utc_now(),
        )
        event = self._bus.event(acknowledged, subject=record.alarm_id)
        await self._bus.publish_js(subjects.alarm_ack(record.site), event)
        for _ in range(int(self._config.ack_visible_timeout_s / _ACK_POLL_S)):
            now = self.lookup(query.alarm_id)
            if now is not None and (now.acknowledged or now.raised_at != record.raised_at):
                return AlarmAckReply(accepted=True, applied=now.acknowledged, record=now)
            await asyncio.sleep(_ACK_POLL_S)
        return AlarmAckReply(
            accepted=True,
            applied=False,
            reason="stored; the alarms leader has not applied it yet",
            record=record,
        )

    async def stats(self, request: Event[AlarmsStatsQuery]) -> EventData:
        return AlarmsStats(
            replica=self._config.replica_id,
            leader=bool(led := self._led()),
            records=len(self._mirror),
            counters=self._counters(),
            at=utc_now(),
            partitions=led,
        )
