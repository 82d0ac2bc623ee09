"""`ControllerService`: one controller replica; run as many as you like against one NATS.

Requests are shared through a queue group, the registry through KV, the sweep by a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime

from nats.aio.subscription import Subscription

from bus import subjects
from bus.client import Bus
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
from schemas.controller import OnboardRequest, SiteChange, SitesAdd, SitesQuery
from schemas.envelope import utc_now
from services.controller.config import ControllerConfig
from services.controller.credentials import SiteAuthority
from services.controller.emitter import Emitter
from services.controller.handlers import SiteRequests, TokenStore
from services.controller.lease import LeaderLease
from services.controller.monitor import AvailabilityMonitor
from services.controller.registry import Registry

SERVICE = "controller"


def request_subjects() -> dict[str, str]:
    """Operation name -> subject of every request the controller answers."""
    return {
        "add": subjects.control(SERVICE, "sites", "add"),
        "query": subjects.control(SERVICE, "sites", "query"),
        "change": subjects.control(SERVICE, "sites", "change"),
        "onboard": subjects.control(SERVICE, "onboard"),
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
        self._lease_task: asyncio.Task[None] | None = None
        self._lease_stop = asyncio.Event()
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
        )
        await self.monitor.start()
        await self.lease.tick()
        self._lease_task = asyncio.create_task(self._keep_lease())

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
        ]
        # The server must have our subscriptions before anyone is told we are up.
        await self.bus.nc.flush()
        self.started.set()
        self._log.info(
            "controller_started",
            sites=len(self.registry),
            leader=self.lease.is_leader,
            heartbeat_interval_s=self.config.policy.heartbeat_interval_s,
            offline_after_s=self.config.policy.offline_after_s,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until `stop` is set, then stop cleanly (handing the lease over)."""
        await self.start()
        assert self.monitor is not None
        try:
            await self.monitor.run(stop)
        finally:
            await self.close()

    async def _keep_lease(self) -> None:
        assert self.lease is not None
        while not self._lease_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lease_stop.wait(), self.config.lease_renew_s)
            if not self._lease_stop.is_set():
                await self.lease.tick()

    async def close(self) -> None:
        """Finish in-flight requests, stop listening, release the lease."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.drain()  # type: ignore[no-untyped-call]
        if self.monitor is not None:
            await self.monitor.stop()
        self._lease_stop.set()
        if self._lease_task is not None:
            with contextlib.suppress(Exception):
                await self._lease_task
            self._lease_task = None
        if self.lease is not None and not self.bus.nc.is_closed:
            await self.lease.release()
        if self.registry is not None:
            await self.registry.stop()
        self._log.info("controller_stopped")
