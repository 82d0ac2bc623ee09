"""Integration tests of the real-server harness: hub, leaf sites, link cuts, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

import bus
from bus.linkproxy import LinkProxy
from bus.natsserver import (
    NatsServerError,
    NatsServerProcess,
    NatsServerSpec,
    free_port,
    render_config,
)
from bus.testing import EdgeTopology

pytestmark = pytest.mark.timeout(30)

SITE = "s1"


# -- helpers -------------------------------------------------------------------


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Any]:
    # Bounded connect: nats-py can hang on a down server with default reconnects.
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        yield nc
    finally:
        await nc.close()


async def inbox(nc: Any, subject: str) -> asyncio.Queue[bytes]:
    """Subscribe and return the queue that receives every payload."""
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(msg: Any) -> None:
        received.put_nowait(msg.data)

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    return received


async def delivered(pub: Any, subject: str, received: asyncio.Queue[bytes], within: float) -> bool:
    """Keep publishing one unique probe until it shows up in `received`.

    Subscription interest crosses the leaf link asynchronously, so the first
    probes after a (re)connect may legitimately be dropped.
    """
    probe = uuid.uuid4().hex.encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        await pub.publish(subject, probe)
        await pub.flush()
        try:
            while await asyncio.wait_for(received.get(), 0.1) != probe:
                pass  # an older probe arriving late
            return True
        except TimeoutError:
            continue
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# -- hub and site basics ---------------------------------------------------------


async def test_hub_accepts_client_and_serves_jetstream_domain_hub(
    hub: NatsServerProcess,
) -> None:
    async with connected(hub.url) as nc:
        assert nc.is_connected
        account = await nc.jetstream().account_info()
    assert account.domain == "hub"


async def test_site_joins_hub_as_leaf_node(edge_topology: EdgeTopology) -> None:
    site = edge_topology.add_site(SITE)

    edge_topology.hub.wait_leaf_connections(1, timeout=5)
    assert edge_topology.hub.leaf_names() == [SITE]
    assert site.leaf_connections() == 1
    assert edge_topology.proxy(SITE).active_connections == 1


async def test_core_messages_cross_the_leaf_link_both_ways(edge_topology: EdgeTopology) -> None:
    site = edge_topology.add_site(SITE)
    async with connected(edge_topology.hub.url) as hub_nc, connected(site.url) as site_nc:
        at_hub = await inbox(hub_nc, "up.>")
        at_site = await inbox(site_nc, "down.>")

        assert await delivered(site_nc, "up.temp", at_hub, within=5)
        assert await delivered(hub_nc, "down.cmd", at_site, within=5)


async def test_site_without_proxy_connects_directly(edge_topology: EdgeTopology) -> None:
    site = edge_topology.add_site(SITE, mqtt=False, via_proxy=False)

    assert edge_topology.hub.leaf_names() == [SITE]
    with pytest.raises(RuntimeError):
        edge_topology.proxy(SITE)
    with pytest.raises(NatsServerError):
        _ = site.mqtt_port


async def test_jetstream_works_in_site_domain_and_hub_domain(
    edge_topology: EdgeTopology,
) -> None:
    site = edge_topology.add_site(SITE)
    async with connected(site.url) as site_nc, connected(edge_topology.hub.url) as hub_nc:
        site_js = site_nc.jetstream(domain=SITE)
        await site_js.add_stream(name="SITE_EVENTS", subjects=["site.events.>"])
        ack = await site_js.publish("site.events.door", b"open")
        assert (ack.stream, ack.domain) == ("SITE_EVENTS", SITE)
        assert (await site_js.stream_info("SITE_EVENTS")).state.messages == 1

        # Same client, the hub's domain: the API calls travel over the leaf link.
        hub_js_via_site = site_nc.jetstream(domain="hub")
        await hub_js_via_site.add_stream(name="CENTRAL", subjects=["central.>"])
        assert (await hub_js_via_site.stream_info("CENTRAL")).config.name == "CENTRAL"

        # Each stream lives only in its own domain.
        hub_js = hub_nc.jetstream()
        assert (await hub_js.stream_info("CENTRAL")).config.name == "CENTRAL"
        with pytest.raises(NotFoundError):
            await hub_js.stream_info("SITE_EVENTS")
        with pytest.raises(NotFoundError):
            await site_js.stream_info("CENTRAL")


# -- link faults -------------------------------------------------------------------


async def test_cut_link_isolates_site_and_restore_heals_it(edge_topology: EdgeTopology) -> None:
    hub = edge_topology.hub
    site = edge_topology.add_site(SITE)
    async with connected(hub.url) as hub_nc, connected(site.url) as site_nc:
        at_hub = await inbox(hub_nc, "up.>")
        at_site = await inbox(site_nc, "down.>")
        local = await inbox(site_nc, "local.>")
        assert await delivered(site_nc, "up.temp", at_hub, within=5)

        await asyncio.to_thread(edge_topology.cut_link, SITE)
        assert hub.leaf_connections() == 0
        assert site.leaf_connections() == 0
        assert edge_topology.proxy(SITE).is_cut
        assert await delivered(site_nc, "local.temp", local, within=2)
        assert not await delivered(site_nc, "up.temp", at_hub, within=0.5)
        assert not await delivered(hub_nc, "down.cmd", at_site, within=0.5)

        await asyncio.to_thread(edge_topology.restore_link, SITE)
        assert hub.leaf_names() == [SITE]
        assert await delivered(site_nc, "up.temp", at_hub, within=5)
        assert await delivered(hub_nc, "down.cmd", at_site, within=5)


async def test_cut_and_restore_can_repeat(edge_topology: EdgeTopology) -> None:
    # Guards against the site learning the hub's direct leaf address and
    # reconnecting around the proxy (the hub must not advertise it).
    edge_topology.add_site(SITE)
    for _ in range(3):
        edge_topology.cut_link(SITE)
        assert not edge_topology.link_up(SITE)
        edge_topology.restore_link(SITE)
        assert edge_topology.link_up(SITE)


def read_greeting(port: int) -> bytes:
    """First bytes a server sends on a fresh connection; b"" if the connection is dropped."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            return sock.recv(4)
        except ConnectionResetError:
            return b""


