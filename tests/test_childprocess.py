"""`bus.childprocess.ChildServer`, the lifecycle nats-server and mosquitto share, with a small
Python program as the server: ready, stopped, crashed, never ready, and left over at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bus.childprocess import ChildServer


class PretendServerError(RuntimeError):
    pass


class PretendServer(ChildServer):
    """Runs `script` (with its config file as argv[1]); ready once `ready_file` exists."""

    error = PretendServerError

    def __init__(self, workdir: Path, script: str) -> None:
        super().__init__(workdir, "pretend")
        self.script = script
        self.ready_file = workdir / "ready"

    def _command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.config_path)]

    def _config_text(self) -> str:
        return f"ready_file={self.ready_file}\n"

    def _is_ready(self) -> bool:
        return self.ready_file.exists()


SERVES = textwrap.dedent(
    """
    import pathlib, sys, time
    ready = pathlib.Path(open(sys.argv[1]).read().strip().split("=", 1)[1])
    print("serving", flush=True)
    ready.touch()
    time.sleep(60)
    """
)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers signal 0 until reaped; its state says it is dead.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(") ")[-1].startswith("Z")


def test_start_waits_until_ready_and_stop_ends_the_process(tmp_path: Path) -> None:
    with PretendServer(tmp_path, SERVES) as server:
        assert server.running and server.ready_file.exists()
        pid = server.pid
        assert pid is not None
        with pytest.raises(PretendServerError, match="already running"):
            server.start()
        assert "ready_file=" in server.config_path.read_text()
        assert "serving" in server.log_text()
    assert not server.running and server.pid is None
    assert gone(pid)


def test_a_killed_server_is_reaped_and_starts_again(tmp_path: Path) -> None:
    server = PretendServer(tmp_path, SERVES)
    server.start()
    try:
        first = server.pid
        assert first is not None
        os.kill(first, 9)  # it dies on its own, as in a crash
        deadline = time.monotonic() + 5
        while server.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.returncode == -9 and not server.running
        server.ready_file.unlink()
        server.start()
        assert server.running and server.pid != first
    finally:
        server.stop()


def test_a_server_that_exits_during_start_fails_with_its_log(tmp_path: Path) -> None:
    server = PretendServer(tmp_path, "import sys; print('bad config line 3'); sys.exit(4)")
    with pytest.raises(PretendServerError, match=r"exited with code 4(.|\n)*bad config line 3"):
        server.start()
    assert server.pid is None


def test_a_server_never_ready_is_killed_at_the_timeout(tmp_path: Path) -> None:
    server = PretendServer(tmp_path, "import time; time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(PretendServerError, match=r"not ready after 0\.3s"):
        server.start(timeout=0.3)
    assert time.monotonic() - started < 5
    assert server.pid is None and not server.running


def test_servers_left_running_are_killed_when_the_interpreter_exits(tmp_path: Path) -> None:
    program = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {os.getcwd()!r}]
        from test_childprocess import PretendServer, SERVES
        server = PretendServer(Path({str(tmp_path)!r}), SERVES)
        server.start()
        print(server.pid, flush=True)
        """
    )  # exits without stop()
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 5
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(pid)
