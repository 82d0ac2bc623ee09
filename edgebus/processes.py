"""Child processes the demo starts: each in its own session with its own log, stopped in order.

`leftover_processes` is the psutil check that nothing the demo started outlives it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psutil

from edge_agent.childproc import spawn_logged

_POLL_S = 0.05
_HURRY_S = 3.0  # after a second Ctrl-C: how long a child still gets


class ChildProcess:
    """One named child: output appended to `log_path`, SIGTERM then SIGKILL to stop."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}  # descendants seen so far, by pid

    def start(self) -> None:
        self._proc = spawn_logged(self.argv, self.log_path, {"COLUMNS": "160"})
        self.remember_descendants()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def started(self) -> bool:
        return self._proc is not None

    def exit_code(self) -> int | None:
        """None while running (or never started); the exit status once it has exited."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def remember_descendants(self) -> None:
        """Note every process below this child now, so the final check knows them all."""
        if self.pid is None:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            self._known.setdefault(root.pid, root)
            for child in root.children(recursive=True):
                self._known.setdefault(child.pid, child)

    @property
    def known_processes(self) -> list[psutil.Process]:
        return list(self._known.values())

    def terminate(self) -> None:
        if self.running:
            assert self._proc is not None
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float, hurry: threading.Event | None = None) -> bool:
        """True once exited; gives up after `timeout_s` (or at once when `hurry` is set)."""
        if self._proc is None:
            return True
        deadline = time.monotonic() + timeout_s
        while self._proc.poll() is None:
            if time.monotonic() >= deadline:
                return False
            if hurry is not None and hurry.is_set() and deadline - time.monotonic() > _HURRY_S:
                return False
            time.sleep(_POLL_S)
        return True

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def stop_in_order(
    groups: Iterable[Sequence[ChildProcess]],
    *,
    timeout_s: float,
    hurry: threading.Event | None = None,
    on_group: Callable[[Sequence[ChildProcess]], None] | None = None,
) -> list[str]:
    """Stop group after group (all of one group at once): SIGTERM, then SIGKILL after
    `timeout_s`. Once `hurry` is set each child gets a second SIGTERM (a site supervisor then
    skips its grace periods) and `_HURRY_S` more. Returns the names that had to be killed."""
    killed: list[str] = []
    for group in groups:
        running = [child for child in group if child.running]
        if not running:
            continue
        if on_group is not None:
            on_group(running)
        for child in running:
            child.remember_descendants()
            child.terminate()
        deadline = time.monotonic() + timeout_s
        hurried = False
        for child in running:
            while not child.wait(max(0.0, deadline - time.monotonic()), hurry):
                if hurry is not None and hurry.is_set() and not hurried:
                    hurried = True
                    for other in running:
                        other.terminate()
                    deadline = min(deadline, time.monotonic() + _HURRY_S)
                    continue
                killed.append(child.name)
                child.kill()
                break
    return killed


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def leftover_processes(
    children: Iterable[ChildProcess], marker: str, also: Iterable[psutil.Process] = ()
) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(ours, others) still alive: `ours` are descendants the demo saw it start (plus `also`);
    `others` are any other process whose command line names `marker` (the demo's data dir)."""
    ours: dict[int, psutil.Process] = {}
    candidates = [*also, *(p for child in children for p in child.known_processes)]
    for process in candidates:
        if _alive(process):
            ours[process.pid] = process
    others: dict[int, psutil.Process] = {}
    # This process and whatever launched it (a shell, `timeout`, a test) name the data dir too.
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents()), *ours}
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if marker in cmdline and process.pid not in skip and _alive(process):
            others[process.pid] = process
    return sorted(ours.values(), key=lambda p: p.pid), sorted(others.values(), key=lambda p: p.pid)


def describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {process.pid}"


def kill_all(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL the given processes (only ever the demo's own descendants)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
            process.wait(timeout=5.0)
