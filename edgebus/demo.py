"""The embedded demo: a center, its controller, real sites onboarded zero-touch, simulated devices
and a live fleet table on one machine. Ctrl-C, SIGTERM or --duration stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.live import Live

from bus import subjects
from bus.auth import write_private
from bus.client import Bus
from edgebus.center import (
    connect_center,
    declare_center_streams,
    start_center_server,
)
from edgebus.config_cli import set_config
from edgebus.demo_center import ControllerTuning, DemoCenter
from edgebus.devices import read_stats
from edgebus.fleet_view import FleetCollector, FleetSnapshot, ViewContext, fleet_view, site_summary
from edgebus.processes import (
    ChildProcess,
    describe,
    kill_all,
    leftover_processes,
    stop_in_order,
)
from edgebus.sites import add_sites
from edgebus.status import collect_status, status_table
from schemas.controller import Availability, ControllerStats, ControllerStatsQuery
from schemas.sync import ConfigSet, Scope, Target

MARKER_FILE = ".edgebus-demo"
LOCK_FILE = "demo.lock"
REFRESH_S = 1.0
CONTROLLER_READY_TIMEOUT_S = 45.0
SITE_STOP_TIMEOUT_S = 25.0  # a site supervisor stops its agent, then its server
STOP_TIMEOUT_S = 10.0
# The demo group's alarm rule: the simulated temperatures swing 18-24 °C over two minutes
# (`edgebus.devices`), so each device raises it, then clears it, once a cycle.
DEMO_ALARM_RULES: dict[str, Any] = {
    "rules": [
        {
            "kind": "threshold",
            "id": "warm",
            "channel": "temp",
            "path": "value",
            "raise_at": 23.5,
            "clear_at": 22.5,
            "severity": "major",
            "text": "temperature above 23.5",
        }
    ]
}


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path
    duration_s: float = 0.0  # 0: until Ctrl-C / SIGTERM
    sites: int = 2
    simulate: int = 0  # virtual sites from the site simulator
    devices_per_site: int = 3
    device_interval_s: float = 1.0
    summary_json: Path | None = None
    tuning: ControllerTuning = field(default_factory=ControllerTuning)

    def __post_init__(self) -> None:
        if self.sites < 1 or self.simulate < 0 or self.devices_per_site < 1:
            raise ValueError("need --sites >= 1, --simulate >= 0 and --devices >= 1")
        if self.duration_s < 0 or self.device_interval_s <= 0:
            raise ValueError("--duration must be >= 0 and the device interval positive")


def demo_site_ids(count: int) -> list[str]:
    return [f"s{n:03d}" for n in range(1, count + 1)]


@contextlib.contextmanager
def claimed_data_dir(path: Path) -> Iterator[Path]:
    """Hold the data dir for this run and empty what an earlier demo left there.

    Every run starts afresh: sites onboard with new tokens against a center on new ports.
    A non-empty directory that no demo made is refused rather than emptied.
    """
    path.mkdir(parents=True, exist_ok=True)
    leftovers = [p for p in path.iterdir() if p.name not in (MARKER_FILE, LOCK_FILE)]
    if leftovers and not (path / MARKER_FILE).exists():
        raise DemoError(
            f"{path} is not empty and was not made by the demo: give another --data-dir"
        )
    with (path / LOCK_FILE).open("a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(f"another demo is running in {path}") from None
        try:
            for entry in leftovers:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            (path / MARKER_FILE).write_text("edgebus demo data; emptied at every run\n")
            yield path
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def describe_error(error: BaseException) -> str:
    """A DemoError says it all; anything else also names its type (the traceback is logged)."""
    if isinstance(error, DemoError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class _Stopped(Exception):
    """Ctrl-C, SIGTERM or --duration arrived while the demo was starting."""


class Demo:
    """One run. `await run()` returns the exit code: 0 after a clean stop, 1 after a failure
    or when a process outlived the shutdown."""

    def __init__(self, options: DemoOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.data_dir = options.data_dir
        self.sites = demo_site_ids(options.sites)
        self.center = DemoCenter(self.data_dir / "center")
        self.children: dict[str, ChildProcess] = {}
        self.bus: Bus | None = None
        self.stop = asyncio.Event()
        self.hurry = threading.Event()
        self.stopped_by = ""
        self.started = time.monotonic()
        self.first_online: dict[str, float] = {}
        self.full_table_after_s: float | None = None
        self.snapshot = FleetSnapshot()
        self.devices_sent: dict[str, int] = {}
        self._center_process: psutil.Process | None = None

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> int:
        self._install_stop_triggers()
        error: BaseException | None = None
        try:
            await self._start()
            await self._watch()
        except _Stopped:
            pass
        except DemoError as exc:
            error = exc
        except Exception as exc:  # a bug or an unexpected failure: still stop everything
            error = exc
            log = self.data_dir / "logs" / "demo-error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
            self.console.print(f"traceback in {log}", soft_wrap=True, highlight=False)
        if error is not None:
            self.stopped_by = "error"
            self.console.print(f"[red]demo failed:[/red] {describe_error(error)}", soft_wrap=True)
        left = await self._shutdown()
        code = 1 if error is not None or left else 0
        self._write_summary(code, error, left)
        if not left:
            self.console.print("demo stopped; every process it started has exited")
        return code

    def _install_stop_triggers(self) -> None:
        loop = asyncio.get_running_loop()

        def on_stop(reason: str) -> None:
            if self.stop.is_set():
                if reason != "duration":
                    self.hurry.set()  # a second Ctrl-C: skip the grace periods
                return
            self.stopped_by = reason
            self.stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_stop, sig.name)
        if self.options.duration_s > 0:
            loop.call_later(self.options.duration_s, on_stop, "duration")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _checkpoint(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    async def _until_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def _say(self, text: str) -> None:
        self.console.print(
            f"[dim]{self.elapsed():5.1f}s[/dim] {text}", soft_wrap=True, highlight=False
        )

    # -- start-up ---------------------------------------------------------------------------

    async def _start(self) -> None:
        await asyncio.to_thread(self.center.start)
        if self.center.server.pid is not None:
            with contextlib.suppress(psutil.Error):
                self._center_process = psutil.Process(self.center.server.pid)
        self._say(
            f"center nats-server {self.center.url} (leaf {self.center.leaf_url}), operator mode, "
            f"JetStream domain hub; data in {self.data_dir}"
        )
        self._checkpoint()
        self.bus = await self.center.connect()
        await declare_center_streams(self.bus)
        await self._start_controller()
        self._start_alarms()
        await self._start_sync()
        tokens = await self._add_sites()
        self._checkpoint()
        for site in self.sites:
            self._start_site(site, tokens[site])
        self._say(f"started {len(self.sites)} sites; each onboards itself with its token")
        self._start_devices()
        if self.options.simulate:
            self._start_simulator()
        self._say(f"demo running in {self.data_dir}; Ctrl-C stops it")
        self._say(
            f"operator commands meanwhile: export EDGEBUS_SERVER={self.center.url} "
            f"EDGEBUS_CREDENTIALS={self.center.creds_path('demo')}; then edgebus sites list, "
            "edgebus alarms summary, edgebus sync status, edgebus logs --since 10m"
        )

    def _spawn(self, name: str, argv: Sequence[str]) -> ChildProcess:
        child = ChildProcess(name, argv, self.data_dir / "logs" / f"{name}.log")
        self.children[name] = child
        child.start()
        return child

    async def _start_controller(self) -> None:
        controller = self._spawn("controller", self.center.controller_argv(self.options.tuning))
        assert self.bus is not None
        deadline = time.monotonic() + CONTROLLER_READY_TIMEOUT_S
        while True:
            self._checkpoint()
            self._check_children()
            try:
                await self.bus.request(
                    subjects.control("controller", "stats"),
                    ControllerStatsQuery(),
                    ControllerStats,
                    timeout=1.0,
                )
                break
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise DemoError(
                        f"the controller did not answer within {CONTROLLER_READY_TIMEOUT_S:.0f}s"
                        f" ({type(exc).__name__}); its log:\n{controller.log_tail()}"
                    ) from None
            await self._until_stopped(0.2)
        t = self.options.tuning
        self._say(
            f"controller up (pid {controller.pid}): heartbeats every {t.heartbeat_interval_s:g}s,"
            f" offline after {t.offline_after_s:g}s"
        )

    async def _start_sync(self) -> None:
        """The config-sync service, and a first config for the demo group (ingest limits and
        an alarm rule): each site gets it in its onboarding reply and `edgebus sync status`
        shows it in sync."""
        sync = self._spawn("sync", self.center.sync_argv(self.options.tuning))
        assert self.bus is not None
        group = Target(scope=Scope.GROUP, name="demo")
        change = ConfigSet(
            kind="ingest", target=group, values={"max_payload_bytes": 16 * 1024}, actor="demo"
        )
        deadline = time.monotonic() + CONTROLLER_READY_TIMEOUT_S
        while True:
            self._checkpoint()
            self._check_children()
            try:
                result = await set_config(self.bus, change, timeout=2.0)
                break
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise DemoError(
                        f"config sync did not answer within {CONTROLLER_READY_TIMEOUT_S:.0f}s"
                        f" ({type(exc).__name__}); its log:\n{sync.log_tail()}"
                    ) from None
            await self._until_stopped(0.2)
        rules = ConfigSet(kind="alarm_rules", target=group, values=DEMO_ALARM_RULES, actor="demo")
        await set_config(self.bus, rules, timeout=10.0)
        self._say(
            f"config sync up (pid {sync.pid}): ingest config rev {result.rev} for group demo;"
            " alarm rule 'warm' (temp >= 23.5 raises, <= 22.5 clears)"
        )

    def _start_alarms(self) -> None:
        """The alarms service: `edgebus alarms list` and the HEALTH of `edgebus sites list`."""
        alarms = self._spawn("alarms", self.center.alarms_argv(self.options.tuning))
        self._say(f"alarms service started (pid {alarms.pid})")

    async def _add_sites(self) -> dict[str, str]:
        """`edgebus sites add` for the real sites: one single-use bootstrap token each."""
        assert self.bus is not None
        added = await add_sites(
            self.bus, self.sites, group="demo", labels={"demo": "real"}, ttl_s=3600.0
        )
        if added.refused:
            raise DemoError(f"the controller refused to add sites: {added.refused}")
        self._say(f"added {', '.join(self.sites)}: bootstrap tokens minted")
        return dict(added.tokens)

    def _site_dir(self, site: str) -> Path:
        return self.data_dir / "sites" / site

    def _start_site(self, site: str, token: str) -> None:
        token_file = write_private(self.data_dir / "tokens" / f"{site}.token", token)
        self._spawn(
            f"site-{site}",
            [
                sys.executable, "-m", "edgebus", "site", "run",
                "--center", self.center.url,
                "--token-file", str(token_file),
                "--data-dir", str(self._site_dir(site)),
                "--onboard-timeout-s", "60",
            ],
        )  # fmt: skip

    @property
    def _devices_stats(self) -> Path:
        return self.data_dir / "devices" / "stats.json"

    def _start_devices(self) -> None:
        self._devices_stats.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "edgebus.devices",
            "--sites-dir", str(self.data_dir / "sites"),
            "--devices", str(self.options.devices_per_site),
            "--interval-s", str(self.options.device_interval_s),
            "--stats-file", str(self._devices_stats),
        ]  # fmt: skip
        for site in self.sites:
            argv += ["--site", site]
        self._spawn("devices", argv)
        self._say(
            f"devices: {self.options.devices_per_site} per site publish QoS 1 readings on "
            f"dev/<site>/<device>/<channel> every {self.options.device_interval_s:g}s"
        )

    def _start_simulator(self) -> None:
        self._spawn(
            "simulator",
            [
                sys.executable, "-m", "edgebus", "simulate",
                "--sites", str(self.options.simulate),
                "--server", self.center.url,
                "--credentials", str(self.center.creds_path("simulator")),
                "--interval-s", str(self.options.tuning.heartbeat_interval_s),
                "--prefix", "sim",
                "--groups", "1",
            ],
        )  # fmt: skip
        self._say(f"simulator: {self.options.simulate} virtual sites onboard and heartbeat")

    # -- running ----------------------------------------------------------------------------

    def _check_children(self) -> None:
        """A child that exits on its own is a failure: say which, with the end of its log."""
        for child in self.children.values():
            code = child.exit_code()
            if code is not None:
                raise DemoError(
                    f"{child.name} exited with code {code}; the end of {child.log_path}:\n"
                    f"{child.log_tail()}"
                )

    async def _watch(self) -> None:
        assert self.bus is not None
        collector = FleetCollector(self.bus, self.sites)
        previous: tuple[float, dict[str, int]] | None = None
        live = Live(console=self.console, auto_refresh=False, transient=False)
        try:
            with live:
                while not self.stop.is_set():
                    tick = time.monotonic()
                    self._check_children()
                    previous = await self._refresh(collector, live, previous)
                    await self._until_stopped(max(0.0, REFRESH_S - (time.monotonic() - tick)))
        finally:
            if not self.console.is_terminal:
                self.console.line()  # rich leaves the last line open when not on a terminal

    async def _refresh(
        self, collector: FleetCollector, live: Live, previous: tuple[float, dict[str, int]] | None
    ) -> tuple[float, dict[str, int]]:
        """Read the center, redraw; returns (when, readings per site) for the next rates."""
        for child in self.children.values():
            child.remember_descendants()
        with contextlib.suppress(TimeoutError):  # keep the last snapshot; retried next time
            self.snapshot = await asyncio.wait_for(collector.collect(), 5.0)
        self.devices_sent = {
            site: int(stats.get("sent", 0))
            for site, stats in read_stats(self._devices_stats).items()
        }
        at = time.monotonic()
        rates = self._rates(previous, at)
        self._note_progress()
        live.update(fleet_view(self.snapshot, self._context(rates)), refresh=True)
        return at, dict(self.snapshot.readings)

    def _rates(self, previous: tuple[float, dict[str, int]] | None, now: float) -> dict[str, float]:
        if previous is None or now <= previous[0]:
            return {}
        seconds = now - previous[0]
        return {
            site: (count - previous[1].get(site, 0)) / seconds
            for site, count in self.snapshot.readings.items()
        }

    def _context(self, rates: dict[str, float]) -> ViewContext:
        status = ""
        if self.full_table_after_s is not None:
            status = (
                f"all {len(self.sites)} sites online with readings at the center after "
                f"{self.full_table_after_s:.1f}s; logs in {self.data_dir / 'logs'}"
            )
        return ViewContext(
            real_sites=self.sites,
            now=datetime.now(UTC),
            elapsed_s=self.elapsed(),
            center_url=self.center.url,
            devices_sent=self.devices_sent,
            reading_rates=rates,
            status_line=status,
        )

    def _note_progress(self) -> None:
        for site in self.sites:
            record = self.snapshot.record(site)
            if record is not None and record.availability == Availability.ONLINE:
                self.first_online.setdefault(site, round(self.elapsed(), 1))
        if self.full_table_after_s is None and all(self._complete(s) for s in self.sites):
            self.full_table_after_s = round(self.elapsed(), 1)

    def _complete(self, site: str) -> bool:
        record = self.snapshot.record(site)
        return (
            record is not None
            and record.availability == Availability.ONLINE
            and record.inventory is not None
            and record.inventory.device_count > 0
            and self.snapshot.readings.get(site, 0) > 0
        )

    # -- shutdown ---------------------------------------------------------------------------

    async def _shutdown(self) -> list[psutil.Process]:
        """Sites first (each stops its agent, then its leaf server), then the simulator,
        devices, the controller and the other center services, then the center; returns what
        is still alive after that."""
        children = self.children
        groups = [
            [c for name, c in children.items() if name.startswith("site-")],
            [c for name, c in children.items() if name == "simulator"],
            [c for name, c in children.items() if name == "devices"],
            [c for name, c in children.items() if name == "controller"],
            # Center services (sync, alarms, ...): everything not named above.
            [
                c
                for name, c in children.items()
                if not name.startswith("site-")
                and name not in ("simulator", "devices", "controller")
            ],
        ]

        def announce(group: Sequence[ChildProcess]) -> None:
            self._say("stopping " + ", ".join(child.name for child in group))

        killed = await asyncio.to_thread(
            stop_in_order,
            groups[:1],
            timeout_s=SITE_STOP_TIMEOUT_S,
            hurry=self.hurry,
            on_group=announce,
        )
        killed += await asyncio.to_thread(
            stop_in_order, groups[1:], timeout_s=STOP_TIMEOUT_S, hurry=self.hurry, on_group=announce
        )
        if killed:
            self.console.print(f"[yellow]had to kill {', '.join(killed)}[/yellow]")
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
        if self.center.started:
            self._say("stopping the center")
            await asyncio.to_thread(self.center.stop)
        also = [self._center_process] if self._center_process is not None else []
        ours, others = leftover_processes(children.values(), str(self.data_dir), also)
        if ours:
            self.console.print(
                "[red]still running after the shutdown, killed now:[/red]\n"
                + "\n".join(describe(p) for p in ours)
            )
            kill_all(ours)
        if others:
            self.console.print(
                f"[yellow]other processes mention {self.data_dir} (not started by the demo, "
                "left alone):[/yellow]\n" + "\n".join(describe(p) for p in others)
            )
        return ours

    def _write_summary(self, code: int, error: BaseException | None, left: list[Any]) -> None:
        path = self.options.summary_json
        if path is None:
            return
        real = set(self.sites)
        virtual = [r for r in self.snapshot.records if r.site not in real]
        # The devices wrote their final counts as they stopped: the whole run's.
        final = read_stats(self._devices_stats)
        self.devices_sent.update({site: int(c.get("sent", 0)) for site, c in final.items()})
        sites = {}
        for site in self.sites:
            sites[site] = site_summary(site, self.snapshot, self.devices_sent)
            sites[site]["ever_online"] = site in self.first_online
            sites[site]["online_after_s"] = self.first_online.get(site)
        document = {
            "ok": code == 0,
            "exit_code": code,
            "error": describe_error(error) if error is not None else None,
            "stopped_by": self.stopped_by or None,
            "data_dir": str(self.data_dir),
            "center_url": self.center.url if self.center.started else None,
            "ran_s": round(self.elapsed(), 1),
            "full_table_after_s": self.full_table_after_s,
            "sites": sites,
            "virtual_sites": {
                "count": len(virtual),
                "online": sum(r.availability == Availability.ONLINE for r in virtual),
            },
            "center": {
                "streams": dict(self.snapshot.streams),
                "dead_letters": self.snapshot.dead_letters,
            },
            "processes_left": [describe(p) for p in left],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run_demo(options: DemoOptions, console: Console) -> int:
    """The whole demo; returns the process exit code (2: the data dir cannot be used)."""
    options = DemoOptions(**{**options.__dict__, "data_dir": options.data_dir.resolve()})
    try:
        with claimed_data_dir(options.data_dir):
            return asyncio.run(Demo(options, console).run())
    except DemoError as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        return 2


# -- `edgebus center run`: a bare center (no auth), kept here with the other launchers -------------


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _center_session(url: str, console: Console) -> None:
    bus = await connect_center(url, name="edgebus-center")
    try:
        await declare_center_streams(bus)
        console.print(status_table(await collect_status(bus)))
        console.print(f"center running at [bold]{url}[/bold]; Ctrl-C stops it")
        await _wait_for_signal()
    finally:
        await bus.close()


def run_center_until_stopped(data_dir: Path, console: Console) -> None:
    server = start_center_server(data_dir / "center")
    try:
        asyncio.run(_center_session(server.url, console))
    finally:
        server.stop()
        console.print("center stopped")
