"""Device ingest end to end on real servers: MQTT device -> site agent -> local subscribers,
site dead letters, and the center's UP_READING stream; with the center link cut, too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.deadletter import HEADER_PREFIX
from bus.mqtt import AsyncMqttClient, MqttConfig
from bus.natsserver import NatsServerProcess
from bus.streams import ensure_uplink_streams
from bus.testing import EdgeTopology
from edge_agent.config import AgentConfig, ReplayConfig
from edge_agent.ingest.convert import IngestLimits
from edge_agent.runtime import EdgeAgent, RestartPolicy
from schemas import REGISTRY, Event
from schemas.devices import DeviceReading
from schemas.site import SiteStatusQuery, SiteStatusReport

pytestmark = pytest.mark.timeout(90)

SITE = "s1"
MAX_PAYLOAD = 2048
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {timeout:.1f}s: {what}")
        await asyncio.sleep(interval)


def agent_config(site: NatsServerProcess, data_dir: Path, **replay: Any) -> AgentConfig:
    return AgentConfig(
        site=SITE,
        nats_url=site.url,
        data_dir=data_dir,
        ingest=IngestLimits(max_payload_bytes=MAX_PAYLOAD),
        replay=ReplayConfig(
            ack_wait_s=5.0, backoff_min_s=0.05, backoff_max_s=0.5, monitor_interval_s=0.2, **replay
        ),
    )


@dataclass
class LocalReadings:
    """What a local subscriber at the site received, with arrival times."""

    events: list[Event[DeviceReading]] = field(default_factory=list)
    arrived: dict[int, float] = field(default_factory=dict)  # payload seq -> monotonic

    async def on_event(self, event: Event[DeviceReading]) -> None:
        self.events.append(event)
        seq = event.data.payload.get("seq")
        if isinstance(seq, int):
            self.arrived.setdefault(seq, time.monotonic())

    def seqs(self, device: str | None = None) -> list[int]:
        return [
            e.data.payload["seq"] for e in self.events if device is None or e.data.device == device
        ]


async def center_readings(hub_js: JetStreamContext) -> list[Event[DeviceReading]]:
    """Every event in the center's UP_READING stream, in stream order."""
    info = await hub_js.stream_info("UP_READING")
    if not info.state.messages:
        return []
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await hub_js.get_msg("UP_READING", seq)
        assert raw.data is not None
        events.append(REGISTRY.decode_as(raw.data, DeviceReading))
    return events


async def center_count(hub_js: JetStreamContext) -> int:
    return int((await hub_js.stream_info("UP_READING")).state.messages)


def agent_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def reading(seq: int, **extra: Any) -> bytes:
    return json.dumps({"seq": seq, "temp": 20.0 + seq / 10, **extra}).encode()


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@dataclass
class SiteRig:
    topology: EdgeTopology
    site: NatsServerProcess
    hub_nc: NatsClient
    hub_js: JetStreamContext
    bus: Bus  # an observer's connection to the site's server (a "local service")
    device: AsyncMqttClient
    tmp: Path

    async def publish(self, device: str, channel: str, payload: bytes) -> None:
        await self.device.publish(f"dev/{SITE}/{device}/{channel}", payload, qos=1)

    async def publish_topic(self, topic: str, payload: bytes) -> None:
        await self.device.publish(topic, payload, qos=1)

    async def subscribe_local(self) -> LocalReadings:
        readings = LocalReadings()
        await self.bus.subscribe(
            subjects.site_event(SITE, "reading", ">"), DeviceReading, readings.on_event
        )
        await self.bus.nc.flush()
        return readings

    async def status(self, timeout: float = 3.0) -> SiteStatusReport:
        answer = await self.bus.request(
            subjects.local_control(SITE, "status"),
            SiteStatusQuery(),
            SiteStatusReport,
            timeout=timeout,
        )
        return answer.data


@pytest.fixture
async def rig(edge_topology: EdgeTopology, tmp_path: Path) -> AsyncIterator[SiteRig]:
    site = await asyncio.to_thread(edge_topology.add_site, SITE)
    hub_nc = await nats.connect(edge_topology.hub.url)
    hub_js = hub_nc.jetstream()
    await ensure_uplink_streams(hub_js)
    bus = await Bus.connect(NatsConfig.from_url(site.url, name="observer"), scope=SITE)
    device = AsyncMqttClient(
        MqttConfig(port=site.mqtt_port, client_id="device-1", connect_timeout=5, ack_timeout=5)
    )
    await device.connect()
    try:
        yield SiteRig(edge_topology, site, hub_nc, hub_js, bus, device, tmp_path)
    finally:
        await device.disconnect()
        await bus.close()
        await hub_nc.close()


