"""The `edgebus` command: the installed console script run as a real process.

The `schemas` sub-commands need no process boundary to be meaningful and run in-process
through typer's CliRunner (fast); everything touching servers or processes runs the script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import nats
import psutil
import pytest
from typer.testing import CliRunner

from bus.natsserver import NatsServerProcess, free_port
from bus.streams import dead_letter_stream, ensure_stream
from edgebus.cli import app
from schemas import REGISTRY

pytestmark = pytest.mark.timeout(60)

EDGEBUS = Path(sys.executable).parent / "edgebus"


def run_edgebus(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEBUS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def processes_mentioning(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if marker in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_version_prints_the_installed_package_version() -> None:
    result = run_edgebus("--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"edgebus {version('edgebus')}"


def test_schemas_list_json_contains_every_registered_type() -> None:
    result = CliRunner().invoke(app, ["schemas", "list", "--json"])

    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {
        "type": "edgebus.device.reading",
        "version": 1,
        "dataschema": "urn:edgebus:edgebus.device.reading:v1",
    } in rows
    assert rows == sorted(rows, key=lambda r: (r["type"], r["version"]))
    assert len(rows) == len(list(REGISTRY.specs()))


def test_schemas_list_plain_is_one_line_per_version() -> None:
    result = CliRunner().invoke(app, ["schemas", "list"])

    assert result.exit_code == 0, result.output
    line = next(li for li in result.stdout.splitlines() if "edgebus.device.reading" in li)
    assert line.split() == [
        "edgebus.device.reading",
        "v1",
        "urn:edgebus:edgebus.device.reading:v1",
    ]


def test_schemas_export_writes_one_json_schema_file_per_version(tmp_path: Path) -> None:
    target = tmp_path / "out" / "schemas"

    result = CliRunner().invoke(app, ["schemas", "export", str(target)])

    assert result.exit_code == 0, result.output
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert sorted(printed) == sorted(target.iterdir())
    reading = target / "edgebus.device.reading.v1.schema.json"
    assert reading in printed
    schema = json.loads(reading.read_text())
    assert schema["$id"] == "urn:edgebus:edgebus.device.reading:v1"
    assert "data" in schema["required"]


async def test_status_json_against_a_real_hub_shows_domain_and_streams(
    hub: NatsServerProcess,
) -> None:
    nc = await nats.connect(hub.url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        await ensure_stream(js, dead_letter_stream("center"))
        await js.publish("dlq.center.test.malformed", b"bad")
    finally:
        await nc.close()

    result = run_edgebus("status", "--json", "--server", hub.url)

    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["jetstream"]["domain"] == "hub"
    assert status["server"]["name"] == "hub"
    assert status["server"]["jetstream"] is True
    assert status["server"]["url"] == hub.url
    assert status["dead_letters"] == 1
    [stream] = [s for s in status["streams"] if s["name"] == "DEADLETTER"]
    assert stream["subjects"] == ["dlq.center.>"]
    assert stream["messages"] == 1


def test_status_table_against_a_real_hub_names_the_domain(hub: NatsServerProcess) -> None:
    result = run_edgebus("status", "--server", hub.url)

    assert result.returncode == 0, result.stderr
    words = " ".join(result.stdout.split())  # rich wraps the title to the table's width
    assert "edgebus center hub" in words
    assert "JetStream domain hub" in words


def test_status_against_a_dead_port_exits_nonzero_with_a_clear_message() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()

    result = run_edgebus("status", "--json", "--server", url)

    assert result.returncode == 2
    assert "cannot reach the center" in result.stdout
    assert url in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not result.stdout.lstrip().startswith("{")  # no half-made JSON document
    assert time.monotonic() - started < 15  # bounded by the 5 s connect timeout


def test_demo_with_duration_exits_zero_and_stops_its_nats_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"

    result = run_edgebus("demo", "--duration", "1", "--data-dir", str(data_dir), timeout=45)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo stopped" in result.stdout
    # It really ran a server there (so the check below is not vacuous) ...
    assert (data_dir / "center" / "center.conf").is_file()
    assert "Server is ready" in (data_dir / "center" / "center.log").read_text()
    # ... and nothing started with that data dir is left running.
    assert processes_mentioning(str(data_dir)) == []


def test_demo_stops_its_nats_server_on_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-sigint"
    demo = subprocess.Popen(
        [str(EDGEBUS), "demo", "--data-dir", str(data_dir)],  # no duration: runs until Ctrl-C
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        deadline = time.monotonic() + 30
        servers: list[psutil.Process] = []
        while not servers and time.monotonic() < deadline and demo.poll() is None:
            servers = [p for p in processes_mentioning(str(data_dir)) if "nats-server" in p.name()]
            time.sleep(0.05)
        assert servers, "the demo never started its nats-server"
        assert servers[0].ppid() == demo.pid
        # The signal handler is installed once the session is up; the demo says so.
        assert demo.stdout is not None
        for line in demo.stdout:
            if "Ctrl-C stops it" in line:
                break

        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    assert demo.returncode == 0, output
    assert "demo stopped" in output
    assert not servers[0].is_running() or servers[0].status() == psutil.STATUS_ZOMBIE
    assert processes_mentioning(str(data_dir)) == []
