"""The site supervisor behind `edgebus site run`: the site's own nats-server and its edge agent.

Restarts a crashed child with exponential backoff, stops every child on SIGTERM/SIGINT, and keeps
ports, pids and restart counts in `<data_dir>/site.json` so restarts and local tools find the site.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import psutil

from bus import subjects
from bus.log import get_logger
from bus.natsserver import (
    LeafRemote,
    NatsServerError,
    NatsServerProcess,
    NatsServerSpec,
    free_port,
)
from bus.streams import ReplayFullPolicy
from edge_agent.childproc import spawn_logged

__all__ = [
    "AGENT",
    "SERVER",
    "ChildState",
    "SiteAlreadyRunning",
    "SiteRunConfig",
    "SiteState",
    "SiteStateError",
    "SiteSupervisor",
    "agent_command",
    "backoff_delay",
    "process_alive",
    "read_site_state",
    "resolve_ports",
]

STATE_FILE = "site.json"
LOCK_FILE = "site.lock"
STATE_FORMAT = 1
SERVER = "nats-server"
AGENT = "agent"
_SERVER_START_TIMEOUT_S = 20.0
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class SiteStateError(RuntimeError):
    """site.json is missing, unreadable, or belongs to another site."""


class SiteAlreadyRunning(RuntimeError):
    """Another supervisor holds this data dir's lock."""


@dataclass(frozen=True, kw_only=True)
class SiteRunConfig:
    """What `edgebus site run` starts; a port of 0 reuses the one in site.json, else a free one."""

    site: str
    center_leaf_url: str  # e.g. nats-leaf://center.example:7422
    data_dir: Path
    host: str = "127.0.0.1"  # every listener of the site server binds here (MQTT included)
    nats_port: int = 0
    monitor_port: int = 0
    mqtt_port: int = 0
    mqtt_broker: str | None = None  # an existing broker the agent reads instead (mqtt://h:p)
    # None leaves the agent's own default in place.
    replay_max_bytes: int | None = None
    replay_max_age_s: float | None = None
    replay_policy: str | None = None
    batch_size: int | None = None
    max_payload_bytes: int | None = None
    agent_log_level: str = "info"
    leaf_credentials: Path | None = None
    heartbeat_interval_s: float | None = None  # from onboarding; None: the agent's default
    leaf_reconnect_s: float = 1.0  # how often the site server redials an unreachable center
    restart_backoff_min_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    stable_after_s: float = 10.0  # a child that ran this long restarts from the minimum backoff
    stop_timeout_s: float = 10.0  # SIGTERM -> SIGKILL grace per child
    poll_interval_s: float = 0.1
    # Replaces `python -m edge_agent ...` entirely (tests, custom agents).
    agent_argv: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        subjects.site_id(self.site)
        if "://" not in self.center_leaf_url:
            raise ValueError(
                f"center URL must look like nats-leaf://host:port, not {self.center_leaf_url!r}"
            )
        if self.replay_policy is not None and self.replay_policy not in ReplayFullPolicy.ALL:
            raise ValueError(f"replay policy must be one of {ReplayFullPolicy.ALL}")
        if self.heartbeat_interval_s is not None and not self.heartbeat_interval_s > 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if not 0 < self.restart_backoff_min_s <= self.restart_backoff_max_s:
            raise ValueError("need 0 < restart_backoff_min_s <= restart_backoff_max_s")
        for name in ("nats_port", "monitor_port", "mqtt_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} out of range")


# -- site.json --------------------------------------------------------------------------


@dataclass
class ChildState:
    """One supervised process as recorded in site.json; exit codes < 0 mean killed by signal."""

    pid: int | None = None
    create_time: float | None = None  # tells our process apart from a later one reusing the pid
    state: str = "stopped"  # running | backoff | stopped
    started_at: str | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_at: str | None = None
    last_error: str | None = None
    log: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChildState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SiteState:
    """Content of `<data_dir>/site.json`, written atomically on every change."""

    site: str
    data_dir: str
    center_leaf_url: str
    host: str
    nats_port: int
    monitor_port: int
    mqtt_port: int
    supervisor: ChildState = field(default_factory=ChildState)
    children: dict[str, ChildState] = field(default_factory=dict)
    updated_at: str | None = None

    @property
    def local_host(self) -> str:
        return "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host

    @property
    def nats_url(self) -> str:
        return f"nats://{self.local_host}:{self.nats_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.local_host}:{self.monitor_port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self.local_host}:{self.mqtt_port}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "site": self.site,
            "data_dir": self.data_dir,
            "center_leaf_url": self.center_leaf_url,
            "host": self.host,
            "ports": {"nats": self.nats_port, "monitor": self.monitor_port, "mqtt": self.mqtt_port},
            "urls": {"nats": self.nats_url, "monitor": self.monitor_url, "mqtt": self.mqtt_url},
            "supervisor": asdict(self.supervisor),
            "children": {name: asdict(child) for name, child in self.children.items()},
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteState:
        if data.get("format") != STATE_FORMAT:
            raise SiteStateError(f"unsupported site.json format {data.get('format')!r}")
        ports = data["ports"]
        return cls(
            site=data["site"],
            data_dir=data["data_dir"],
            center_leaf_url=data["center_leaf_url"],
            host=data["host"],
            nats_port=int(ports["nats"]),
            monitor_port=int(ports["monitor"]),
            mqtt_port=int(ports["mqtt"]),
            supervisor=ChildState.from_dict(data.get("supervisor") or {}),
            children={k: ChildState.from_dict(v) for k, v in (data.get("children") or {}).items()},
            updated_at=data.get("updated_at"),
        )


