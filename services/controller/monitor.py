"""Heartbeats in, availability transitions out: every replica listens, the leader decides.

Liveness stays in memory; the registry gets state changes at once and sightings rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from datetime import datetime

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import subjects
from bus.client import Bus
from bus.lease import LeaderLease
from bus.log import get_logger
from schemas.controller import AvailabilityChanged, SiteHeartbeat, SiteRecord
from schemas.errors import EventDecodeError
from services.controller import records
from services.controller.availability import (
    Assessment,
    alarm_on_transition,
    next_check,
    reassess,
)
from services.controller.config import ControllerConfig
from services.controller.emitter import Emitter
from services.controller.liveness import LivenessTable, Sighting
from services.controller.registry import Registry

HEARTBEAT_KIND = "heartbeat"
COMPONENT = "controller-heartbeat"
# Each bad heartbeat source is dead-lettered at most this often (a deleted site that
# keeps heartbeating must not fill the dead-letter stream).
DEAD_LETTER_EVERY_S = 60.0
# Sites assessed between two yields to the event loop (a failover or a restart makes
# every site due at once).
YIELD_EVERY = 500


class AvailabilityMonitor:
    """Liveness table (all replicas), availability sweep and registry writes (leader only)."""

    def __init__(
        self,
        *,
        bus: Bus,
        registry: Registry,
        emitter: Emitter,
        lease: LeaderLease,
        config: ControllerConfig,
        clock: Callable[[], datetime],
    ) -> None:
        self._bus = bus
        self._registry = registry
        self._emitter = emitter
        self._lease = lease
        self._config = config
        self._policy = config.policy
        self._clock = clock
        self.table = LivenessTable(config.sweep_interval_s)
        # Silence is counted from here for sites not heard since (see availability.reassess).
        self.grace_from = clock()
        self._decode = bus.registry.decoder_for(SiteHeartbeat)
        self._persist_pending: dict[str, None] = {}  # insertion-ordered set
        self._persist_budget = 0.0
        self._budget_at = time.monotonic()
        self._reconnects_seen = 0
        self._dead_lettered_at: dict[tuple[str, str], float] = {}
        self._subscription: Subscription | None = None
        self.stats = {
            "heartbeats": 0,
            "rejected": 0,
            "transitions": 0,
            "persisted": 0,
            "sweeps": 0,
        }
        self._log = get_logger("controller.monitor", replica=config.replica_id)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Look at every known site once (restart grace), then listen to heartbeats."""
        now = self._clock().timestamp()
        for record in list(self._registry.records()):
            self.table.wheel.schedule(record.site, now)
        self._subscription = await self._bus.nc.subscribe(
            subjects.up_each(HEARTBEAT_KIND), cb=self._on_heartbeat
        )

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every `sweep_interval_s` while this replica leads."""
        while not stop.is_set():
            self._notice_reconnect()
            if self._lease.is_leader and self._bus.nc.is_connected:
                try:
                    await self.sweep()
                except Exception as exc:  # a failed write is retried on the next sweep
                    self._log.error("sweep_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.sweep_interval_s)

    def _notice_reconnect(self) -> None:
        """Heartbeats were missed while this replica's NATS connection was down: restart
        the grace period rather than blame the sites."""
        reconnects = int(self._bus.nc.stats.get("reconnects", 0))
        if reconnects != self._reconnects_seen:
            self._reconnects_seen = reconnects
            self.grace_from = self._clock()
            self._log.warning("reconnected_grace_restarted", reconnects=reconnects)

    # -- heartbeats (every replica) ---------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        self.stats["heartbeats"] += 1
        if self.stats["heartbeats"] % 256 == 0:
            # nats-py runs this callback back to back while messages are queued: under a
            # heartbeat flood the lease renewal starved and leadership was lost (measured).
            await asyncio.sleep(0)
        try:
            heartbeat = self._decode(msg.data).data
        except EventDecodeError as exc:
            await self._reject(msg, msg.subject, exc.reason, exc.message)
            return
        parsed = subjects.parse_up(msg.subject)
        site = heartbeat.site
        if parsed is None or parsed[0] != site:
            await self._reject(
                msg, msg.subject, "site_mismatch", f"heartbeat for {site} on {msg.subject}"
            )
            return
        record = self._registry.get(site)
        if record is None:
            await self._reject(msg, site, "unknown_site", f"no site {site} in the registry")
            return
        now = self._clock()
        sighting = Sighting(heard=now, inventory=heartbeat.inventory, seq=heartbeat.seq)
        self.table.observe(site, sighting)
        assessment = reassess(
            record.availability, now, heartbeat.inventory, self.grace_from, now, self._policy
        )
        if assessment.availability != record.availability:
            self.table.wheel.schedule(site, now.timestamp())  # due at the next sweep
        else:
            check = next_check(now, self.grace_from, now, self._policy)
            if check is not None:
                self.table.wheel.schedule(site, check.timestamp())
        if self._lease.is_leader and records.persist_due(
            record, sighting, self._config.persist_every_s
        ):
            self._persist_pending[site] = None

    async def _reject(self, msg: Msg, key: str, reason: str, detail: str) -> None:
        """Dead-letter a bad heartbeat: by the leader only (every replica receives it),
        and at most once a minute per source and reason."""
        self.stats["rejected"] += 1
        if not self._lease.is_leader:
            return
        now = time.monotonic()
        last = self._dead_lettered_at.get((key, reason))
        if last is not None and now - last < DEAD_LETTER_EVERY_S:
            return
        if len(self._dead_lettered_at) > 10_000:
            self._dead_lettered_at.clear()
        self._dead_lettered_at[(key, reason)] = now
        await self._bus.dead_letters.record(
            component=COMPONENT,
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            reason=reason,
            detail=detail,
        )

    # -- the sweep (leader) ----------------------------------------------------------------

    async def sweep(self) -> None:
        """Assess the sites that are due, write transitions, then persist some sightings."""
        self.stats["sweeps"] += 1
        now = self._clock()
        due = self.table.wheel.pop_due(now.timestamp())
        width = self._config.write_concurrency
        for start in range(0, len(due), YIELD_EVERY):
            changing = [site for site in due[start : start + YIELD_EVERY] if self._due(site, now)]
            for i in range(0, len(changing), width):
                await asyncio.gather(
                    *(self._transition(site, now) for site in changing[i : i + width])
                )
            await asyncio.sleep(0)
        await self._persist_some()

    def _due(self, site: str, now: datetime) -> bool:
        """Reschedule a site the wheel popped; True if its state must change now."""
        record = self._registry.get(site)
        if record is None:
            self.table.forget(site)
            return False
        sighting = self.table.get(site)
        heard = sighting.heard if sighting is not None else None
        check = next_check(heard, self.grace_from, now, self._policy)
        if check is not None:
            self.table.wheel.schedule_earlier(site, check.timestamp())
        return self._reassess(record, sighting, now).availability != record.availability

    def _reassess(self, record: SiteRecord, sighting: Sighting | None, now: datetime) -> Assessment:
        return reassess(
            record.availability,
            sighting.heard if sighting is not None else None,
            sighting.inventory if sighting is not None else record.inventory,
            self.grace_from,
            now,
            self._policy,
        )

    async def _transition(self, site: str, now: datetime) -> None:
        try:
            await self._write_transition(site, now)
        except Exception as exc:  # NATS trouble: look again at the next sweep
            self._log.warning("transition_failed", site=site, error=repr(exc))
            self.table.wheel.schedule(site, now.timestamp() + self._config.sweep_interval_s)

    async def _write_transition(self, site: str, now: datetime) -> None:
        sighting = self.table.get(site)

        def change(record: SiteRecord | None) -> SiteRecord | None:
            # Recomputed on the freshest record: another writer may have moved it already.
            if record is None:
                return None
            assessment = self._reassess(record, sighting, now)
            if assessment.availability == record.availability:
                return record
            return records.with_availability(record, assessment, now, sighting)

        done = await self._registry.mutate(site, change)
        before, after = done.before, done.after
        if not done.written or before is None or after is None:
            return
        self.stats["transitions"] += 1
        self._persist_pending.pop(site, None)
        await self._emitter.availability(
            AvailabilityChanged(
                site=site,
                previous=before.availability,
                current=after.availability,
                reason=after.availability_reason,
                at=now,
                last_seen=after.last_seen,
            )
        )
        alarm = alarm_on_transition(before.availability, after.availability, after.managed)
        await self._emitter.site_alarm(
            alarm, site, f"site {site} {after.availability.value}: {after.availability_reason}", now
        )

    async def _persist_some(self) -> None:
        """Write pending sightings within the write budget (`max_persist_per_s`)."""
        rate = self._config.max_persist_per_s
        now_m = time.monotonic()
        self._persist_budget = min(rate, self._persist_budget + (now_m - self._budget_at) * rate)
        self._budget_at = now_m
        take = min(int(self._persist_budget), len(self._persist_pending))
        if take <= 0:
            return
        batch = list(itertools.islice(self._persist_pending, take))  # oldest first
        for site in batch:
            del self._persist_pending[site]
        self._persist_budget -= take
        width = self._config.write_concurrency
        for i in range(0, len(batch), width):
            await asyncio.gather(*(self._persist(site) for site in batch[i : i + width]))

    async def _persist(self, site: str) -> None:
        sighting = self.table.get(site)
        if sighting is None:
            return

        def change(record: SiteRecord | None) -> SiteRecord | None:
            return records.with_sighting(record, sighting) if record is not None else None

        try:
            done = await self._registry.mutate(site, change)
        except Exception as exc:
            self._log.warning("persist_failed", site=site, error=repr(exc))
            self._persist_pending[site] = None
            return
        if done.written:
            self.stats["persisted"] += 1
