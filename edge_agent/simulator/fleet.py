"""`SimulatedFleet`: many virtual sites over a few NATS connections, on the real site protocol.

Onboarding (`sites.add` + `OnboardRequest` with the token) and `SiteHeartbeat` every interval,
spread evenly; a chosen subset can go silent and come back; `blast` measures the center.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.log import get_logger
from edge_agent.heartbeat.sender import HEARTBEAT_KIND
from edge_agent.simulator import plan
from edge_agent.simulator.config import SimulatorConfig
from edge_agent.simulator.config_sync import SimulatedConfigSync
from edge_agent.simulator.onboarding import FleetOnboarding, OnboardSummary, fleet_records
from edge_agent.simulator.wire import (
    HeartbeatTemplate,
    heartbeat_bytes,
    inventory_json,
    time_json,
)
from schemas.controller import Inventory
from schemas.ids import new_event_id

# Beats sent between two yields to the event loop (lets nats-py's flusher stream them).
YIELD_EVERY = 500
BLAST_CHUNK = 1000

Gate = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class FleetStats:
    sites: int
    onboarded: int
    silenced: int
    beats_sent: int  # handed to the connection
    beats_silent: int  # slots of silenced sites (counted in their `seq`, not sent)
    beats_skipped: int  # the connection was down at that moment
    beats_missed: int  # slots dropped because the scheduler fell over an interval behind
    beats_failed: int
    blasted: int
    last_error: str | None


@dataclass(frozen=True)
class BlastResult:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class SimulatedFleet:
    """N virtual sites speaking the site protocol to the center, over `config.connections`
    connections of one simulator identity.

    `async with SimulatedFleet(config) as fleet:` connects; then `start_heartbeats()` and
    `await onboard()` (in either order: a site beats once it is onboarded, the first time
    at once, as a real site does), `silence()`/`resume()` subsets, `blast()` for throughput.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        n = config.sites
        self.ids: list[str] = plan.site_ids(config.prefix, n)
        self._subjects = [subjects.up(site, HEARTBEAT_KIND) for site in self.ids]
        self._onboarded = bytearray(n)
        self._silenced = bytearray(n)
        self._seq = array("q", bytes(8 * n))
        self._last_beat = array("d", bytes(8 * n))  # unix time of the last beat sent, 0: none
        self._rng = random.Random(config.seed)
        self._buses: list[Bus] = []
        self._beats: asyncio.Task[None] | None = None
        self._stop_beats = asyncio.Event()
        self._template: HeartbeatTemplate | None = None
        self._blast_inventory: dict[int, bytes] = {}
        self._counts = {"sent": 0, "silent": 0, "skipped": 0, "missed": 0, "failed": 0}
        self._blasted = 0
        self._last_error: str | None = None
        self.onboarding: OnboardSummary | None = None  # of the latest `onboard()`
        self.config_sync: SimulatedConfigSync | None = None
        self._log = get_logger("edge_agent.simulator", fleet=config.prefix)

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        c = self.config
        for k in range(c.connections):
            nats_config = NatsConfig.from_url(
                c.server, name=f"edgebus-simulator-{c.prefix}-{k}", credentials=c.credentials
            )
            self._buses.append(
                await Bus.connect(nats_config, scope=c.prefix, source=f"/simulator/{c.prefix}")
            )

    async def close(self) -> None:
        await self.stop_heartbeats()
        if self.config_sync is not None:
            with contextlib.suppress(Exception):
                await self.config_sync.stop()
        buses, self._buses = self._buses, []
        for bus in buses:
            with contextlib.suppress(Exception):
                await bus.close()

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def buses(self) -> Sequence[Bus]:
        return self._buses

    def _bus_for(self, index: int) -> Bus:
        return self._buses[index % len(self._buses)]

    # -- config sync ----------------------------------------------------------------------

    async def start_config_sync(self) -> SimulatedConfigSync:
        """Answer config pushes for the onboarded virtual sites, as their agents would."""
        if self.config_sync is None:
            self.config_sync = SimulatedConfigSync(self._buses, self._answers_config)
            await self.config_sync.start()
        return self.config_sync

    def _answers_config(self, site: str) -> bool:
        index = plan.site_index(self.config.prefix, self.config.sites, site)
        return index is not None and bool(self._onboarded[index])

    def mark_onboarded(self, sites: Iterable[str]) -> None:
        """Sites registered and onboarded by other means (a benchmark that writes the
        registry directly): they then heartbeat and answer config like the others."""
        for site in sites:
            self._onboarded[self.index(site)] = 1

    # -- onboarding -----------------------------------------------------------------------

    async def onboard(self, *, adopt: bool = True) -> OnboardSummary:
        """Add and onboard every site not onboarded yet.

        With `adopt`, sites this fleet onboarded in an earlier run (same prefix, found by
        label in the registry) are taken over as they are: a token onboards only once.
        """
        adopted = await self._adopt() if adopt else 0
        pending = [i for i in range(self.config.sites) if not self._onboarded[i]]
        onboarding = FleetOnboarding(
            self.config,
            self.ids,
            self._buses,
            inventory=self.inventory,
            on_onboarded=self._first_beat,
        )
        self.onboarding = onboarding.summary  # live: readable while it runs
        summary = await onboarding.run(pending, adopted)
        self._log.info(
            "fleet_onboarded",
            onboarded=summary.onboarded,
            adopted=summary.adopted,
            refused=len(summary.refused),
            seconds=round(summary.seconds, 2),
        )
        return summary

    async def _adopt(self) -> int:
        records = await fleet_records(
            self._buses[0], self.config.prefix, self.config.request_timeout_s
        )
        adopted = 0
        for record in records:
            index = plan.site_index(self.config.prefix, self.config.sites, record.site)
            if index is not None and record.onboarded_at is not None:
                self._onboarded[index] = 1
                adopted += 1
        return adopted

    async def _first_beat(self, index: int) -> None:
        self._onboarded[index] = 1
        await self._beat(index, datetime.now(UTC))

    def inventory(self, index: int) -> Inventory:
        return plan.inventory_of(index, self.config.agent_version, time.time(), self._rng)

    def is_onboarded(self, site: str) -> bool:
        return bool(self._onboarded[self.index(site)])

    @property
    def onboarded_count(self) -> int:
        return self.config.sites - self._onboarded.count(0)

    def index(self, site: str) -> int:
        index = plan.site_index(self.config.prefix, self.config.sites, site)
        if index is None:
            raise KeyError(f"{site!r} is not a site of this fleet")
        return index

    # -- heartbeats -----------------------------------------------------------------------

    def start_heartbeats(self) -> None:
        if self._beats is None:
            self._stop_beats.clear()
            self._beats = asyncio.create_task(self._beat_loop(), name="simulator-heartbeats")

    async def stop_heartbeats(self) -> None:
        task, self._beats = self._beats, None
        if task is None:
            return
        self._stop_beats.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _beat_loop(self) -> None:
        schedule = plan.BeatSchedule(self.config.sites, self.config.interval_s)
        start = time.monotonic()
        handled = 0  # beat numbers dealt with (sent, or skipped for a reason)
        while not self._stop_beats.is_set():
            due = schedule.due(time.monotonic() - start)
            resume_at = schedule.catch_up(handled, due)
            self._counts["missed"] += resume_at - handled
            handled = resume_at
            while handled < due:
                end = min(due, handled + YIELD_EVERY)
                for beat in range(handled, end):
                    index = schedule.site_of(beat)
                    if self._onboarded[index]:
                        await self._beat(index, datetime.now(UTC))
                handled = end
                await asyncio.sleep(0)
            next_due = start + handled * self.config.interval_s / self.config.sites
            delay = max(self.config.tick_s, next_due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_beats.wait(), delay)

    async def _beat(self, index: int, now: datetime) -> None:
        """One heartbeat slot of one site: numbered always, sent unless silenced or cut off."""
        seq = self._seq[index]
        self._seq[index] = seq + 1
        if self._silenced[index]:
            self._counts["silent"] += 1
            return
        bus = self._bus_for(index)
        if not bus.nc.is_connected:
            self._counts["skipped"] += 1
            return
        try:
            raw = heartbeat_bytes(self.ids[index], seq, self.inventory(index), now)
            await bus.nc.publish(self._subjects[index], raw)
        except Exception as exc:  # a heartbeat must never take the fleet down
            self._counts["failed"] += 1
            self._last_error = repr(exc)
            return
        self._counts["sent"] += 1
        self._last_beat[index] = now.timestamp()

    def last_beat_at(self, site: str) -> float | None:
        """Unix time of the last heartbeat sent for `site`, None if never."""
        at = self._last_beat[self.index(site)]
        return at if at > 0 else None

    # -- silence ------------------------------------------------------------------------

    def spread(self, count: int) -> list[str]:
        """`count` site ids spread evenly over the fleet (all groups and id ranges)."""
        return [self.ids[i] for i in plan.spread(self.config.sites, count)]

    def silence(self, sites: Iterable[str]) -> list[str]:
        """These sites stop heartbeating (as if their link were cut) until `resume`."""
        chosen = [self.ids[self.index(site)] for site in sites]
        for site in chosen:
            self._silenced[self.index(site)] = 1
        return chosen

    async def resume(self, sites: Iterable[str], *, beat_now: bool = False) -> None:
        """These sites heartbeat again: from their next slot, or at once with `beat_now`."""
        for site in sites:
            index = self.index(site)
            self._silenced[index] = 0
            if beat_now and self._onboarded[index]:
                await self._beat(index, datetime.now(UTC))

    @property
    def silenced(self) -> list[str]:
        return [self.ids[i] for i, flag in enumerate(self._silenced) if flag]

    # -- throughput -----------------------------------------------------------------------

    async def blast(
        self,
        *,
        count: int | None = None,
        duration_s: float | None = None,
        sites: Sequence[str] | None = None,
        gate: Gate | None = None,
    ) -> BlastResult:
        """Heartbeats as fast as this process can send them, round-robin over `sites`
        (default: every onboarded, unsilenced site), until `count` sent or `duration_s`.

        Same events as the schedule sends (fresh id and time, the site's next `seq`), from
        a byte-exact template. After every chunk `gate(sent)` may hold the blast back (a
        closed loop that keeps the receiver saturated without unbounded queues).
        """
        if count is None and duration_s is None:
            raise ValueError("give count or duration_s")
        if sites is not None:
            indices = [self.index(s) for s in sites]
        else:
            indices = [
                i for i in range(self.config.sites) if self._onboarded[i] and not self._silenced[i]
            ]
        if not indices:
            return BlastResult(0, 0.0)
        template = self._blast_template(indices)
        inventories = self._blast_inventory
        names = [self.ids[i].encode() for i in indices]
        limit = count if count is not None else 1 << 62
        started = time.monotonic()
        deadline = started + duration_s if duration_s is not None else float("inf")
        sent, position = 0, 0
        while sent < limit and time.monotonic() < deadline:
            now = datetime.now(UTC)
            now_json, now_s = time_json(now), now.timestamp()
            for _ in range(min(BLAST_CHUNK, limit - sent)):
                index = indices[position]
                seq = self._seq[index]
                self._seq[index] = seq + 1
                raw = template.render(
                    new_event_id(), names[position], now_json, seq, inventories[index]
                )
                await self._bus_for(index).nc.publish(self._subjects[index], raw)
                self._last_beat[index] = now_s
                position = (position + 1) % len(indices)
                sent += 1
            await asyncio.sleep(0)
            if gate is not None:
                await gate(sent)
        seconds = time.monotonic() - started
        self._blasted += sent
        return BlastResult(sent, seconds)

    def _blast_template(self, indices: Sequence[int]) -> HeartbeatTemplate:
        """The template, and each site's inventory bytes (built before the clock starts)."""
        if self._template is None:
            self._template = HeartbeatTemplate(self.inventory(indices[0]))
        for index in indices:
            if index not in self._blast_inventory:
                self._blast_inventory[index] = inventory_json(self.inventory(index))
        return self._template

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> FleetStats:
        c = self._counts
        return FleetStats(
            sites=self.config.sites,
            onboarded=self.onboarded_count,
            silenced=self.config.sites - self._silenced.count(0),
            beats_sent=c["sent"],
            beats_silent=c["silent"],
            beats_skipped=c["skipped"],
            beats_missed=c["missed"],
            beats_failed=c["failed"],
            blasted=self._blasted,
            last_error=self._last_error,
        )
