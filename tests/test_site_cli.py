"""`edgebus site status` and `edgebus site tail` against a real running site, center link cut.

The site (nats-server + agent) is started by the installed `edgebus site run` command and its
link to a real hub goes through a LinkProxy, so the local tools are shown to work offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bus import subjects
from bus.linkproxy import LinkProxy
from bus.natsserver import NatsServerProcess
from bus.streams import ensure_uplink_streams
from edge_agent.supervisor import AGENT, SERVER, SiteState, SiteStateError, read_site_state

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
SITE = "s1"
EDGEBUS = Path(sys.executable).parent / "edgebus"


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (SiteStateError, OSError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"after {timeout:.1f}s: {what}")
        time.sleep(0.1)


def edgebus(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEBUS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def status_json(data_dir: Path) -> dict[str, Any]:
    result = edgebus("site", "status", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def publish_readings(state: SiteState, device: str, values: list[int]) -> None:
    """QoS 1 publishes to the site's own MQTT listener; returns once every PUBACK is in."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"test-{device}", protocol=mqtt.MQTTv311
    )
    client.connect(state.local_host, state.mqtt_port)
    client.loop_start()
    try:
        topic = subjects.mqtt_device_topic(SITE, device, "temp")
        infos = [client.publish(topic, json.dumps({"value": v}), qos=1) for v in values]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class RunningSite:
    data_dir: Path
    proc: subprocess.Popen[bytes]
    proxy: LinkProxy
    hub: NatsServerProcess

    @property
    def state(self) -> SiteState:
        return read_site_state(self.data_dir)

    def agent_answers(self) -> bool:
        return bool(status_json(self.data_dir)["agent"]["answering"])


