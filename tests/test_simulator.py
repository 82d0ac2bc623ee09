"""The site simulator: its plan and wire format (pure), and a small fleet against a real hub
and a real controller (onboarding, heartbeats spread over the interval, silence and return)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bus import subjects
from bus.auth import CredentialAuthority
from bus.client import Bus
from bus.config import NatsConfig, ReconnectPolicy
from bus.testing import EdgeTopology
from edge_agent.simulator import BeatSchedule, SimulatedFleet, SimulatorConfig, plan, site_ids
from edge_agent.simulator.wire import (
    HeartbeatTemplate,
    heartbeat_bytes,
    inventory_json,
    time_json,
)
from schemas import REGISTRY
from schemas.controller import (
    Availability,
    ControllerStats,
    ControllerStatsQuery,
    SiteHeartbeat,
    SiteRecord,
    SitesList,
    SitesQuery,
)
from schemas.ids import new_event_id
from services.controller.availability import AvailabilityPolicy
from services.controller.config import ControllerConfig
from services.controller.credentials import PushingAuthority
from services.controller.service import ControllerService

pytestmark = pytest.mark.timeout(90)

INTERVAL_S = 0.5
POLICY = AvailabilityPolicy.for_interval(INTERVAL_S, degraded_after_s=1.5, offline_after_s=2.5)
EDGEBUS = Path(sys.executable).parent / "edgebus"


# -- pure: plan and wire ------------------------------------------------------------------


def test_site_ids_are_zero_padded_and_map_back_to_their_index() -> None:
    ids = site_ids("sim", 1000)
    assert ids[0] == "sim-000" and ids[999] == "sim-999" and ids == sorted(ids)
    assert [plan.site_index("sim", 1000, s) for s in ("sim-042", "sim-42", "other-042")] == [
        42,
        None,
        None,
    ]
    assert plan.site_index("sim", 1000, "sim-1000") is None
    assert site_ids("sim", 1) == ["sim-0"]


def test_groups_and_spread_cover_the_whole_fleet() -> None:
    groups = Counter(plan.group_of(i, 10) for i in range(1000))
    assert set(groups.values()) == {100}
    chosen = plan.spread(1000, 5)
    assert chosen == [0, 201, 402, 603, 804]
    assert len(set(plan.spread(1000, 1000))) == 1000 and plan.spread(7, 3) == [0, 3, 4]
    assert {plan.group_of(i, 10) for i in plan.spread(1000, 100)} == set(range(10))


def test_the_beat_schedule_is_an_even_rate_with_each_site_once_per_interval() -> None:
    schedule = BeatSchedule(sites=1000, interval_s=30.0)
    assert schedule.rate == pytest.approx(1000 / 30)
    assert schedule.due(0.0) == 1 and schedule.due(-1.0) == 0
    # Any 3 s window holds 100 beats (+-1), wherever it starts: no bursts.
    for start in (0.0, 7.3, 29.0, 61.7):
        assert abs(schedule.due(start + 3.0) - schedule.due(start) - 100) <= 1
    # One interval: every site exactly once.
    beats = range(schedule.due(12.0), schedule.due(42.0))
    assert sorted(schedule.site_of(b) for b in beats) == list(range(1000))
    # Fallen behind by more than an interval: the oldest slots are dropped, not burst.
    assert schedule.catch_up(sent=10, due=5000) == 4000
    assert schedule.catch_up(sent=4500, due=5000) == 4500


def test_synthetic_inventories_are_valid_and_vary_per_site_and_over_time() -> None:
    rng = random.Random(7)
    inventories = [plan.inventory_of(i, "1.2.3+sim", 1_700_000_000.0, rng) for i in range(50)]
    assert len({inv.capacity for inv in inventories}) > 3
    assert len({inv.load.cpu_percent for inv in inventories}) > 10
    for inv in inventories:
        assert inv.load.memory_used_bytes <= inv.capacity.memory_bytes
        assert inv.load.disk_used_bytes <= inv.capacity.disk_bytes
        assert inv.agent_version == "1.2.3+sim"
    later = plan.inventory_of(3, "1.2.3+sim", 1_700_000_000.0 + 900, rng)
    assert later.capacity == inventories[3].capacity and later.load != inventories[3].load


def test_the_blast_template_renders_the_very_bytes_of_the_real_encoder() -> None:
    rng = random.Random(3)
    template = HeartbeatTemplate(plan.inventory_of(0, "9.9.9", 0.0, rng))
    moments = [
        datetime.now(UTC),
        datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),  # no microseconds: written without them
        datetime(2030, 1, 2, 3, 4, 5, 7, tzinfo=UTC),
    ]
    for n, moment in enumerate(moments):
        site = f"plant_{n}-x"
        inventory = plan.inventory_of(n, "9.9.9", moment.timestamp(), rng)
        event_id, seq = new_event_id(), rng.randrange(0, 10**12)
        real = heartbeat_bytes(site, seq, inventory, moment)
        decoded = REGISTRY.decode_as(real, SiteHeartbeat)
        assert decoded.id != event_id  # the real encoder made its own id: use it below
        rendered = template.render(
            decoded.id, site.encode(), time_json(moment), seq, inventory_json(inventory)
        )
        assert rendered == real
        assert decoded.source == f"/sites/{site}" and decoded.data.seq == seq


def test_config_refuses_what_would_break_ids_or_the_schedule() -> None:
    for bad in (
        {"sites": 0},
        {"sites": 10, "prefix": "bad.prefix"},
        {"sites": 10, "groups": 0},
        {"sites": 10, "interval_s": 0},
        {"sites": 10, "connections": 0},
        {"sites": 10, "prefix": "p" * 63},  # p...p-9: 65 characters
    ):
        with pytest.raises(ValueError):
            SimulatorConfig(**bad)


# -- against a real hub and controller --------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"after {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def connect(url: str, name: str) -> Bus:
    config = NatsConfig.from_url(
        url, name=name, connect_timeout_s=5.0, reconnect=ReconnectPolicy(wait_s=0.1)
    )
    return await Bus.connect(config, source="/operators/test")


@dataclass
class Center:
    url: str
    operator: Bus
    controller: ControllerService

    async def records(self, availability: Availability | None = None) -> list[SiteRecord]:
        found: list[SiteRecord] = []
        after: str | None = None
        while True:
            answer = await self.operator.request(
                subjects.control("controller", "sites", "query"),
                SitesQuery(availability=availability, after=after),
                SitesList,
                timeout=10,
            )
            found += answer.data.sites
            after = answer.data.next_after
            if after is None:
                return found

    async def sites(self, availability: Availability) -> set[str]:
        return {r.site for r in await self.records(availability)}

    async def stats(self) -> ControllerStats:
        answer = await self.operator.request(
            subjects.control("controller", "stats"), ControllerStatsQuery(), ControllerStats
        )
        return answer.data


@pytest.fixture
async def center(edge_topology: EdgeTopology) -> AsyncIterator[Center]:
    url = edge_topology.hub.url
    bus = await connect(url, "controller")
    config = ControllerConfig(
        policy=POLICY, public_urls=(url,), lease_ttl_s=2.0, sweep_interval_s=0.05
    )
    controller = ControllerService(bus, config)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    operator = await connect(url, "operator")
    try:
        await asyncio.wait_for(controller.started.wait(), 15)
        yield Center(url, operator, controller)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        for b in (operator, bus):
            with contextlib.suppress(Exception):
                await b.close()


def fleet_config(url: str, sites: int, **overrides: object) -> SimulatorConfig:
    base: dict[str, object] = {
        "sites": sites,
        "server": url,
        "groups": 5,
        "interval_s": INTERVAL_S,
        "tick_s": 0.02,
    }
    return SimulatorConfig(**{**base, **overrides})  # type: ignore[arg-type]


async def test_a_fleet_onboards_goes_online_and_exactly_the_silenced_sites_go_offline(
    center: Center,
) -> None:
    async with SimulatedFleet(fleet_config(center.url, 50)) as fleet:
        fleet.start_heartbeats()
        summary = await fleet.onboard()
        assert (summary.onboarded, summary.added, summary.refused) == (50, 50, {})

        everyone = set(fleet.ids)
        await eventually(
            lambda: _equals(center.sites(Availability.ONLINE), everyone), what="all online"
        )
        records = {r.site: r for r in await center.records()}
        assert set(records) == everyone
        assert {r.group for r in records.values()} == {f"sim-g{k}" for k in range(5)}
        assert all(r.onboarded_at and r.labels["fleet"] == "sim" for r in records.values())

        silent = set(fleet.silence(fleet.spread(5)))
        assert len(silent) == 5
        await eventually(
            lambda: _equals(center.sites(Availability.OFFLINE), silent), what="5 offline"
        )
        # The other 45 never wavered, and the registry agrees at this very moment.
        assert await center.sites(Availability.ONLINE) == everyone - silent
        assert await center.sites(Availability.DEGRADED) == set()

        await fleet.resume(silent)
        await eventually(
            lambda: _equals(center.sites(Availability.ONLINE), everyone), what="back online"
        )
        stats = fleet.stats()
        assert stats.beats_silent > 0 and stats.beats_failed == 0 and stats.beats_skipped == 0
        controller = await center.stats()
        assert controller.counters["rejected"] == 0
        assert controller.counters["served_onboard"] == 50


async def _equals(found: Awaitable[set[str]], expected: set[str]) -> bool:
    return await found == expected


async def test_heartbeats_are_real_events_spread_over_the_interval_not_bursts(
    center: Center,
) -> None:
    sites = 200  # 400 beats/s at a 0.5 s interval
    arrivals: list[tuple[float, SiteHeartbeat, str]] = []
    loop = asyncio.get_running_loop()

    async def on_beat(msg: object) -> None:
        event = REGISTRY.decode_as(msg.data, SiteHeartbeat)  # type: ignore[attr-defined]
        arrivals.append((loop.time(), event.data, event.source))

    sub = await center.operator.nc.subscribe(subjects.up_each("heartbeat"), cb=on_beat)
    async with SimulatedFleet(fleet_config(center.url, sites, connections=3)) as fleet:
        await fleet.onboard()
        arrivals.clear()  # the first beat of each site goes out at its onboarding
        fleet.start_heartbeats()
        await asyncio.sleep(2.2)
        await fleet.stop_heartbeats()
    await sub.unsubscribe()

    # Judged on the sender's own clock (`sent_at`): how the fleet paces what it sends.
    start = min(beat.sent_at for _, beat, _ in arrivals) + timedelta(seconds=0.1)
    window = [b for _, b, _ in arrivals if start <= b.sent_at < start + timedelta(seconds=2)]
    per_site = Counter(beat.site for beat in window)
    # 2 s = 4 intervals: every site about 4 times, none forgotten, none beating in bursts.
    assert set(per_site) == set(site_ids("sim", sites))
    assert max(per_site.values()) <= 6, per_site.most_common(3)
    # Per 100 ms bucket ~40 beats. A fleet beating all at once would put 200 in one bucket
    # and none in the next four; a short CPU stall on this shared machine may thin a few.
    buckets = Counter(int((b.sent_at - start).total_seconds() / 0.1) for b in window)
    counts = sorted(buckets[k] for k in range(20))
    assert counts[-1] <= 100, counts
    assert sum(1 for c in counts if c >= 15) >= 16, counts
    # Real events: the site's own source and seq climbing by one per slot.
    assert all(source == f"/sites/{beat.site}" for _, beat, source in arrivals)
    seqs: dict[str, list[int]] = {}
    for _, beat, _ in arrivals:
        seqs.setdefault(beat.site, []).append(beat.seq)
    assert all(s == list(range(s[0], s[0] + len(s))) for s in seqs.values())


async def test_the_blast_sends_valid_heartbeats_the_controller_counts(center: Center) -> None:
    async with SimulatedFleet(fleet_config(center.url, 20)) as fleet:
        await fleet.onboard()
        before = (await center.stats()).counters
        result = await fleet.blast(count=5000)
        assert result.sent == 5000

        async def counted() -> bool:
            now = (await center.stats()).counters
            return now["heartbeats"] - before["heartbeats"] >= 5000

        await eventually(counted, what="the controller counted the blast")
        after = (await center.stats()).counters
        assert after["rejected"] == before["rejected"]


def _edgebus(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "EDGEBUS_LOG_LEVEL": "warning"}
    return subprocess.run(
        [str(EDGEBUS), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


async def test_simulate_command_onboards_and_a_second_run_adopts_the_fleet(
    center: Center,
) -> None:
    args = ("simulate", "--sites", "20", "--prefix", "cli", "--groups", "2", "--interval-s",
            "0.5", "--server", center.url, "--duration", "1")  # fmt: skip
    first = await asyncio.to_thread(_edgebus, *args, "--silence", "3")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "onboarded 20 (adopted 0" in first.stdout
    assert "silenced 3 sites" in first.stdout

    second = await asyncio.to_thread(_edgebus, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "onboarded 0 (adopted 20" in second.stdout
    records = await center.records()
    assert len(records) == 20 and all(r.onboarded_at is not None for r in records)
    # The adopted sites heartbeat again: their last sighting is from the second run.
    recent = datetime.now(UTC) - timedelta(seconds=3)
    assert all(r.last_seen is not None and r.last_seen > recent for r in records)


async def test_simulate_command_without_a_controller_says_so(
    edge_topology: EdgeTopology,
) -> None:
    result = await asyncio.to_thread(
        _edgebus, "simulate", "--sites", "5", "--server", edge_topology.hub.url, "--duration", "1"
    )
    assert result.returncode == 2
    assert "no controller answered" in result.stderr


async def test_on_a_center_with_auth_the_simulator_identity_speaks_for_its_sites(
    tmp_path: Path,
) -> None:
    """One service credential onboards the fleet (each site presents its own public key and
    the center signs a JWT for it) and heartbeats for every site."""
    authority = CredentialAuthority(tmp_path / "authority")
    topology = EdgeTopology(tmp_path / "edge", authority=authority)
    buses: list[Bus] = []

    async def connect_as(name: str, creds: Path) -> Bus:
        config = NatsConfig.from_url(
            topology.hub.url, name=name, credentials=creds, connect_timeout_s=5.0
        )
        bus = await Bus.connect(config, source=f"/{name}")
        buses.append(bus)
        return bus

    try:
        await asyncio.to_thread(topology.start_hub)
        controller_bus = await connect_as("controller", topology.service_credentials("ctl"))
        system = await connect_as("system", topology.system_credentials())
        config = ControllerConfig(
            policy=POLICY, public_urls=(topology.hub.url,), lease_ttl_s=2.0, sweep_interval_s=0.05
        )
        service = ControllerService(controller_bus, config, PushingAuthority(authority, system.nc))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.started.wait(), 15)
        simulator_creds = topology.service_credentials("edgebus-simulator")
        center = Center(topology.hub.url, await connect_as("operator", simulator_creds), service)

        fleet_conf = fleet_config(topology.hub.url, 10, credentials=simulator_creds)
        assert fleet_conf.makes_site_keys
        async with SimulatedFleet(fleet_conf) as fleet:
            fleet.start_heartbeats()
            summary = await fleet.onboard()
            assert (summary.onboarded, summary.refused) == (10, {})
            await eventually(
                lambda: _equals(center.sites(Availability.ONLINE), set(fleet.ids)),
                what="all online under auth",
            )
            records = await center.records()
            keys = {r.user_public_key for r in records}
            assert len(keys) == 10 and all(k and k.startswith("U") for k in keys)
        stop.set()
        await asyncio.wait_for(task, 15)
    finally:
        for bus in reversed(buses):
            with contextlib.suppress(Exception):
                await bus.close()
        await asyncio.to_thread(topology.stop)
