"""A server run as a child process (nats-server, mosquitto): launched in its own session, ready
once it answers, stopped in order, and killed at interpreter exit if still running. Stdlib only.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = ["ChildServer"]

_POLL_INTERVAL = 0.02


class ChildServer(ABC):
    """One server child process, restartable with the same ports and data.

    A subclass says how to launch it (`_command`, `_config_text`) and when it is ready
    (`_is_ready`); `error` is the exception it raises when it cannot start."""

    error: ClassVar[type[RuntimeError]] = RuntimeError

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self._proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def _command(self) -> list[str]:
        """The argv that starts the server with `config_path`."""

    @abstractmethod
    def _config_text(self) -> str:
        """The config file written to `config_path` before each start."""

    @abstractmethod
    def _is_ready(self) -> bool:
        """Whether the running server answers as it should (polled during `start`)."""

    def _prepare(self) -> None:
        """Directories the server needs before it starts."""
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Launch the server and return once it is ready (`error` if it exits or times out)."""
        if self.running:
            raise self.error(f"{self.name} is already running (pid {self.pid})")
        self._reap_exited()
        self._prepare()
        self.config_path.write_text(self._config_text(), encoding="utf-8")
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C aimed at the test runner must not reach the
                # servers before we stop them in order.
                start_new_session=True,
            )
        _register(proc)
        self._proc = proc
        try:
            self._wait_ready(proc, timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (the server shuts down, saving what it keeps), then SIGKILL after
        `timeout`; always reaps. No-op when not running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _unregister(proc)

    def kill(self) -> None:
        """SIGKILL without any shutdown (simulates a crash or power loss)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        _unregister(proc)

    def restart(self, timeout: float = 10.0) -> None:
        """Graceful stop, then start again with the same ports and data."""
        self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _reap_exited(self) -> None:
        """Forget a process that died on its own (a crash), so it is not left a zombie."""
        if self._proc is not None and self._proc.poll() is not None:
            _unregister(self._proc)
            self._proc = None

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise self.error(
                    f"{self.name} exited with code {proc.returncode} during start\n"
                    f"{self.log_tail()}"
                )
            if self._is_ready():
                return
            if time.monotonic() >= deadline:
                raise self.error(f"{self.name} not ready after {timeout:.1f}s\n{self.log_tail()}")
            time.sleep(_POLL_INTERVAL)

    # -- inspection ----------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of a process that died on its own; None while running or after stop()."""
        return self._proc.poll() if self._proc is not None else None


# Every process we launched and have not reaped yet, so an interpreter exit (a crashed test
# run, Ctrl-C) never leaves servers holding ports and data directories.
_live_processes: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()


def _register(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live_processes[proc.pid] = proc


def _unregister(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live_processes.pop(proc.pid, None)


@atexit.register
def _kill_leftover_processes() -> None:
    with _live_lock:
        leftovers = list(_live_processes.values())
        _live_processes.clear()
    for proc in leftovers:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)