def closed_by_peer(sock: socket.socket) -> bool:
    """Drain what was already buffered; True once the peer has closed or reset."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_link_proxy_forwards_from_its_own_thread_and_cuts(hub: NatsServerProcess) -> None:
    # Plain blocking sockets on the test thread: forwarding must not need our help.
    with LinkProxy("127.0.0.1", hub.spec.port, name="client-port") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as held:
            assert held.recv(4) == b"INFO"
            proxy.cut()
            assert proxy.is_cut
            assert closed_by_peer(held)
        assert read_greeting(proxy.port) == b""

        proxy.restore()
        assert read_greeting(proxy.port) == b"INFO"
    assert not port_accepts(proxy.port)


# -- process lifecycle ---------------------------------------------------------------


async def test_killed_site_restarts_on_same_ports_with_its_store(
    edge_topology: EdgeTopology,
) -> None:
    site = edge_topology.add_site(SITE)
    async with connected(site.url) as nc:
        await nc.jetstream().add_stream(name="KEEP", subjects=["keep.>"])
    old_pid = site.pid
    assert old_pid is not None

    site.kill()
    assert not site.running
    assert not pid_alive(old_pid)
    assert not port_accepts(site.spec.port)

    site.start()
    edge_topology.wait_link_up(SITE)
    assert site.pid != old_pid
    assert port_accepts(site.mqtt_port)
    async with connected(site.url) as nc:
        assert (await nc.jetstream().stream_info("KEEP")).config.name == "KEEP"
    assert site.monitor_json("varz")["port"] == site.spec.port


def test_sites_reconnect_after_hub_restart(edge_topology: EdgeTopology) -> None:
    edge_topology.add_site("s1")
    edge_topology.add_site("s2", mqtt=False)

    edge_topology.hub.kill()
    edge_topology.hub.start()

    edge_topology.wait_link_up("s1", timeout=5)
    edge_topology.wait_link_up("s2", timeout=5)
    assert sorted(edge_topology.hub.leaf_names()) == ["s1", "s2"]


async def test_stop_ends_every_process_and_is_idempotent(tmp_path: Path) -> None:
    topology = EdgeTopology(tmp_path)
    try:
        hub = topology.start_hub()
        site = topology.add_site(SITE)
        pids = [hub.pid, site.pid]
        proxy_port = topology.proxy(SITE).port
    finally:
        topology.stop()
    topology.stop()

    assert all(pid is not None and not pid_alive(pid) for pid in pids)
    assert not hub.running and not site.running
    assert not port_accepts(proxy_port)


async def test_failed_start_raises_with_log_and_leaves_nothing_running(tmp_path: Path) -> None:
    spec = NatsServerSpec.hub("broken", tmp_path / "store", extra_config="no_such_option: {")
    server = NatsServerProcess(spec, tmp_path)

    with pytest.raises(NatsServerError, match="exited with code"):
        server.start(timeout=5)
    assert not server.running
    assert server.pid is None


async def test_paths_with_spaces_quotes_and_dollars_are_quoted(tmp_path: Path) -> None:
    store = tmp_path / 'store with "quotes" and $HOME'
    spec = NatsServerSpec(name="odd", store_dir=store, port=free_port(), monitor_port=free_port())
    assert f'"{tmp_path}/store with \\"quotes\\" and $HOME"' in render_config(spec)

    with NatsServerProcess(spec, tmp_path) as server:
        assert server.running
    assert (store / "jetstream").is_dir()
    assert not server.running


def test_servers_left_running_are_killed_when_the_interpreter_exits(tmp_path: Path) -> None:
    # Simulates a test run that dies without teardown: only the atexit hook is left.
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from bus.natsserver import NatsServerProcess, NatsServerSpec
        base = Path({str(tmp_path)!r})
        server = NatsServerProcess(NatsServerSpec.hub("orphan", base / "store"), base)
        server.start()
        print(server.pid)
        """
    )
    repo_root = Path(bus.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    try:
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
