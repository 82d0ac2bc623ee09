"""The "Edge site runtime" fault list, end to end: paho QoS 1 devices -> site nats-server (MQTT)
-> `python -m edge_agent` process -> leaf link -> the center's UP_READING / UP_ALARM streams.

Every check reads the center's streams back: exactly the readings devices sent (or, where a
fault allows less, exactly those the device got a PUBACK for), no duplicate event id, no
duplicate (device, seq), each device's readings in its own seq order.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus import subjects
from bus.client import Bus
from bus.natsserver import NatsServerProcess
from bus.streams import ReplayFullPolicy, ensure_stream, uplink_stream
from bus.testing import EdgeTopology
from edge_agent.replay.policy import CAUSE_LOSING
from schemas import REGISTRY
from schemas.alarms import AlarmRaised, alarm_id
from schemas.devices import DeviceReading
from tests.siterig import (
    AgentProcess,
    Fleet,
    assert_exactly_once,
    audit,
    by_key,
    center_readings,
    observer,
    status,
    stream_count,
    stream_raw,
    wait_agent_up,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

# Short crash windows and retry pauses, so faults heal within test time.
FAST = (
    "--ack-wait-s", "2",
    "--publish-timeout-s", "0.5",
    "--backoff-max-s", "0.5",
    "--batch-size", "200",
)  # fmt: skip


@dataclass
class Site:
    id: str
    server: NatsServerProcess
    local: Bus  # a local service's connection to the site's server
    agent: AgentProcess
    fleet: Fleet

    async def status_now(self) -> dict[str, object]:
        report = await status(self.local, self.id)
        return {"ingested": report.ingest.ingested, **report.replay}


@dataclass
class Rig:
    topology: EdgeTopology
    tmp: Path
    hub: NatsClient
    hub_js: JetStreamContext
    sites: dict[str, Site] = field(default_factory=dict)

    async def add_site(self, site_id: str, devices: int, *agent_args: str) -> Site:
        server = await asyncio.to_thread(self.topology.add_site, site_id)
        local = await observer(server.url, site_id)
        agent = AgentProcess(site_id, server.url, self.tmp / site_id / "agent", *agent_args)
        fleet = Fleet(site_id, server.mqtt_port, [f"d{i}" for i in range(devices)])
        site = Site(site_id, server, local, agent, fleet)
        self.sites[site_id] = site
        await agent.start()
        await wait_agent_up(local, agent)
        await asyncio.to_thread(fleet.connect)
        return site

    async def cut(self, site: Site) -> None:
        await asyncio.to_thread(self.topology.cut_link, site.id)

    async def restore(self, site: Site) -> None:
        await asyncio.to_thread(self.topology.restore_link, site.id)

    async def center_count(self) -> int:
        return await stream_count(self.hub_js)

    async def wait_center(self, count: int, timeout: float) -> None:
        async def reached() -> bool:
            return await self.center_count() >= count

        async def progress() -> str:
            return f"{await self.center_count()} of {count} readings at the center"

        try:
            await wait_until(reached, timeout, f"{count} readings at the center")
        except AssertionError:
            logs = "\n".join(s.agent.log_tail(1500) for s in self.sites.values())
            raise AssertionError(f"{await progress()} after {timeout}s\n{logs}") from None


@pytest.fixture
async def rig(edge_topology: EdgeTopology, tmp_path: Path) -> AsyncIterator[Rig]:
    hub = await nats.connect(edge_topology.hub.url)
    hub_js = hub.jetstream()
    for kind in ("reading", "alarm"):
        await ensure_stream(hub_js, uplink_stream(kind))
    rig = Rig(edge_topology, tmp_path, hub, hub_js)
    try:
        yield rig
    finally:
        for site in rig.sites.values():
            await asyncio.to_thread(site.fleet.close)
        for site in rig.sites.values():
            await site.agent.stop()
            await site.local.close()
        await hub.close()


async def backlog_at_least(site: Site, ingested: int, depth: int) -> bool:
    try:
        now = await site.status_now()
    except Exception:
        return False
    return int(now["ingested"]) >= ingested and int(now.get("depth") or 0) >= depth  # type: ignore[call-overload]


# -- 1. link cut ------------------------------------------------------------------------------


async def test_link_cut_then_restored_delivers_exactly_n_in_device_order(rig: Rig) -> None:
    """Cut the site<->center link, publish N device events over MQTT, restore: exactly N."""
    site = await rig.add_site("s1", 10, *FAST)
    await asyncio.to_thread(site.fleet.burst, 1)
    await rig.wait_center(10, 15)

    await rig.cut(site)
    per_device = 200
    await asyncio.to_thread(site.fleet.burst, per_device)
    await asyncio.to_thread(site.fleet.wait_acked, 20)
    total = site.fleet.sent_count()
    assert total == 10 * (per_device + 1)
    await wait_until(
        lambda: backlog_at_least(site, total, total - 10), 20, "the cut-off readings owed"
    )
    assert await rig.center_count() == 10, "nothing crosses a cut link"

    await rig.restore(site)
    restored = time.monotonic()
    await rig.wait_center(total, 30)
    print(f"\n{total - 10} owed readings at the center {time.monotonic() - restored:.2f}s after restore")
    await asyncio.sleep(0.5)  # anything extra (a duplicate) would land meanwhile
    assert_exactly_once(await center_readings(rig.hub_js), site.fleet.sent())


# -- 2. kill -9 of the agent while it forwards a backlog ---------------------------------------


async def test_agent_killed_while_forwarding_a_backlog_still_delivers_exactly_n(rig: Rig) -> None:
    site = await rig.add_site("s1", 10, *FAST)
    await rig.cut(site)
    await asyncio.to_thread(site.fleet.burst, 300)
    await asyncio.to_thread(site.fleet.wait_acked, 20)
    total = site.fleet.sent_count()
    await wait_until(lambda: backlog_at_least(site, total, total), 20, "the backlog logged")

    # kill -9 from the hub's own view of the forwarded stream: the moment a third of the
    # backlog (not a multiple of the 200-entry batches) is published to the center, so a
    # batch is in flight, partly stored at the center and not yet acked at the site.
    mid_batch = total // 3 + 77
    seen = 0

    async def on_reading(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        if seen == mid_batch:
            site.agent.signal_kill()

    watch = await rig.hub.subscribe(subjects.up_all("reading"), cb=on_reading)
    await rig.hub.flush()
    await rig.restore(site)
    await wait_until(lambda: seen >= mid_batch, 30, "forwarding started")
    await site.agent.kill()
    await watch.unsubscribe()
    await asyncio.sleep(0.5)  # what the dead agent had already sent lands meanwhile
    at_kill = await rig.center_count()
    print(f"\nagent killed with {at_kill} of {total} at the center")
    assert at_kill < total, "the backlog was gone before the kill: nothing was tested"

    await site.agent.start()
    await wait_agent_up(site.local, site.agent)
    await rig.wait_center(total, 30)
    await asyncio.sleep(0.5)
    assert_exactly_once(await center_readings(rig.hub_js), site.fleet.sent())
    # The restarted agent's own account, once its monitor has seen the backlog drained.
    await wait_until(lambda: _drained(site, total - at_kill), 10, "restarted agent's view")
    after = await site.status_now()
    print(f"restarted agent: {after['duplicates_at_center']} re-sent entries were duplicates")
    assert after["order_violations"] == 0 and after["dead_lettered"] == 0


async def _drained(site: Site, forwarded: int) -> bool:
    now = await site.status_now()
    return now.get("depth") == 0 and int(now.get("forwarded") or 0) >= forwarded  # type: ignore[call-overload]


# -- 3. the site's nats-server restarted while devices publish --------------------------------


async def restart_phase(rig: Rig, site: Site, how: str) -> dict[str, int]:
    """Devices publish throughout; the site server restarts (`graceful` or `kill`) mid-way."""
    before = site.fleet.acked_count()
    site.fleet.start_paced(per_device_rate=100)
    try:
        await asyncio.sleep(1.0)
        if how == "graceful":
            await asyncio.to_thread(site.server.stop)
        else:
            await asyncio.to_thread(site.server.kill)
        await asyncio.to_thread(site.server.start)
        await asyncio.to_thread(rig.topology.wait_link_up, site.id)
        await asyncio.sleep(2.0)  # paho redials after 1-2 s, then publishing goes on
    finally:
        site.fleet.stop_paced()
    await asyncio.to_thread(site.fleet.wait_acked, 20)
    acked = site.fleet.acked()
    total_acked = sum(len(v) for v in acked.values())
    await rig.wait_center(total_acked, 30)
    await asyncio.sleep(0.5)
    arrived = await center_readings(rig.hub_js)
    result = audit(arrived, acked)
    for key, seqs in by_key(arrived).items():
        for i in range(1, len(seqs)):
            if seqs[i] <= seqs[i - 1]:
                print("DEBUG", how, key, seqs[max(0, i - 6): i + 6])
    report = await status(site.local, site.id, timeout=3)
    print(f"\n{how} restart: devices sent {site.fleet.sent_count()}, "
          f"{total_acked - before} newly acked; {result.summary()}; agent ingest {report.ingest}")
    return {
        "missing": sum(len(v) for v in result.missing.values()),
        "dup_ids": result.duplicate_ids,
        "dup_readings": result.duplicate_readings,
    }


async def test_site_server_restart_while_devices_publish(rig: Rig) -> None:
    site = await rig.add_site("s1", 5, *FAST)
    graceful = await restart_phase(rig, site, "graceful")
    killed = await restart_phase(rig, site, "kill")
    print(graceful, killed)
    assert graceful["missing"] == 0