async def declare_center_uplink(hub: NatsServerProcess) -> None:
    """The center stream the site's forwarder delivers readings to."""
    nc = await nats.connect(hub.url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        await ensure_uplink_streams(nc.jetstream())
    finally:
        await nc.close()


@pytest.fixture
def running_site(hub: NatsServerProcess, tmp_path: Path) -> Iterator[RunningSite]:
    asyncio.run(declare_center_uplink(hub))
    leaf_port = hub.spec.leaf_listen_port
    assert leaf_port is not None
    proxy = LinkProxy(hub.spec.host, leaf_port, name=SITE)
    proxy.start()
    data_dir = tmp_path / "site"
    log = (tmp_path / "site-run.log").open("ab")
    proc = subprocess.Popen(
        [
            str(EDGEBUS),
            "--log-level",
            "info",
            "site",
            "run",
            "--site",
            SITE,
            "--center",
            proxy.url,
            "--data-dir",
            str(data_dir),
            "--leaf-reconnect-s",
            "0.25",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    site = RunningSite(data_dir, proc, proxy, hub)
    try:
        state = wait_for(
            lambda: (s := read_site_state(data_dir)).children[AGENT].pid and s, 30, "no agent"
        )
        hub.wait_leaf_connections(1, timeout=15)
        wait_for(site.agent_answers, 30, f"agent of {state.site} never answered status")
        yield site
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Whatever a killed supervisor left behind names the data dir on its command line.
        for process in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(data_dir) in " ".join(process.info["cmdline"] or []):
                    process.kill()
        log.close()
        proxy.stop()


async def replay_entries_by_kind(state: SiteState) -> dict[str, int]:
    """Entries in the site's REPLAY stream per kind (`replay.<site>.<kind>...`)."""
    nc = await nats.connect(state.nats_url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        info = await nc.jetstream().stream_info("REPLAY", subjects_filter=">")
        counts: dict[str, int] = {}
        for subject, n in (info.state.subjects or {}).items():
            kind = subject.split(".")[2]
            counts[kind] = counts.get(kind, 0) + n
        return counts
    finally:
        await nc.close()


def cut(site: RunningSite) -> None:
    site.proxy.cut()
    site.hub.wait_leaf_connections(0, timeout=10)
    wait_for(lambda: status_json(site.data_dir)["center_link"]["up"] is False, 15, "link up")


def test_status_and_tail_work_with_the_center_link_cut(running_site: RunningSite) -> None:
    online = list(range(3))
    publish_readings(running_site.state, "d1", online)
    # Online, the forwarder empties the replay log into the center...
    wait_for(
        lambda: (
            (doc := status_json(running_site.data_dir))["agent"]["report"]["ingest"]["ingested"]
            == len(online)
            and {s["name"]: s for s in doc["streams"]}["REPLAY"]["messages"] == 0
        ),
        20,
        "online readings not forwarded",
    )
    cut(running_site)
    offline = list(range(100, 105))
    publish_readings(running_site.state, "d2", offline)

    status = wait_for(
        lambda: (
            (doc := status_json(running_site.data_dir))["agent"]["report"]["ingest"]["ingested"]
            >= len(online) + len(offline)
            and doc
        ),
        20,
        "agent did not ingest every reading",
    )
    assert status["site"] == SITE and status["ok"] is True
    assert status["center_link"] == {
        "up": False,
        "center": running_site.state.center_leaf_url,
        "leafs": [],
    }
    assert status["server"]["reachable"] is True
    assert status["supervisor"]["alive"] is True
    assert status["children"][SERVER]["alive"] and status["children"][AGENT]["alive"]
    report = status["agent"]["report"]
    assert report["site"] == SITE
    streams = {s["name"]: s for s in status["streams"]}
    assert streams["EVENTS"]["messages"] >= len(online) + len(offline)
    # ...offline, what the site owes the center waits in its replay log: the readings, and
    # the agent's own warnings about the lost link (shipped logs go the same way).
    owed = asyncio.run(replay_entries_by_kind(running_site.state))
    assert owed.pop("reading") == len(offline)
    assert set(owed) <= {"log"}
    assert streams["REPLAY"]["messages"] == len(offline) + sum(owed.values())

    result = edgebus(
        "site",
        "tail",
        "--data-dir",
        str(running_site.data_dir),
        "--no-follow",
        "--json",
        "--last",
        "5",
    )
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert [e["event"]["type"] for e in entries] == ["edgebus.device.reading"] * 5
    assert [e["event"]["data"]["payload"]["value"] for e in entries] == offline
    assert [e["event"]["data"]["device"] for e in entries] == ["d2"] * 5
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert all(e["subject"] == subjects.site_readings(SITE, "d2", "temp") for e in entries)

    plain = edgebus(
        "site", "tail", "--data-dir", str(running_site.data_dir), "--no-follow", "--last", "2"
    )
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.strip().splitlines()
    assert len(lines) == 2 and all("edgebus.device.reading" in line for line in lines)

    table = edgebus("site", "status", "--data-dir", str(running_site.data_dir))
    assert table.returncode == 0, table.stderr
    assert "center link DOWN" in table.stdout and "EVENTS" in table.stdout


def test_tail_follow_prints_new_events_as_json_lines(running_site: RunningSite) -> None:
    cut(running_site)
    follower = subprocess.Popen(
        [
            str(EDGEBUS),
            "site",
            "tail",
            "--data-dir",
            str(running_site.data_dir),
            "--follow",
            "--json",
            "--last",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in follower.stdout or []], daemon=True
    )
    reader.start()
    try:
        time.sleep(1.5)  # the follower subscribes; `--last 0` shows only what comes next
        values = [7, 8, 9]
        publish_readings(running_site.state, "d3", values)
        got = [json.loads(lines.get(timeout=15)) for _ in values]
        assert [e["event"]["data"]["payload"]["value"] for e in got] == values
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_status_of_a_stopped_site_reports_it_down(running_site: RunningSite) -> None:
    state = running_site.state
    pids = [c.pid for c in state.children.values() if c.pid is not None]
    running_site.proc.send_signal(signal.SIGTERM)
    assert running_site.proc.wait(timeout=20) == 0
    assert not any(psutil.pid_exists(pid) for pid in pids)

    status = status_json(running_site.data_dir)
    assert status["ok"] is False
    assert status["server"]["reachable"] is False
    assert status["agent"]["answering"] is False
    assert status["supervisor"]["alive"] is False
    assert status["supervisor"]["state"] == "stopped"

    tail = edgebus("site", "tail", "--data-dir", str(running_site.data_dir), "--no-follow")
    assert tail.returncode == 2
    assert "unreachable" in tail.stdout + tail.stderr


def test_status_without_a_site_json_exits_2(tmp_path: Path) -> None:
    result = edgebus("site", "status", "--data-dir", str(tmp_path), "--json")
    assert result.returncode == 2
    assert "site.json" in result.stdout + result.stderr