def read_site_state(data_dir: Path) -> SiteState:
    path = data_dir / STATE_FILE
    try:
        return SiteState.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise SiteStateError(
            f"no {STATE_FILE} in {data_dir}: has `edgebus site run` used it?"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SiteStateError(f"unreadable {path}: {exc!r}") from exc


def _write_site_state(data_dir: Path, state: SiteState) -> None:
    # Readers (site status, a restarted supervisor) must never see a half-written file.
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# -- plain decisions ----------------------------------------------------------------------


def backoff_delay(failures: int, minimum_s: float, maximum_s: float) -> float:
    """Delay before restart number `failures` in a row: minimum, doubling, capped."""
    if failures <= 1:
        return minimum_s
    return float(min(maximum_s, minimum_s * 2 ** min(failures - 1, 30)))


def agent_data_dir(site_data_dir: Path) -> Path:
    """The agent's own data (applied config, ...) inside a site's data dir."""
    return site_data_dir / "agent"


def port_taken(host: str, port: int) -> bool:
    """True if something else listens on `port` (TIME_WAIT leftovers do not count: the
    server binds with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in _WILDCARD_HOSTS else "0.0.0.0", port))
        except OSError:
            return True
    return False


def resolve_ports(config: SiteRunConfig, previous: SiteState | None) -> tuple[int, int, int]:
    """(nats, monitor, mqtt): explicit ports win, then the ones persisted, then free ones."""

    def pick(explicit: int, persisted: int | None) -> int:
        return explicit or persisted or free_port()

    return (
        pick(config.nats_port, previous.nats_port if previous else None),
        pick(config.monitor_port, previous.monitor_port if previous else None),
        pick(config.mqtt_port, previous.mqtt_port if previous else None),
    )


def agent_command(config: SiteRunConfig, nats_url: str, agent_dir: Path) -> list[str]:
    """The agent's command line; optional flags only when set, so the agent's defaults apply."""
    if config.agent_argv is not None:
        return list(config.agent_argv)
    argv = [sys.executable, "-m", "edge_agent", "--site", config.site, "--nats", nats_url]
    argv += ["--data-dir", str(agent_dir), "--log-level", config.agent_log_level]
    optional: list[tuple[str, object]] = [
        ("--mqtt-broker", config.mqtt_broker),
        ("--replay-max-bytes", config.replay_max_bytes),
        ("--replay-max-age-s", config.replay_max_age_s),
        ("--replay-policy", config.replay_policy),
        ("--batch-size", config.batch_size),
        ("--max-payload-bytes", config.max_payload_bytes),
        ("--heartbeat-interval-s", config.heartbeat_interval_s),
    ]
    for flag, value in optional:
        if value is not None:
            argv += [flag, str(value)]
    return argv


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` runs and is the very process recorded (not a reuse of its pid)."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(process.create_time() - create_time) < 0.05
    except psutil.Error:
        return False


def _create_time(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


# -- children -----------------------------------------------------------------------------


class _Child(Protocol):
    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def exit_code(self) -> int | None:
        """Not None once the process has exited on its own."""

    def stop(self, timeout_s: float, hurry: threading.Event) -> None: ...


class _ServerChild:
    def __init__(self, server: NatsServerProcess) -> None:
        self.name = SERVER
        self.server = server

    @property
    def pid(self) -> int | None:
        return self.server.pid

    @property
    def running(self) -> bool:
        return self.server.running

    def start(self) -> None:
        self.server.start(timeout=_SERVER_START_TIMEOUT_S)

    def exit_code(self) -> int | None:
        return self.server.returncode

    def stop(self, timeout_s: float, hurry: threading.Event) -> None:
        self.server.stop(timeout=0.5 if hurry.is_set() else timeout_s)


class _AgentChild:
    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.name = AGENT
        self.argv = argv
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        self._proc = spawn_logged(self.argv, self.log_path)

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def stop(self, timeout_s: float, hurry: threading.Event) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline and not hurry.is_set():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)
            if proc.poll() is None:
                proc.kill()
        proc.wait()


@dataclass
class _Slot:
    child: _Child
    state: ChildState
    failures: int = 0  # consecutive short-lived runs or failed starts, for the backoff
    next_start: float = 0.0  # monotonic time of the next start attempt
    up_since: float = 0.0
    started_once: bool = False


def _terminate(pid: int, timeout_s: float) -> None:
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(timeout=5.0)


# -- the supervisor -----------------------------------------------------------------------


class SiteSupervisor:
    """Runs one site until `request_stop()` (or SIGTERM/SIGINT when run on the main thread).

    Layout under data_dir: site.json, site.lock, nats/ (config, log, store/), agent/ (the
    agent's own data), logs/agent.log.
    """

    def __init__(self, config: SiteRunConfig) -> None:
        self.config = replace(config, data_dir=config.data_dir.resolve())
        self.data_dir = self.config.data_dir
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._log = get_logger("edge_agent.supervisor", site=config.site)
        self._state: SiteState | None = None
        self._slots: list[_Slot] = []

    def request_stop(self) -> None:
        """Ask the loop to stop all children; a second request skips their grace period."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    @property
    def state(self) -> SiteState:
        if self._state is None:
            raise RuntimeError("the supervisor has not started")
        return self._state

    def run(self, on_started: Callable[[SiteState], None] | None = None) -> int:
        """Supervise until asked to stop; returns the process exit code (0 after a clean stop).

        `on_started` is called once site.json is written, before any child is started.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._exclusive(), self._signals_handled():
            previous = self._previous_state()
            self._reclaim_orphans(previous)
            self._state = self._initial_state(previous)
            self._slots = self._make_slots(self._state)
            self._save()
            self._log.info(
                "site_started",
                nats=self._state.nats_url,
                mqtt=self._state.mqtt_url,
                center=self.config.center_leaf_url,
            )
            if on_started is not None:
                on_started(self._state)
            try:
                self._supervise()
            finally:
                self._shutdown()
        return 0

    # -- set-up ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # flock dies with its holder, even on kill -9, so a stale lock never blocks a restart.
        with (self.data_dir / LOCK_FILE).open("a+") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SiteAlreadyRunning(
                    f"another `edgebus site run` supervises {self.data_dir}"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _signals_handled(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # embedded use (tests): the caller stops us with request_stop()
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _previous_state(self) -> SiteState | None:
        if not (self.data_dir / STATE_FILE).exists():
            return None
        previous = read_site_state(self.data_dir)
        if previous.site != self.config.site:
            raise SiteStateError(
                f"{self.data_dir} belongs to site {previous.site!r}, not {self.config.site!r}"
            )
        return previous

    def _reclaim_orphans(self, previous: SiteState | None) -> None:
        """Children of a supervisor that was killed outright would still hold our ports."""
        if previous is None:
            return
        for name, child in previous.children.items():
            if child.pid is not None and process_alive(child.pid, child.create_time):
                self._log.warning("orphan_stopped", child=name, pid=child.pid)
                _terminate(child.pid, self.config.stop_timeout_s)

    def _initial_state(self, previous: SiteState | None) -> SiteState:
        nats_port, monitor_port, mqtt_port = resolve_ports(self.config, previous)
        pid = os.getpid()
        return SiteState(
            site=self.config.site,
            data_dir=str(self.data_dir),
            center_leaf_url=self.config.center_leaf_url,
            host=self.config.host,
            nats_port=nats_port,
            monitor_port=monitor_port,
            mqtt_port=mqtt_port,
            supervisor=ChildState(
                pid=pid, create_time=_create_time(pid), state="running", started_at=_now_iso()
            ),
        )

    def _make_slots(self, state: SiteState) -> list[_Slot]:
        nats_dir = self.data_dir / "nats"
        spec = NatsServerSpec(
            name=self.config.site,
            store_dir=nats_dir / "store",
            host=self.config.host,
            port=state.nats_port,
            monitor_port=state.monitor_port,
            jetstream_domain=self.config.site,
            leaf_remotes=(LeafRemote(self.config.center_leaf_url, self.config.leaf_credentials),),
            leaf_reconnect_seconds=self.config.leaf_reconnect_s,
            mqtt_port=state.mqtt_port,
        )
        server = _ServerChild(NatsServerProcess(spec, nats_dir))
        agent_log = self.data_dir / "logs" / "agent.log"
        argv = agent_command(self.config, state.nats_url, agent_data_dir(self.data_dir))
        agent = _AgentChild(argv, agent_log)
        slots = [
            _Slot(server, ChildState(log=str(server.server.log_path))),
            _Slot(agent, ChildState(log=str(agent_log))),
        ]
        state.children = {slot.child.name: slot.state for slot in slots}
        return slots

    # -- the loop -------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stop.is_set():
            changed = False
            for slot in self._slots:
                changed = self._tick(slot) or changed
            if changed:
                self._save()
            self._stop.wait(self.config.poll_interval_s)

    def _tick(self, slot: _Slot) -> bool:
        now = time.monotonic()
        if slot.state.state == "running":
            code = slot.child.exit_code()
            if code is None:
                return False
            self._on_exit(slot, code, now)
            return True
        if now < slot.next_start or self._stop.is_set():
            return False
        if slot.child.name == AGENT and not self._slots[0].child.running:
            return False  # the agent only ever talks to its own server: wait for it
        self._start(slot, now)
        return True

    def _start(self, slot: _Slot, now: float) -> None:
        child, state = slot.child, slot.state
        try:
            child.start()
        except (NatsServerError, OSError) as exc:
            if child.name == SERVER and self._repick_taken_ports():
                self._rebuild_slots()
                slot = self._slots[0]
            slot.failures += 1
            delay = self._backoff(slot.failures)
            slot.next_start = time.monotonic() + delay
            slot.state.state, slot.state.last_error = "backoff", str(exc)[-1000:]
            self._log.error(
                "child_start_failed", child=child.name, error=str(exc), retry_in_s=delay
            )
            return
        if slot.started_once:
            state.restarts += 1
        slot.started_once = True
        slot.up_since = time.monotonic()
        state.pid, state.create_time = child.pid, _create_time(child.pid)
        state.state, state.started_at, state.last_error = "running", _now_iso(), None
        self._log.info("child_started", child=child.name, pid=child.pid, restarts=state.restarts)

    def _repick_taken_ports(self) -> bool:
        """Ports we chose ourselves (none given on the command line) that another process
        holds now get new free ones: a site must not retry a bind error forever."""
        state, changed = self.state, False
        for name in ("nats_port", "monitor_port", "mqtt_port"):
            port = getattr(state, name)
            if getattr(self.config, name) or not port_taken(self.config.host, port):
                continue
            setattr(state, name, free_port())
            changed = True
            self._log.warning("port_taken", port_name=name, port=port, new=getattr(state, name))
        return changed

    def _rebuild_slots(self) -> None:
        """New server spec and agent command line for new ports, keeping restart counts; the
        agent is stopped first when it runs (it would talk to the old port)."""
        old = self._slots
        for slot in old:
            if slot.child.name == AGENT and slot.child.running:
                slot.child.stop(self.config.stop_timeout_s, self._hurry)
        self._slots = self._make_slots(self.state)
        for new, previous in zip(self._slots, old, strict=True):
            new.failures, new.next_start = previous.failures, previous.next_start
            new.started_once, new.state.restarts = previous.started_once, previous.state.restarts
        self._save()

    def _on_exit(self, slot: _Slot, code: int, now: float) -> None:
        stable = now - slot.up_since >= self.config.stable_after_s
        slot.failures = 1 if stable else slot.failures + 1
        delay = self._backoff(slot.failures)
        slot.next_start = now + delay
        state = slot.state
        self._log.warning(
            "child_exited", child=slot.child.name, pid=state.pid, exit_code=code, restart_in_s=delay
        )
        state.pid = state.create_time = None
        state.state, state.last_exit_code, state.last_exit_at = "backoff", code, _now_iso()

    def _backoff(self, failures: int) -> float:
        return backoff_delay(
            failures, self.config.restart_backoff_min_s, self.config.restart_backoff_max_s
        )

    # -- shutdown -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Agent first (it flushes through its server), then the server; always both."""
        state = self.state
        state.supervisor.state = "stopping"
        self._save()
        for slot in reversed(self._slots):
            try:
                slot.child.stop(self.config.stop_timeout_s, self._hurry)
            except Exception as exc:  # keep going: the next child must be stopped too
                self._log.error("child_stop_failed", child=slot.child.name, error=repr(exc))
            slot.state.pid = slot.state.create_time = None
            slot.state.state = "stopped"
            self._log.info("child_stopped", child=slot.child.name)
        state.supervisor.state = "stopped"
        state.supervisor.pid = state.supervisor.create_time = None
        self._save()
        self._log.info("site_stopped")

    def _save(self) -> None:
        state = self.state
        state.updated_at = _now_iso()
        try:
            _write_site_state(self.data_dir, state)
        except OSError as exc:  # a full disk must not take the site down with it
            self._log.error("site_state_write_failed", error=repr(exc))
