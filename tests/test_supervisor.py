"""The site supervisor (`edgebus site run`) as real processes: start, kill -9, late center, stop.

Supervision itself is exercised with a trivial stand-in agent (fast); the real agent runs
through the installed `edgebus site run` command in the tests marked as such.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from bus.natsserver import NatsServerProcess, NatsServerSpec, free_port
from bus.testing import EdgeTopology
from edge_agent.supervisor import (
    AGENT,
    SERVER,
    SiteAlreadyRunning,
    SiteRunConfig,
    SiteState,
    SiteStateError,
    SiteSupervisor,
    agent_command,
    backoff_delay,
    read_site_state,
    resolve_ports,
)

pytestmark = pytest.mark.timeout(90)

T = TypeVar("T")
SITE = "s1"
# Stand-in agent: exits 0 on SIGTERM like the real one, otherwise sleeps.
STAND_IN = (
    sys.executable,
    "-c",
    "import signal,sys,time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
    "time.sleep(3600)",
)
# Stand-in agent that ignores SIGTERM: the supervisor must still leave nothing behind.
STUBBORN = (
    sys.executable,
    "-c",
    "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)",
)
# Runs SiteSupervisor in its own process, as `edgebus site run` does, with any config.
RUNNER = """
import json, sys
from pathlib import Path
from bus.log import configure_logging
from edge_agent.supervisor import SiteRunConfig, SiteSupervisor
configure_logging("info", json=True)
kw = json.loads(sys.argv[1])
kw["data_dir"] = Path(kw["data_dir"])
if kw.get("agent_argv") is not None:
    kw["agent_argv"] = tuple(kw["agent_argv"])
sys.exit(SiteSupervisor(SiteRunConfig(**kw)).run())
"""


# -- helpers ------------------------------------------------------------------------------


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; exceptions count as not yet."""
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
        time.sleep(0.05)


def state_where(
    data_dir: Path, check: Callable[[SiteState], bool]
) -> Callable[[], SiteState | None]:
    def probe() -> SiteState | None:
        state = read_site_state(data_dir)
        return state if check(state) else None

    return probe


def running(name: str) -> Callable[[SiteState], bool]:
    return lambda s: s.children[name].state == "running" and s.children[name].pid is not None


