"""`ControllerService`: one controller replica; run as many as you like against one NATS.

Requests are shared through a queue group, the registry through KV, the sweep by a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nats.aio.subscription import Subscription

from bus import subjects
from bus.client import Bus
from bus.lease import LeaderLease
from bus.log import get_logger
from bus.streams import (
    BOOTSTRAP_TOKENS_KV,
    SITES_KV,
    audit_stream,
    center_alarm_stream,
    controller_lease_kv,
    dead_letter_stream,
    ensure_kv,
    ensure_stream,
    site_events_center_stream,
)
from schemas.controller import (
    ControllerStats,
    ControllerStatsQuery,
    OnboardRequest,
    SiteChange,
    SitesAdd,
    SitesQuery,
)
from schemas.envelope import Event, EventData, utc_now
from schemas.sync import ConfigBundle, ConfigBundleQuery
from services.controller.config import ControllerConfig
from services.controller.credentials import SiteAuthority
from services.controller.emitter import Emitter
from services.controller.handlers import SiteRequests, TokenStore
from services.controller.monitor import AvailabilityMonitor
from services.controller.registry import Registry

SERVICE = "controller"
REGISTRY_CHECK_S = 2.0


def request_subjects() -> dict[str, str]:
    """Operation name -> subject of every request the controller answers."""
    return {
        "add": subjects.control(SERVICE, "sites", "add"),
        "query": subjects.control(SERVICE, "sites", "query"),
        "change": subjects.control(SERVICE, "sites", "change"),
        "onboard": subjects.control(SERVICE, "onboard"),
        "stats": subjects.control(SERVICE, "stats"),
    }


class ControllerService:
    """The center's site registry, onboarding, heartbeats and availability (one replica).

    `authority` issues and revokes per-site credentials; None runs a development center
    without auth (sites then get `user_jwt=None`). The caller owns `bus` and closes it.
    """

    def __init__(
        self,
        bus: Bus,
        config: ControllerConfig | None = None,
        authority: SiteAuthority | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.bus = bus
        self.config = config or ControllerConfig()
        self.authority = authority
        self._clock = clock
        self.registry: Registry | None = None
        self.lease: LeaderLease | None = None
        self.monitor: AvailabilityMonitor | None = None
        self.requests: SiteRequests | None = None
        self._subscriptions: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = asyncio.Event()
        self.started = asyncio.Event()  # set once every request subject is served
        self._log = get_logger("controller", replica=self.config.replica_id)

    @property
    def is_leader(self) -> bool:
        return self.lease is not None and self.lease.is_leader

    async def start(self) -> None:
        js = self.bus.js
        for spec in (
            dead_letter_stream(subjects.CENTER),
            site_events_center_stream(),
            audit_stream(),
            center_alarm_stream(),
        ):
            await ensure_stream(js, spec)
        sites_kv = await ensure_kv(js, SITES_KV)
        tokens_kv = await ensure_kv(js, BOOTSTRAP_TOKENS_KV)
        lease_kv = await ensure_kv(js, controller_lease_kv(self.config.lease_ttl_s))

        self.registry = Registry(js, sites_kv, SITES_KV.bucket)
        await self.registry.start()
        self.lease = LeaderLease(lease_kv, self.config.replica_id, self.config.lease_ttl_s)
        emitter = Emitter(self.bus)
        self.monitor = AvailabilityMonitor(
            bus=self.bus,
            registry=self.registry,
            emitter=emitter,
            lease=self.lease,
            config=self.config,
            clock=self._clock,
        )
        self.requests = SiteRequests(
            registry=self.registry,
            tokens=TokenStore(tokens_kv),
            emitter=emitter,
            config=self.config,
            authority=self.authority,
            sightings=self.monitor.table.get,
            clock=self._clock,
            desired_config=self._desired_config,
        )
        await self.monitor.start()
        await self.lease.tick()
        self._tasks = [
            asyncio.create_task(self._keep_lease()),
            asyncio.create_task(self._keep_registry()),
        ]

        ops = request_subjects()
        queue = self.config.request_queue
        requests = self.requests
        self._subscriptions += [
            await self.bus.serve(
                ops["add"], SitesAdd, requests.add, queue=queue, component="controller-add"
            ),
            await self.bus.serve(
                ops["query"], SitesQuery, requests.query, queue=queue, component="controller-query"
            ),
            await self.bus.serve(
                ops["change"],
                SiteChange,
                requests.change,
                queue=queue,
                component="controller-change",
            ),
            await self.bus.serve(
                ops["onboard"],
                OnboardRequest,
                requests.onboard,
                queue=queue,
                component="controller-onboard",
            ),
            # Every replica answers from its own counters: the first reply wins.
            await self.bus.serve(
                ops["stats"], ControllerStatsQuery, self._stats, component="controller-stats"
            ),
        ]
        await self.bus.confirm_subscriptions()
        self.started.set()
        self._log.info(
            "controller_started",
            sites=len(self.registry),
            leader=self.lease.is_leader,
            heartbeat_interval_s=self.config.policy.heartbeat_interval_s,
            offline_after_s=self.config.policy.offline_after_s,
        )

    async def _desired_config(self, site: str) -> dict[str, Any]:
        """The site's whole config from the sync service, for its onboarding reply; `{}`
        if sync does not answer in time (the site then pulls it when its agent starts)."""
        try:
            answer = await self.bus.request(
                subjects.control("sync", "bundle"),
                ConfigBundleQuery(site=site),
                ConfigBundle,
                timeout=self.config.config_lookup_timeout_s,
            )
        except Exception as exc:
            self._log.warning("onboarding_without_config", site=site, error=repr(exc))
            return {}
        return answer.data.model_dump(mode="json")

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until `stop` is set, then stop cleanly (handing the lease over)."""
        await self.start()
        assert self.monitor is not None
        try:
            await self.monitor.run(stop)
        finally:
            await self.close()

    async def _stats(self, request: Event[ControllerStatsQuery]) -> EventData:
        assert self.monitor is not None and self.registry is not None
        assert self.requests is not None
        counters = dict(self.monitor.stats)
        counters.update({f"served_{op}": n for op, n in self.requests.served.items()})
        counters["registry_conflicts"] = self.registry.conflicts
        counters["registry_resyncs"] = self.registry.resyncs
        return ControllerStats(
            replica=self.config.replica_id,
            leader=self.is_leader,
            sites=len(self.registry),
            tracked=len(self.monitor.table),
            counters=counters,
            at=self._clock(),
        )

    async def _keep_lease(self) -> None:
        assert self.lease is not None
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.config.lease_renew_s)
            if not self._closing.is_set():
                await self.lease.tick()

    async def _keep_registry(self) -> None:
        """Re-synchronise the registry copy after a reconnect (the server may have restarted
        and lost the watcher's consumer), and whenever the watchdog finds it stalled."""
        assert self.registry is not None
        reconnects = self.bus.nc.stats.get("reconnects", 0)
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), REGISTRY_CHECK_S)
            if self._closing.is_set() or not self.bus.nc.is_connected:
                continue
            try:
                now_reconnects = self.bus.nc.stats.get("reconnects", 0)
                if now_reconnects != reconnects:
                    reconnects = now_reconnects
                    await self.registry.resync()
                else:
                    await self.registry.check()
            except Exception as exc:  # retried at the next check
                self._log.warning("registry_check_failed", error=repr(exc))

    async def close(self) -> None:
        """Finish in-flight requests, stop listening, release the lease."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.drain()  # type: ignore[no-untyped-call]
        if self.monitor is not None:
            await self.monitor.stop()
        self._closing.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        if self.lease is not None and not self.bus.nc.is_closed:
            await self.lease.release()
        if self.registry is not None:
            await self.registry.stop()
        self._log.info("controller_stopped")
