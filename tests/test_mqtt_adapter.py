"""bus.mqtt against real brokers: mosquitto (MQTT 3.1.1 and 5, bridge, restarts) and the
nats-server MQTT listener. No mocks; every broker is a child process stopped in teardown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.mosquitto import MosquittoBridge, MosquittoProcess, MosquittoSpec
from bus.mqtt import AsyncMqttClient, MqttConfig, MqttConnectError, MqttMessage, MqttProtocol
from bus.natsserver import NatsServerProcess, NatsServerSpec, free_port

pytestmark = pytest.mark.timeout(60)

PROTOCOLS = [pytest.param("3.1.1", id="mqtt311"), pytest.param("5", id="mqtt5")]
# A topic nobody subscribes to, used to flush a client's earlier packets (see `flush`).
FLUSH_TOPIC = "edgebus/test/flush"

ClientFactory = Callable[..., Awaitable[AsyncMqttClient]]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    with MosquittoProcess(MosquittoSpec(), tmp_path / "broker") as proc:
        yield proc


@pytest.fixture
async def clients() -> AsyncIterator[ClientFactory]:
    """Connect clients with short test timeouts; all of them are closed in teardown."""
    made: list[AsyncMqttClient] = []

    async def connect(port: int, client_id: str, **overrides: Any) -> AsyncMqttClient:
        settings: dict[str, Any] = {
            "connect_timeout": 5.0,
            "ack_timeout": 5.0,
            "reconnect_max_delay": 2,
        }
        settings.update(overrides)
        client = AsyncMqttClient(MqttConfig(port=port, client_id=client_id, **settings))
        made.append(client)
        await client.connect()
        return client

    yield connect
    for client in made:
        await client.disconnect()  # no-op for clients already closed or aborted


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


async def collect(
    client: AsyncMqttClient, count: int, timeout: float = 5.0, *, ack: bool = False
) -> list[MqttMessage]:
    """Up to `count` messages, or fewer if `timeout` passes first (the caller asserts)."""
    received: list[MqttMessage] = []

    async def read() -> None:
        async with contextlib.aclosing(client.messages()) as stream:
            async for msg in stream:
                received.append(msg)
                if ack:
                    msg.ack()
                if len(received) == count:
                    return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), timeout)
    return received


async def flush(client: AsyncMqttClient) -> None:
    """Make sure the broker has processed every packet `client` sent so far (e.g. PUBACKs).

    paho writes packets in order on one socket and the broker handles them in order, so
    once a QoS 1 publish on the same connection is acknowledged, the earlier ones landed.
    """
    await client.publish(FLUSH_TOPIC, b"", qos=1)


async def collect_until(
    client: AsyncMqttClient, wanted: set[str], timeout: float = 5.0
) -> list[MqttMessage]:
    """Read and ack until every topic in `wanted` was seen (duplicates allowed)."""
    received: list[MqttMessage] = []
    while not wanted <= set(topics(received)):
        batch = await collect(client, 1, timeout, ack=True)
        if not batch:
            break
        received += batch
    return received


def topics(messages: list[MqttMessage]) -> list[str]:
    return [msg.topic for msg in messages]


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout:.1f}s")
        await asyncio.sleep(0.05)


async def publish_numbered(client: AsyncMqttClient, prefix: str, count: int) -> list[str]:
    sent = [f"{prefix}/{i}" for i in range(count)]
    for topic in sent:
        await client.publish(topic, topic.encode(), qos=1)
    return sent


# ---------------------------------------------------------------------------
# mosquitto: basics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_qos0_and_qos1_round_trip(
    broker: MosquittoProcess, clients: ClientFactory, protocol: MqttProtocol
) -> None:
    sub = await clients(broker.port, f"sub-{protocol}", protocol=protocol)
    pub = await clients(broker.port, f"pub-{protocol}", protocol=protocol)
    assert await sub.subscribe("dev/+/+/+", qos=1) == 1

    await pub.publish("dev/s1/d1/temp", b'{"v": 0}', qos=0)
    await pub.publish("dev/s1/d1/temp", b'{"v": 1}', qos=1)  # returns on PUBACK

    got = await collect(sub, 2, ack=True)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
        ("dev/s1/d1/temp", b'{"v": 0}', 0, False),
        ("dev/s1/d1/temp", b'{"v": 1}', 1, False),
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_refused_connect_reports_the_broker_reason(
    tmp_path: Path, protocol: MqttProtocol
) -> None:
    spec = MosquittoSpec(allow_anonymous=False)
    with MosquittoProcess(spec, tmp_path / "closed-broker") as closed:
        client = AsyncMqttClient(MqttConfig(port=closed.port, client_id="anon", protocol=protocol))
        with pytest.raises(MqttConnectError, match="Not authorized"):
            await client.connect()


async def test_connect_to_nothing_is_bounded_by_connect_timeout() -> None:
    client = AsyncMqttClient(MqttConfig(port=free_port(), client_id="lost", connect_timeout=1.0))
    started = time.monotonic()
    with pytest.raises(MqttConnectError, match="TCP connection attempts failed"):
        await client.connect()
    # connect_timeout plus stopping paho's thread (it sleeps in steps of up to 1 s).
    assert time.monotonic() - started < 3.0


# ---------------------------------------------------------------------------
# mosquitto: at-least-once with manual acks and persistent sessions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unacked_messages_are_redelivered_after_a_crash(
    broker: MosquittoProcess, clients: ClientFactory, protocol: MqttProtocol
) -> None:
    session = {"protocol": protocol, "persistent_session": True}
    sub = await clients(broker.port, "agent", **session)
    await sub.subscribe("dev/#", qos=1)
    pub = await clients(broker.port, "device", protocol=protocol)
    sent = await publish_numbered(pub, "dev/s1/d1", 10)

    first = await collect(sub, 10)
    assert topics(first) == sent
    for msg in first[:4]:  # "stored" the first four only
        msg.ack()
    await flush(sub)
    await sub.abort()  # crash: no DISCONNECT, six messages never acked

    restarted = await clients(broker.port, "agent", **session)
    redelivered = await collect(restarted, 6, ack=True)
    assert topics(redelivered) == sent[4:]
    assert all(msg.dup for msg in redelivered)
    await flush(restarted)
    await restarted.disconnect()

    # Everything is acked now: a third incarnation gets nothing.
    again = await clients(broker.port, "agent", **session)
    assert await collect(again, 1, timeout=0.5) == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_persistent_session_keeps_messages_sent_while_offline(
    broker: MosquittoProcess, clients: ClientFactory, protocol: MqttProtocol
) -> None:
    session = {"protocol": protocol, "persistent_session": True}
    sub = await clients(broker.port, "agent", **session)
    await sub.subscribe("dev/#", qos=1)
    await sub.disconnect()

    pub = await clients(broker.port, "device", protocol=protocol)
    sent = await publish_numbered(pub, "dev/s1/d2", 50)

    # No subscribe call: the subscription lives in the broker's session. With
    # MQTT 3.1.1 mosquitto sends 20 at a time, so acking as we go is what drains it.
    back = await clients(broker.port, "agent", **session)
    assert topics(await collect(back, 50, ack=True)) == sent


async def test_mqtt311_inflight_window_caps_unacked_deliveries(
    broker: MosquittoProcess, clients: ClientFactory
) -> None:
    """Backpressure without dropping: mosquitto stops at 20 un-acked QoS 1 messages."""
    sub = await clients(broker.port, "slow-agent", persistent_session=True)
    await sub.subscribe("dev/#", qos=1)
    pub = await clients(broker.port, "device")
    sent = await publish_numbered(pub, "dev/s1/d3", 30)

    window = await collect(sub, 20)
    assert await collect(sub, 1, timeout=0.5) == []  # mosquitto max_inflight_messages
    for msg in window:
        msg.ack()
    rest = await collect(sub, 10, ack=True)
    assert topics(window + rest) == sent


async def test_mqtt5_receive_maximum_follows_the_inbound_queue_bound(
    broker: MosquittoProcess, clients: ClientFactory
) -> None:
    sub = await clients(broker.port, "agent", protocol="5", inbound_queue=5)
    await sub.subscribe("dev/#", qos=1)
    pub = await clients(broker.port, "device", protocol="5")
    sent = await publish_numbered(pub, "dev/s1/d9", 30)

    window = await collect(sub, 5)
    # The broker honours Receive Maximum = inbound_queue: nothing more until we ack.
    assert await collect(sub, 1, timeout=0.5) == []
    for msg in window:
        msg.ack()
    rest = await collect(sub, 25, ack=True)
    assert topics(window + rest) == sent


async def test_full_inbound_queue_pushes_back_instead_of_dropping_qos0(
    broker: MosquittoProcess, clients: ClientFactory
) -> None:
    sub = await clients(broker.port, "agent", inbound_queue=5)
    await sub.subscribe("dev/#", qos=0)
    pub = await clients(broker.port, "device")
    sent = [f"dev/s1/d10/{i}" for i in range(300)]
    for topic in sent:
        await pub.publish(topic, b"x" * 100, qos=0)

    await asyncio.sleep(0.5)  # nobody reads: paho's thread waits, the broker buffers
    assert topics(await collect(sub, 300)) == sent


# ---------------------------------------------------------------------------
# mosquitto: bridge and broker restarts
# ---------------------------------------------------------------------------


def edge_bridged_to(center: MosquittoProcess, workdir: Path) -> MosquittoProcess:
    bridge = MosquittoBridge(remote_host=center.host, remote_port=center.port)
    return MosquittoProcess(MosquittoSpec(bridge=bridge), workdir, name="edge")


async def test_bridge_forwards_edge_messages_to_the_center(
    broker: MosquittoProcess, clients: ClientFactory, tmp_path: Path
) -> None:
    center_sub = await clients(broker.port, "center-agent")
    await center_sub.subscribe("dev/#", qos=1)

    with edge_bridged_to(broker, tmp_path / "edge") as edge:
        device = await clients(edge.port, "device")
        # Published right after start: the bridge's local session queues until it is up.
        sent = await publish_numbered(device, "dev/s1/d4", 100)
        assert topics(await collect(center_sub, 100, ack=True)) == sent
        await device.disconnect()  # before its broker goes away: no reconnect wait


async def test_bridge_stores_and_forwards_across_a_center_outage(
    tmp_path: Path, clients: ClientFactory
) -> None:
    # The center persists sessions, so its subscriber's queue survives the restart.
    center_spec = MosquittoSpec(persistence=True, persistence_dir=tmp_path / "center-data")
    with MosquittoProcess(center_spec, tmp_path / "center", name="center") as center:
        center_sub = await clients(center.port, "center-agent", persistent_session=True)
        await center_sub.subscribe("dev/#", qos=1)
        with edge_bridged_to(center, tmp_path / "edge") as edge:
            device = await clients(edge.port, "device")
            await asyncio.to_thread(center.stop)
            sent = await publish_numbered(device, "dev/s1/d5", 100)  # acked by the edge
            await asyncio.to_thread(center.start)

            # The bridge retries every 1-2 s (restart_timeout 1 2), the subscriber's
            # session (and what the bridge forwarded into it) survived the restart.
            got = await collect(center_sub, 100, timeout=15.0, ack=True)
            assert topics(got) == sent
            await device.disconnect()


async def test_client_reconnects_and_resubscribes_after_broker_restart(
    broker: MosquittoProcess, clients: ClientFactory
) -> None:
    sub = await clients(broker.port, "agent")  # clean session: must resubscribe itself
    await sub.subscribe("dev/#", qos=1)
    pub = await clients(broker.port, "device")

    await asyncio.to_thread(broker.kill)
    await wait_until(lambda: not sub.is_connected, 5.0, "disconnected")
    # Publishing while the broker is down: paho keeps the QoS 1 message and sends it
    # after reconnecting, so this completes once the broker is back.
    pending = asyncio.create_task(pub.publish("dev/s1/d6/during-outage", b"", qos=1))
    await asyncio.to_thread(broker.start)

    await pending
    await wait_until(lambda: sub.is_connected and pub.is_connected, 5.0, "reconnected")
    # The resubscribe may land just after the reconnect: probe until a message arrives.
    for attempt in range(20):
        await pub.publish("dev/s1/d6/probe", str(attempt).encode(), qos=1)
        got = await collect(sub, 1, timeout=0.25, ack=True)
        if got and got[0].topic == "dev/s1/d6/probe":
            return
    raise AssertionError("no message reached the reconnected subscriber")


# ---------------------------------------------------------------------------
# nats-server MQTT listener (MQTT 3.1.1 only)
# ---------------------------------------------------------------------------


def _port_accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@pytest.fixture
def nats_mqtt_port(tmp_path: Path) -> Iterator[int]:
    """A site nats-server whose MQTT listener redelivers un-acked QoS 1 after 1 s.

    The listener's `ack_wait` (default 30 s) is what drives redelivery on NATS, even
    across a reconnect; the short value keeps the test fast.
    """
    port = free_port()
    spec = NatsServerSpec(
        name="site1",
        store_dir=tmp_path / "nats-store",
        port=free_port(),
        monitor_port=free_port(),
        extra_config=f'mqtt {{ listen: "127.0.0.1:{port}", ack_wait: "1s" }}',
    )
    with NatsServerProcess(spec, tmp_path / "nats"):
        deadline = time.monotonic() + 5.0
        while not _port_accepts(port):
            assert time.monotonic() < deadline, "NATS MQTT listener did not open"
            time.sleep(0.02)
        yield port


async def test_nats_listener_round_trip_and_manual_ack_redelivery(
    nats_mqtt_port: int, clients: ClientFactory
) -> None:
    sub = await clients(nats_mqtt_port, "agent", persistent_session=True)
    assert await sub.subscribe("dev/#", qos=1) == 1
    pub = await clients(nats_mqtt_port, "device")

    await pub.publish("dev/s1/d7/temp", b"q0", qos=0)
    await pub.publish("dev/s1/d7/temp", b"q1", qos=1)
    got = await collect(sub, 2, ack=True)
    assert [(m.payload, m.qos) for m in got] == [(b"q0", 0), (b"q1", 1)]

    sent = await publish_numbered(pub, "dev/s1/d8", 6)
    first = await collect(sub, 6)
    assert topics(first) == sent
    for msg in first[:3]:
        msg.ack()
    await flush(sub)
    await sub.abort()

    restarted = await clients(nats_mqtt_port, "agent", persistent_session=True)
    # Normally exactly sent[3:], in order; a slow run may see an extra ack_wait
    # redelivery, which at-least-once allows, so compare as a set.
    redelivered = await collect_until(restarted, set(sent[3:]))
    assert set(topics(redelivered)) == set(sent[3:])
    # All acked: nothing comes back after another ack_wait.
    assert await collect(restarted, 1, timeout=1.5) == []


async def test_nats_listener_refuses_mqtt5_with_a_clear_error(nats_mqtt_port: int) -> None:
    client = AsyncMqttClient(MqttConfig(port=nats_mqtt_port, client_id="v5", protocol="5"))
    with pytest.raises(MqttConnectError, match="Unsupported protocol version"):
        await client.connect()