@dataclass
class RunningAgent:
    agent: EdgeAgent
    stop: asyncio.Event
    task: asyncio.Task[None]


class AgentRunner:
    """Runs `EdgeAgent`s in-process; each must stop cleanly (in teardown at the latest)."""

    def __init__(self) -> None:
        self.running: list[RunningAgent] = []

    async def start(self, config: AgentConfig) -> EdgeAgent:
        agent = EdgeAgent(config, RestartPolicy(min_s=0.1, max_s=1.0, stop_timeout_s=5.0))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        self.running.append(RunningAgent(agent, stop, task))
        ready = asyncio.create_task(agent.ready.wait())
        await asyncio.wait({ready, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # surfaces the start-up error
        assert agent.ready.is_set(), "agent not ready within 20 s"
        return agent

    async def stop(self, agent: EdgeAgent) -> None:
        for item in self.running:
            if item.agent is agent:
                item.stop.set()
                await asyncio.wait_for(item.task, timeout=20)

    async def stop_all(self) -> None:
        for item in self.running:
            item.stop.set()
        for item in self.running:
            await asyncio.wait_for(item.task, timeout=20)


@pytest.fixture
async def agents(edge_topology: EdgeTopology) -> AsyncIterator[AgentRunner]:
    runner = AgentRunner()
    try:
        yield runner
    finally:
        await runner.stop_all()


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


async def test_readings_reach_local_subscribers_and_the_center(
    rig: SiteRig, agents: AgentRunner
) -> None:
    agent = await agents.start(agent_config(rig.site, rig.tmp / "agent"))
    local = await rig.subscribe_local()

    count = 60
    for seq in range(count):
        device = f"d{seq % 3}"
        extra = {"ts": 1_795_000_000_000 + seq} if seq % 2 == 0 else {}
        await rig.publish(device, "temp", reading(seq, **extra))

    await wait_until(lambda: len(local.events) >= count, 10, "local subscriber got every reading")
    await wait_until(
        lambda: _has(rig.hub_js, count), 15, "every reading reached the center's UP_READING"
    )

    # Device id, channel and device time come from the message; ids are assigned once.
    assert sorted(local.seqs()) == list(range(count))
    for device in ("d0", "d1", "d2"):
        assert local.seqs(device) == sorted(local.seqs(device)), "per-device order kept"
    by_seq = {e.data.payload["seq"]: e for e in local.events}
    assert by_seq[4].data.device == "d1" and by_seq[4].data.channel == "temp"
    assert by_seq[4].data.device_time is not None
    assert by_seq[4].data.device_time.timestamp() == pytest.approx(1_795_000_000.004)
    assert by_seq[5].data.device_time is None
    assert by_seq[4].source == f"/sites/{SITE}" and by_seq[4].subject == "d1/temp"

    center = await center_readings(rig.hub_js)
    assert len(center) == count, "exactly once at the center"
    assert {e.id for e in center} == {e.id for e in local.events}, "same event id end to end"
    for device in ("d0", "d1", "d2"):
        seqs = [e.data.payload["seq"] for e in center if e.data.device == device]
        assert seqs == sorted(seqs), "per-device order kept at the center"

    # Real time: one more reading reaches the local subscriber within a fraction of a second.
    sent = time.monotonic()
    await rig.publish("d9", "temp", reading(1000))
    await wait_until(lambda: 1000 in local.arrived, 2, "real-time delivery")
    assert local.arrived[1000] - sent < 0.5

    stats = agent.ingest.stats() if agent.ingest else None
    assert stats is not None and stats.ingested == count + 1 and not stats.rejected


async def _has(hub_js: JetStreamContext, count: int) -> bool:
    return await center_count(hub_js) >= count


async def test_malformed_payloads_are_dead_lettered_while_good_ones_flow(
    rig: SiteRig, agents: AgentRunner
) -> None:
    agent = await agents.start(agent_config(rig.site, rig.tmp / "agent"))
    local = await rig.subscribe_local()
    bad: list[tuple[str, bytes, str]] = [
        (f"dev/{SITE}/d1/temp", b"not json at all", "malformed"),
        (f"dev/{SITE}/d1/temp", reading(0, pad="x" * MAX_PAYLOAD), "oversize"),
        (f"dev/{SITE}/d1/temp", b"[1, 2, 3]", "shape"),
        (f"dev/{SITE}/d1", reading(0), "topic"),
        ("dev/other-site/d1/temp", reading(0), "foreign_site"),
        (f"dev/{SITE}/d1/temp", b'{"ts": "not a time"}', "device_time"),
    ]
    good = 0
    for topic, payload, _ in bad:
        await rig.publish("d1", "temp", reading(good))
        good += 1
        await rig.publish_topic(topic, payload)
    await rig.publish("d1", "temp", reading(good))
    good += 1

    await wait_until(lambda: len(local.events) >= good, 10, "good readings kept flowing")
    assert local.seqs() == list(range(good)), "good readings in order, none lost"

    # Each bad message is in the site's DEADLETTER stream, with its reason and its bytes.
    js = rig.bus.js

    async def dead_letters() -> int:
        return int((await js.stream_info("DEADLETTER")).state.messages)

    await wait_until(lambda: _at_least(dead_letters, len(bad)), 10, "dead letters stored")
    records = {}
    info = await js.stream_info("DEADLETTER")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg("DEADLETTER", seq)
        headers = raw.headers or {}
        records[headers[f"{HEADER_PREFIX}Reason"]] = (raw.subject, raw.data, headers)
    for topic, payload, reason in bad:
        assert reason in records, f"no dead letter for {reason}: {sorted(records)}"
        subject, data, headers = records[reason]
        assert subject == subjects.dead_letter(SITE, "ingest", reason)
        assert data == payload
        assert headers[f"{HEADER_PREFIX}Subject"] == topic.replace("/", ".")
        assert headers[f"{HEADER_PREFIX}Detail"]

    stats = agent.ingest.stats() if agent.ingest else None
    assert stats is not None
    assert stats.rejected == {reason: 1 for _, _, reason in bad}
    assert stats.ingested == good
    # The status report carries the same counters.
    report = await rig.status()
    assert report.ingest.rejected == stats.rejected
    assert report.dead_letters == {reason: 1 for _, _, reason in bad}


async def _at_least(counter: Callable[[], Awaitable[int]], minimum: int) -> bool:
    return await counter() >= minimum


async def test_link_cut_local_delivery_and_status_keep_working(
    rig: SiteRig, agents: AgentRunner
) -> None:
    agent = await agents.start(agent_config(rig.site, rig.tmp / "agent"))
    local = await rig.subscribe_local()
    await rig.publish("d1", "temp", reading(0))
    await wait_until(lambda: _has(rig.hub_js, 1), 10, "first reading at the center")

    await asyncio.to_thread(rig.topology.cut_link, SITE)
    offline = 40
    for seq in range(1, offline + 1):
        sent = time.monotonic()
        await rig.publish(f"d{seq % 2}", "temp", reading(seq))
        if seq == 1:
            await wait_until(lambda: 1 in local.arrived, 2, "real-time delivery while offline")
            assert local.arrived[1] - sent < 0.5
    await wait_until(lambda: len(local.events) >= offline + 1, 10, "local readings while offline")
    assert sorted(local.seqs()) == list(range(offline + 1))

    # A local operator can read the site's state with no center at all.
    report = await rig.status()
    assert report.site == SITE
    assert report.ingest.ingested == offline + 1
    assert report.uptime_s > 0 and report.agent_version
    assert report.replay.get("link_up") is not True
    await wait_until(
        lambda: _replay_backlog(rig, offline), 10, "the offline readings are owed to the center"
    )
    assert await center_count(rig.hub_js) == 1
    assert agent.ready.is_set()

    await asyncio.to_thread(rig.topology.restore_link, SITE)
    await wait_until(lambda: _has(rig.hub_js, offline + 1), 20, "backlog replayed to the center")
    center = await center_readings(rig.hub_js)
    assert sorted(e.data.payload["seq"] for e in center) == list(range(offline + 1))


async def _replay_backlog(rig: SiteRig, minimum: int) -> bool:
    report = await rig.status()
    return int(report.replay.get("depth") or 0) >= minimum


async def test_full_replay_log_refuses_but_local_subscribers_still_get_readings(
    rig: SiteRig, agents: AgentRunner
) -> None:
    await asyncio.to_thread(rig.topology.cut_link, SITE)
    config = agent_config(rig.site, rig.tmp / "agent", max_bytes=8 * 1024, policy="refuse_new")
    agent = await agents.start(config)
    local = await rig.subscribe_local()
    count = 60  # ~450 bytes per logged reading: the 8 KiB log fills after ~18
    for seq in range(count):
        await rig.publish("d1", "temp", reading(seq))
    await wait_until(lambda: len(local.events) >= count, 10, "every reading delivered locally")
    assert local.seqs() == list(range(count))
    assert agent.ingest is not None
    stats = agent.ingest.stats()
    assert stats.refused > 0 and stats.ingested > 0
    assert stats.refused + stats.ingested == count
    # Nothing is left in INGEST: refused readings were acked, not retried for ever.
    await wait_until(lambda: _ingest_empty(rig), 5, "INGEST drained")
    assert (await rig.status()).ingest.refused == stats.refused


async def _ingest_empty(rig: SiteRig) -> bool:
    return int((await rig.bus.js.stream_info("INGEST")).state.messages) == 0


async def test_agent_process_ingests_and_stops_on_sigterm(rig: SiteRig) -> None:
    """`python -m edge_agent` as the supervisor runs it: ingest to the center, exit 0."""
    argv = [
        sys.executable,
        "-m",
        "edge_agent",
        "--site",
        SITE,
        "--nats",
        rig.site.url,
        "--data-dir",
        str(rig.tmp / "agent"),
        "--batch-size",
        "100",
        "--max-payload-bytes",
        str(MAX_PAYLOAD),
        "--log-level",
        "warning",
    ]
    log_path = rig.tmp / "agent.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdout=log, stderr=log, env=agent_env()
        )
    try:
        local = await rig.subscribe_local()

        async def answers_status() -> bool:
            with contextlib.suppress(Exception):
                await rig.status(timeout=0.5)
                return True
            return False

        await wait_until(answers_status, 20, "agent process up")
        for seq in range(20):
            await rig.publish("d1", "temp", reading(seq))
        await wait_until(lambda: len(local.events) >= 20, 10, "readings delivered locally")
        await wait_until(lambda: _has(rig.hub_js, 20), 15, "readings at the center")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_crashing_part_is_restarted_and_the_agent_keeps_running(tmp_path: Path) -> None:
    agent = EdgeAgent(
        AgentConfig(site=SITE, nats_url="nats://127.0.0.1:1", data_dir=tmp_path),
        RestartPolicy(min_s=0.01, max_s=0.05),
    )
    stop = asyncio.Event()
    calls = 0

    async def flaky(part_stop: asyncio.Event) -> None:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise RuntimeError(f"crash {calls}")
        await part_stop.wait()

    task = asyncio.create_task(agent._supervise("flaky", flaky, stop))
    await wait_until(lambda: calls >= 4, 5, "part restarted after each crash")
    assert not task.done()
    assert agent.restarts["flaky"] == 3
    stop.set()
    await asyncio.wait_for(task, 2)


def test_config_replay_bounds_reach_the_replay_log(tmp_path: Path) -> None:
    from edge_agent.__main__ import config_from_args, parser

    args = parser().parse_args(
        [
            "--site",
            SITE,
            "--nats",
            "nats://127.0.0.1:4222",
            "--data-dir",
            str(tmp_path),
            "--mqtt-broker",
            "mqtt5://127.0.0.1:1884",
            "--replay-max-bytes",
            "1000000",
            "--replay-max-age-s",
            "60",
            "--replay-policy",
            "drop_oldest",
            "--batch-size",
            "50",
            "--max-payload-bytes",
            "512",
        ]
    )
    config = config_from_args(args)
    assert config.external_broker is not None
    assert (config.external_broker.host, config.external_broker.port) == ("127.0.0.1", 1884)
    assert config.external_broker.protocol == "5"
    assert config.replay == replace(
        ReplayConfig(), max_bytes=1_000_000, max_age_s=60.0, policy="drop_oldest", batch_size=50
    )
    assert config.ingest.max_payload_bytes == 512


async def test_readings_held_by_a_dead_instance_are_ingested_in_order(
    rig: SiteRig, agents: AgentRunner
) -> None:
    """A crashed agent's pull request can take device messages it never acks; JetStream
    redelivers them after ack_wait, in no particular order. Order must still hold."""
    config = agent_config(rig.site, rig.tmp / "agent")
    first = await agents.start(config)
    local = await rig.subscribe_local()
    await rig.publish("d1", "temp", reading(0))
    await wait_until(lambda: len(local.events) >= 1, 10, "first reading")
    assert first.ingest is not None
    # Simulate the dead instance: stop the agent, then let another connection take
    # (and never ack) part of what devices publish meanwhile.
    await agents.stop(first)
    for seq in range(1, 21):
        await rig.publish("d1", "temp", reading(seq))
    thief = await nats.connect(rig.site.url)
    try:
        psub = await thief.jetstream().pull_subscribe_bind("ingest", stream="INGEST")
        # (The stopped agent's last pull request may itself have taken the first few:
        # the server keeps a young request alive for a moment when leaf nodes are on.)
        taken = await psub.fetch(8, timeout=2)
        assert taken and all(json.loads(m.data)["seq"] < 21 for m in taken)
    finally:
        await thief.close()  # like a crash: nothing acked, nothing nak'ed

    second = await agents.start(config)
    for seq in range(21, 31):
        await rig.publish("d1", "temp", reading(seq))
    await wait_until(lambda: len(local.events) >= 31, 20, "held readings redelivered")
    assert local.seqs() == list(range(31)), "ingested in device order despite the holdout"
    assert second.ingest is not None and second.ingest.stats().order_waits >= 1


async def test_agent_survives_a_site_server_restart(rig: SiteRig, agents: AgentRunner) -> None:
    agent = await agents.start(agent_config(rig.site, rig.tmp / "agent"))
    local = await rig.subscribe_local()
    await rig.publish("d1", "temp", reading(0))
    await wait_until(lambda: len(local.events) >= 1, 10, "first reading")

    await rig.device.abort()
    await asyncio.to_thread(rig.site.kill)  # kill -9 the site's nats-server
    await asyncio.to_thread(rig.site.start)
    device = AsyncMqttClient(
        MqttConfig(port=rig.site.mqtt_port, client_id="device-2", connect_timeout=5, ack_timeout=5)
    )
    await device.connect()
    try:
        await wait_until(lambda: rig.bus.nc.is_connected, 10, "observer reconnected")
        for seq in range(1, 11):
            await device.publish(f"dev/{SITE}/d1/temp", reading(seq), qos=1)
        await wait_until(lambda: len(local.events) >= 11, 20, "ingest resumed after restart")
    finally:
        await device.disconnect()
    assert local.seqs() == list(range(11))
    assert agent.ready.is_set()


async def test_a_resent_device_message_with_its_own_id_is_a_duplicate_not_a_reading(
    rig: SiteRig, agents: AgentRunner
) -> None:
    """What a QoS 1 re-send after a lost PUBACK looks like to the site: the same message
    again. With `message_id_field` set, the device's own id dedups it in the replay log."""
    config = replace(
        agent_config(rig.site, rig.tmp / "agent"),
        ingest=IngestLimits(max_payload_bytes=MAX_PAYLOAD, message_id_field="msg"),
    )
    agent = await agents.start(config)
    sends = [("d1", "a-1"), ("d1", "a-2"), ("d1", "a-1"), ("d2", "a-1"), ("d1", "a-2")]
    for n, (device, msg_id) in enumerate(sends):
        await rig.publish(device, "temp", reading(n, msg=msg_id))
    await rig.publish("d1", "temp", reading(99))  # no id: the INGEST sequence dedups it

    assert agent.ingest is not None

    def settled() -> bool:
        stats = agent.ingest.stats() if agent.ingest else None
        return stats is not None and stats.received == len(sends) + 1

    await wait_until(settled, 10, "every message ingested")
    await wait_until(lambda: _has(rig.hub_js, 4), 15, "the distinct readings at the center")
    await asyncio.sleep(0.5)  # a duplicate forwarded late would show up as a fifth
    center = await center_readings(rig.hub_js)
    assert sorted((e.data.device, e.data.payload.get("msg", "")) for e in center) == [
        ("d1", ""), ("d1", "a-1"), ("d1", "a-2"), ("d2", "a-1")
    ]  # fmt: skip
    # The first of each id is the one kept (payload seq 0, 1, 3).
    assert sorted(e.data.payload["seq"] for e in center) == [0, 1, 3, 99]
    stats = agent.ingest.stats()
    assert (stats.ingested, stats.duplicates) == (4, 2)
