"""External-broker mode on real servers: devices -> mosquitto (MQTT 3.1.1 / 5) -> edge agent
bridge -> site INGEST -> center; a killed agent loses nothing published while it was down."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.deadletter import HEADER_PREFIX
from bus.mosquitto import MosquittoProcess, MosquittoSpec
from bus.mqtt import AsyncMqttClient, MqttConfig, MqttProtocol
from bus.natsserver import NatsServerProcess
from bus.streams import ensure_uplink_streams
from bus.testing import EdgeTopology
from edge_agent.config import AgentConfig, ExternalBroker, ReplayConfig
from edge_agent.runtime import EdgeAgent, RestartPolicy
from schemas import REGISTRY
from schemas.devices import DeviceReading
from schemas.site import SiteStatusQuery, SiteStatusReport

pytestmark = pytest.mark.timeout(120)

SITE = "s1"
REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = [pytest.param("3.1.1", id="mqtt311"), pytest.param("5", id="mqtt5")]


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {timeout:.1f}s: {what}")
        await asyncio.sleep(interval)


async def center_seqs(hub_js: JetStreamContext) -> list[int]:
    """Payload `seq` of every reading in the center's UP_READING stream, in stream order."""
    info = await hub_js.stream_info("UP_READING")
    if not info.state.messages:
        return []
    seqs = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await hub_js.get_msg("UP_READING", seq)
        assert raw.data is not None
        seqs.append(REGISTRY.decode_as(raw.data, DeviceReading).data.payload["seq"])
    return seqs


def payload(seq: int) -> bytes:
    return json.dumps({"seq": seq, "temp": 20.5}).encode()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    with MosquittoProcess(MosquittoSpec(), tmp_path / "mosquitto") as proc:
        yield proc


@pytest.fixture
async def site(
    edge_topology: EdgeTopology,
) -> AsyncIterator[tuple[NatsServerProcess, JetStreamContext]]:
    server = await asyncio.to_thread(edge_topology.add_site, SITE)
    hub_nc = await nats.connect(edge_topology.hub.url)
    hub_js = hub_nc.jetstream()
    await ensure_uplink_streams(hub_js)
    try:
        yield server, hub_js
    finally:
        await hub_nc.close()


@pytest.fixture
async def device(
    broker: MosquittoProcess, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[MqttProtocol], Awaitable[AsyncMqttClient]]]:
    made: list[AsyncMqttClient] = []

    async def connect(protocol: MqttProtocol) -> AsyncMqttClient:
        client = AsyncMqttClient(
            MqttConfig(
                port=broker.port,
                client_id=f"device-{len(made)}",
                protocol=protocol,
                connect_timeout=5,
                ack_timeout=5,
            )
        )
        made.append(client)
        await client.connect()
        return client

    yield connect
    for client in made:
        await client.disconnect()