def all_running(state: SiteState) -> bool:
    return running(SERVER)(state) and running(AGENT)(state)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def monitor(state: SiteState, endpoint: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{state.monitor_url}/{endpoint}", timeout=1.0) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def site_leafs(state: SiteState) -> int:
    return int(monitor(state, "leafz").get("leafnodes", 0))


def kill_processes_under(data_dir: Path) -> None:
    """Children of a supervisor that was killed outright, even when site.json no longer
    names them: their command lines name the data dir."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(data_dir) in " ".join(process.info["cmdline"] or []):
                process.kill()


class Supervisors:
    """Supervisor processes started by a test; every one (and its children) killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, data_dir: Path, **config: Any) -> subprocess.Popen[bytes]:
        config = {"site": SITE, "data_dir": str(data_dir), "leaf_reconnect_s": 0.25, **config}
        data_dir.mkdir(parents=True, exist_ok=True)
        with (data_dir.parent / f"{data_dir.name}-supervisor.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", RUNNER, json.dumps(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append((proc, data_dir))
        return proc

    def cleanup(self) -> None:
        for proc, data_dir in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            kill_processes_under(data_dir)


@pytest.fixture
def supervisors() -> Iterator[Supervisors]:
    started = Supervisors()
    try:
        yield started
    finally:
        started.cleanup()


def stop_and_check_nothing_left(proc: subprocess.Popen[bytes], state: SiteState) -> None:
    pids = [c.pid for c in state.children.values() if c.pid is not None]
    assert pids and all(alive(pid) for pid in pids)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert [pid for pid in pids if alive(pid)] == []
    final = read_site_state(Path(state.data_dir))
    assert final.supervisor.state == "stopped"
    assert all(c.state == "stopped" and c.pid is None for c in final.children.values())


# -- plain decisions ----------------------------------------------------------------------


def test_backoff_starts_at_the_minimum_doubles_and_is_capped() -> None:
    delays = [backoff_delay(n, 0.5, 4.0) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_delay(10_000, 0.5, 30.0) == 30.0


def test_ports_explicit_then_persisted_then_free(tmp_path: Path) -> None:
    config = SiteRunConfig(site=SITE, center_leaf_url="nats-leaf://h:1", data_dir=tmp_path)
    fresh = resolve_ports(config, None)
    assert all(port > 0 for port in fresh)
    previous = SiteState(SITE, str(tmp_path), "nats-leaf://h:1", "127.0.0.1", 4001, 4002, 4003)
    assert resolve_ports(config, previous) == (4001, 4002, 4003)
    explicit = SiteRunConfig(
        site=SITE, center_leaf_url="nats-leaf://h:1", data_dir=tmp_path, mqtt_port=1883
    )
    assert resolve_ports(explicit, previous) == (4001, 4002, 1883)


def test_agent_command_passes_only_the_options_that_were_set(tmp_path: Path) -> None:
    base = dict(site=SITE, center_leaf_url="nats-leaf://h:1", data_dir=tmp_path)
    argv = agent_command(SiteRunConfig(**base), "nats://127.0.0.1:5", tmp_path / "agent")
    assert argv[1:3] == ["-m", "edge_agent"]
    assert argv[argv.index("--site") + 1] == SITE
    assert argv[argv.index("--nats") + 1] == "nats://127.0.0.1:5"
    assert not any(flag.startswith("--replay") or flag == "--mqtt-broker" for flag in argv)
    full = SiteRunConfig(
        **base,
        mqtt_broker="mqtt://10.0.0.5:1883",
        replay_max_bytes=1000,
        replay_max_age_s=60.0,
        replay_policy="drop_oldest",
    )
    argv = agent_command(full, "nats://127.0.0.1:5", tmp_path / "agent")
    pairs = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert pairs["--mqtt-broker"] == "mqtt://10.0.0.5:1883"
    assert pairs["--replay-max-bytes"] == "1000"
    assert pairs["--replay-max-age-s"] == "60.0"
    assert pairs["--replay-policy"] == "drop_oldest"


@pytest.mark.parametrize(
    "override",
    [
        {"site": "bad.site"},
        {"site": "center"},
        {"replay_policy": "keep_all"},
        {"center_leaf_url": "localhost"},
        {"restart_backoff_min_s": 0.0},
    ],
)
def test_config_rejects_bad_values(tmp_path: Path, override: dict[str, Any]) -> None:
    values: dict[str, Any] = dict(site=SITE, center_leaf_url="nats-leaf://h:1", data_dir=tmp_path)
    with pytest.raises(ValueError):
        SiteRunConfig(**{**values, **override})


def test_state_of_another_site_is_refused(tmp_path: Path) -> None:
    other = SiteState("s2", str(tmp_path), "nats-leaf://h:1", "127.0.0.1", 1, 2, 3)
    (tmp_path / "site.json").write_text(json.dumps(other.to_dict()))
    config = SiteRunConfig(site=SITE, center_leaf_url="nats-leaf://h:1", data_dir=tmp_path)
    with pytest.raises(SiteStateError, match="belongs to site 's2'"):
        SiteSupervisor(config).run()


# -- supervision, with a stand-in agent -----------------------------------------------------


def test_restarts_killed_children_on_the_same_ports_and_stops_everything(
    edge_topology: EdgeTopology, supervisors: Supervisors, tmp_path: Path
) -> None:
    hub = edge_topology.hub
    data_dir = tmp_path / "site"
    proc = supervisors.start(data_dir, center_leaf_url=hub.leaf_url, agent_argv=STAND_IN)
    first = wait_for(state_where(data_dir, all_running), 20, "site not running")
    hub.wait_leaf_connections(1)

    # A second supervisor on the same data dir is refused, without touching the first.
    config = SiteRunConfig(site=SITE, center_leaf_url=hub.leaf_url, data_dir=data_dir)
    with pytest.raises(SiteAlreadyRunning):
        SiteSupervisor(config).run()

    old_agent = first.children[AGENT].pid
    assert old_agent is not None
    os.kill(old_agent, signal.SIGKILL)
    killed_at = time.monotonic()
    after = wait_for(
        state_where(data_dir, lambda s: running(AGENT)(s) and s.children[AGENT].pid != old_agent),
        10,
        "agent not restarted",
    )
    print(f"agent restarted {time.monotonic() - killed_at:.2f}s after kill -9")
    assert after.children[AGENT].restarts == 1
    assert after.children[AGENT].last_exit_code == -signal.SIGKILL
    assert after.children[SERVER].restarts == 0

    old_server, agent_pid = after.children[SERVER].pid, after.children[AGENT].pid
    assert old_server is not None
    os.kill(old_server, signal.SIGKILL)
    killed_at = time.monotonic()
    hub.wait_leaf_connections(0)
    after = wait_for(
        state_where(
            data_dir, lambda s: running(SERVER)(s) and s.children[SERVER].pid != old_server
        ),
        20,
        "nats-server not restarted",
    )
    hub.wait_leaf_connections(1)
    print(f"nats-server restarted and leaf back {time.monotonic() - killed_at:.2f}s after kill -9")
    assert after.children[SERVER].restarts == 1
    assert (after.nats_port, after.monitor_port, after.mqtt_port) == (
        first.nats_port,
        first.monitor_port,
        first.mqtt_port,
    )
    assert monitor(after, "varz")["port"] == first.nats_port
    assert after.children[AGENT].pid == agent_pid  # the agent reconnects; it is not restarted
    assert after.children[AGENT].restarts == 1

    stop_and_check_nothing_left(proc, after)


def test_center_unreachable_at_start_links_later_without_a_restart(
    supervisors: Supervisors, tmp_path: Path
) -> None:
    # The hub's ports are fixed by its spec before it runs, so the site can point at it.
    hub = NatsServerProcess(NatsServerSpec.hub("hub", tmp_path / "hub" / "store"), tmp_path / "hub")
    data_dir = tmp_path / "site"
    try:
        proc = supervisors.start(data_dir, center_leaf_url=hub.leaf_url, agent_argv=STAND_IN)
        before = wait_for(state_where(data_dir, all_running), 20, "site not running offline")
        time.sleep(1.0)  # several failed leaf dials (every 0.25 s)
        assert site_leafs(before) == 0
        assert proc.poll() is None

        started = time.monotonic()
        hub.start()
        hub.wait_leaf_connections(1, timeout=10)
        wait_for(lambda: site_leafs(before) == 1, 5, "site does not see its leaf link")
        print(f"leaf connected {time.monotonic() - started:.2f}s after the hub was started")

        after = read_site_state(data_dir)
        assert after.children[SERVER].pid == before.children[SERVER].pid
        assert after.children[SERVER].restarts == 0
        assert after.children[AGENT].restarts == 0
        stop_and_check_nothing_left(proc, after)
    finally:
        hub.stop()


def test_restart_after_supervisor_kill_reclaims_orphans_and_reuses_ports(
    supervisors: Supervisors, tmp_path: Path
) -> None:
    center = f"nats-leaf://127.0.0.1:{free_port()}"  # no center at all: offline throughout
    data_dir = tmp_path / "site"
    first_proc = supervisors.start(data_dir, center_leaf_url=center, agent_argv=STAND_IN)
    first = wait_for(state_where(data_dir, all_running), 20, "site not running")
    server_pid, agent_pid = first.children[SERVER].pid, first.children[AGENT].pid
    assert server_pid is not None and agent_pid is not None

    first_proc.kill()
    first_proc.wait()
    # The agent dies with its supervisor; the nats-server is left running, holding the ports.
    wait_for(lambda: not alive(agent_pid), 5, "agent outlived its supervisor")
    assert alive(server_pid)

    second_proc = supervisors.start(data_dir, center_leaf_url=center, agent_argv=STAND_IN)
    second = wait_for(
        state_where(
            data_dir,
            lambda s: all_running(s) and s.supervisor.pid == second_proc.pid,
        ),
        20,
        "second supervisor not running",
    )
    assert not alive(server_pid)
    assert second.children[SERVER].pid != server_pid
    assert (second.nats_port, second.monitor_port, second.mqtt_port) == (
        first.nats_port,
        first.monitor_port,
        first.mqtt_port,
    )
    stop_and_check_nothing_left(second_proc, second)


def test_stop_kills_an_agent_that_ignores_sigterm(supervisors: Supervisors, tmp_path: Path) -> None:
    center = f"nats-leaf://127.0.0.1:{free_port()}"
    data_dir = tmp_path / "site"
    proc = supervisors.start(
        data_dir, center_leaf_url=center, agent_argv=STUBBORN, stop_timeout_s=1.0
    )
    state = wait_for(state_where(data_dir, all_running), 20, "site not running")
    started = time.monotonic()
    stop_and_check_nothing_left(proc, state)
    assert time.monotonic() - started < 8.0


# -- the real agent, through the installed `edgebus site run` -------------------------------

EDGEBUS = Path(sys.executable).parent / "edgebus"


def agent_report(data_dir: Path) -> dict[str, Any] | None:
    """The agent's own status report over the site's local NATS, or None if it is not answering."""
    import asyncio

    from edgebus.site import collect_site_status

    status = asyncio.run(collect_site_status(data_dir, timeout_s=1.0))
    report: dict[str, Any] | None = status["agent"].get("report")
    return report


def test_site_run_supervises_the_real_agent(edge_topology: EdgeTopology, tmp_path: Path) -> None:
    hub = edge_topology.hub
    data_dir = tmp_path / "site"
    with (tmp_path / "site-run.log").open("ab") as log:
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
                hub.leaf_url,
                "--data-dir",
                str(data_dir),
                "--leaf-reconnect-s",
                "0.25",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        started = time.monotonic()
        first = wait_for(state_where(data_dir, all_running), 30, "site not running")
        hub.wait_leaf_connections(1, timeout=15)
        report = wait_for(lambda: agent_report(data_dir), 30, "agent never answered status")
        print(f"agent answering {time.monotonic() - started:.2f}s after `site run`")
        assert report["site"] == SITE
        first_report = report

        old_agent = first.children[AGENT].pid
        assert old_agent is not None
        os.kill(old_agent, signal.SIGKILL)
        killed_at = time.monotonic()
        after = wait_for(
            state_where(
                data_dir, lambda s: running(AGENT)(s) and s.children[AGENT].pid != old_agent
            ),
            15,
            "agent not restarted",
        )
        restarted_in = time.monotonic() - killed_at
        report = wait_for(lambda: agent_report(data_dir), 30, "restarted agent silent")
        print(
            f"agent restarted {restarted_in:.2f}s and answering again "
            f"{time.monotonic() - killed_at:.2f}s after kill -9"
        )
        assert after.children[AGENT].restarts == 1
        assert report["started_at"] > first_report["started_at"]  # a new agent process

        old_server = after.children[SERVER].pid
        assert old_server is not None
        os.kill(old_server, signal.SIGKILL)
        killed_at = time.monotonic()
        after = wait_for(
            state_where(
                data_dir, lambda s: running(SERVER)(s) and s.children[SERVER].pid != old_server
            ),
            20,
            "nats-server not restarted",
        )
        hub.wait_leaf_connections(1, timeout=15)
        wait_for(lambda: agent_report(data_dir), 30, "agent silent after its server restarted")
        print(
            f"server restarted, agent answering {time.monotonic() - killed_at:.2f}s after kill -9"
        )
        assert after.nats_port == first.nats_port and after.mqtt_port == first.mqtt_port
        assert after.children[SERVER].restarts == 1
        assert after.children[AGENT].restarts == 1  # the agent reconnected on its own

        stop_and_check_nothing_left(proc, read_site_state(data_dir))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_processes_under(data_dir)


def test_a_persisted_port_taken_by_another_process_is_replaced(
    supervisors: Supervisors, tmp_path: Path
) -> None:
    center = f"nats-leaf://127.0.0.1:{free_port()}"
    data_dir = tmp_path / "site"
    first_proc = supervisors.start(data_dir, center_leaf_url=center, agent_argv=STAND_IN)
    first = wait_for(state_where(data_dir, all_running), 20, "site not running")
    stop_and_check_nothing_left(first_proc, first)

    # While the site is down, a stranger listens on its persisted MQTT port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stranger:
        stranger.bind(("127.0.0.1", first.mqtt_port))
        stranger.listen()
        proc = supervisors.start(data_dir, center_leaf_url=center, agent_argv=STAND_IN)
        after = wait_for(state_where(data_dir, all_running), 30, "site not running")
    assert after.mqtt_port != first.mqtt_port
    assert (after.nats_port, after.monitor_port) == (first.nats_port, first.monitor_port)
    assert monitor(after, "varz")["mqtt"]["port"] == after.mqtt_port
    stop_and_check_nothing_left(proc, after)
