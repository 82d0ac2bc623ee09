"""The agent's heartbeat as a supervised part: a real agent process reports its site to the hub
on `up.<site>.heartbeat`, with the distinct devices its ingest has seen (a bounded count)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from bus import subjects
from bus.client import open_connection
from bus.config import NatsConfig
from bus.testing import EdgeTopology
from edge_agent.ingest import worker
from schemas import REGISTRY
from schemas.controller import SiteHeartbeat
from tests.siterig import AgentProcess, Fleet, observer, wait_agent_up, wait_until

pytestmark = pytest.mark.timeout(60)

SITE = "s1"
INTERVAL_S = 0.3


def test_distinct_device_count_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "MAX_TRACKED_DEVICES", 3)
    counters = worker._Counters()
    for device in ["a", "b", "a", "c", "d", "e", "b"]:
        counters.see_device(device)
    assert counters.snapshot().devices_seen == 3
    assert counters.snapshot().as_dict()["devices_seen"] == 3


async def test_running_agent_heartbeats_reach_the_hub_with_its_device_count(
    edge_topology: EdgeTopology, tmp_path: Path
) -> None:
    site = await asyncio.to_thread(edge_topology.add_site, SITE)
    hub = await open_connection(NatsConfig.from_url(edge_topology.hub.url, name="center"))
    beats: list[tuple[float, str, SiteHeartbeat]] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(
            (time.monotonic(), msg.subject, REGISTRY.decode_as(msg.data, SiteHeartbeat).data)
        )

    await hub.subscribe(subjects.up_each("heartbeat"), cb=on_beat)
    await hub.flush()
    local = await observer(site.url, SITE)
    agent = AgentProcess(
        SITE, site.url, tmp_path / "agent", "--heartbeat-interval-s", str(INTERVAL_S)
    )
    fleet = Fleet(SITE, site.mqtt_port, [f"d{i}" for i in range(5)])
    try:
        await agent.start()
        await wait_agent_up(local, agent)
        await wait_until(lambda: len(beats) >= 3, 10, "no heartbeats at the hub")
        assert {subject for _, subject, _ in beats} == {subjects.up(SITE, "heartbeat")}
        first = beats[0][2]
        assert first.site == SITE and first.inventory.device_count == 0
        assert first.inventory.agent_version and first.inventory.capacity.cores >= 1

        await asyncio.to_thread(fleet.connect)
        await asyncio.to_thread(fleet.burst, 20)
        await asyncio.to_thread(fleet.wait_acked, 10)
        await wait_until(
            lambda: beats[-1][2].inventory.device_count == 5,
            10,
            lambda: f"device count never 5: {beats[-1][2].inventory}",
        )
        report = await wait_agent_up(local, agent)
        assert report.ingest.ingested == 100
        # Fixed rate: gaps close to the interval; seq numbers every slot.
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(beats)]
        assert sorted(gaps)[len(gaps) // 2] == pytest.approx(INTERVAL_S, abs=0.15)
        seqs = [b[2].seq for b in beats]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # A stopped agent stops beating: the heartbeat is the first part it stops.
        assert await agent.stop() == 0, agent.log_tail()
        count = len(beats)
        await asyncio.sleep(3 * INTERVAL_S)
        assert len(beats) == count
    finally:
        await asyncio.to_thread(fleet.close)
        await agent.stop()
        await local.close()
        await hub.close()