def bridge_config(
    server: NatsServerProcess, broker: MosquittoProcess, protocol: str, data_dir: Path
) -> AgentConfig:
    return AgentConfig(
        site=SITE,
        nats_url=server.url,
        data_dir=data_dir,
        replay=ReplayConfig(ack_wait_s=5.0, backoff_min_s=0.05, backoff_max_s=0.5),
        external_broker=ExternalBroker(host=broker.host, port=broker.port, protocol=protocol),
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_bridged_readings_reach_the_center(
    protocol: MqttProtocol,
    site: tuple[NatsServerProcess, JetStreamContext],
    broker: MosquittoProcess,
    device: Callable[[MqttProtocol], Awaitable[AsyncMqttClient]],
    tmp_path: Path,
) -> None:
    server, hub_js = site
    agent = EdgeAgent(
        bridge_config(server, broker, protocol, tmp_path / "agent"),
        RestartPolicy(min_s=0.1, max_s=1.0, stop_timeout_s=5.0),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    observer = await Bus.connect(NatsConfig.from_url(server.url, name="observer"), scope=SITE)
    try:
        await asyncio.wait_for(agent.ready.wait(), 20)
        # The bridge subscribes asynchronously: wait until the broker has our session.
        assert agent.bridge is not None
        bridge = agent.bridge
        client = await device(protocol)

        async def bridge_subscribed() -> bool:
            await client.publish(f"dev/{SITE}/probe/temp", payload(-1), qos=1)
            return bridge.stats().received > 0

        await wait_until(bridge_subscribed, 15, "bridge subscribed to the broker")
        count = 40
        for seq in range(count):
            await client.publish(f"dev/{SITE}/d{seq % 2}/temp", payload(seq), qos=1)
        # A topic that cannot become a subject (a dot in the device id) is dead-lettered.
        await client.publish(f"dev/{SITE}/bad.device/temp", payload(999), qos=1)

        async def all_at_center() -> bool:
            return len([s for s in await center_seqs(hub_js) if s >= 0]) >= count

        await wait_until(all_at_center, 20, "bridged readings at the center")
        seqs = [s for s in await center_seqs(hub_js) if s >= 0]
        assert sorted(seqs) == list(range(count)), "none lost, none duplicated"
        assert seqs == list(range(count)), "arrival order kept through the bridge"

        async def dead_lettered() -> bool:
            info = await observer.js.stream_info("DEADLETTER")
            return int(info.state.messages) >= 1

        await wait_until(dead_lettered, 10, "bad topic dead-lettered")
        info = await observer.js.stream_info("DEADLETTER")
        raw = await observer.js.get_msg("DEADLETTER", info.state.last_seq)
        assert raw.subject == subjects.dead_letter(SITE, "bridge", "topic")
        assert raw.data == payload(999)
        assert (raw.headers or {})[f"{HEADER_PREFIX}Subject"] == f"dev/{SITE}/bad.device/temp"
        stats = bridge.stats()
        assert stats.rejected == 1 and stats.forwarded >= count
        # The local status report shows the bridge at work.
        report = await observer.request(
            subjects.local_control(SITE, "status"), SiteStatusQuery(), SiteStatusReport
        )
        assert report.data.bridge["forwarded"] >= count and report.data.bridge["rejected"] == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await observer.close()


def agent_argv(
    server: NatsServerProcess, broker: MosquittoProcess, scheme: str, data_dir: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edge_agent",
        "--site",
        SITE,
        "--nats",
        server.url,
        "--data-dir",
        str(data_dir),
        "--mqtt-broker",
        f"{scheme}://{broker.host}:{broker.port}",
        "--log-level",
        "warning",
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_killed_agent_loses_nothing_published_while_it_was_down(
    protocol: MqttProtocol,
    site: tuple[NatsServerProcess, JetStreamContext],
    broker: MosquittoProcess,
    device: Callable[[MqttProtocol], Awaitable[AsyncMqttClient]],
    tmp_path: Path,
) -> None:
    server, hub_js = site
    argv = agent_argv(server, broker, "mqtt5" if protocol == "5" else "mqtt", tmp_path / "agent")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    log_path = tmp_path / "agent.log"
    procs: list[asyncio.subprocess.Process] = []

    async def start_agent() -> asyncio.subprocess.Process:
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, stdout=log, stderr=log, env=env
            )
        procs.append(proc)
        return proc

    async def at_center(count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len([s for s in await center_seqs(hub_js) if s >= 0]) >= count

        return check

    try:
        first = await start_agent()
        client = await device(protocol)
        # Until the agent's session exists, the broker would drop our messages: probe first.
        probes = 0

        async def session_up() -> bool:
            nonlocal probes
            probes += 1
            await client.publish(f"dev/{SITE}/probe/temp", payload(-probes), qos=1)
            return len(await center_seqs(hub_js)) > 0

        await wait_until(session_up, 30, "agent bridged its first message", interval=0.3)
        for seq in range(20):
            await client.publish(f"dev/{SITE}/d1/temp", payload(seq), qos=1)
        await wait_until(await at_center(20), 20, "first readings at the center")

        first.kill()  # SIGKILL: no goodbye to the broker, nothing flushed
        await first.wait()
        for seq in range(20, 50):  # the broker queues these for the agent's session
            await client.publish(f"dev/{SITE}/d1/temp", payload(seq), qos=1)

        await start_agent()
        await wait_until(await at_center(50), 30, "readings published while down arrived")
        seqs = [s for s in await center_seqs(hub_js) if s >= 0]
        assert sorted(set(seqs)) == list(range(50)), "nothing lost"
        assert len(seqs) == 50, f"duplicates at the center: {len(seqs) - 50}"
        assert seqs == list(range(50)), (
            f"order kept across the restart: {seqs}\n{log_path.read_text()[-6000:]}"
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
