"""`edgebus demo` end to end: center, controller, two real sites onboarded zero-touch, devices.

The demo runs as a real process; what it says in its JSON summary is checked against what the
processes table shows, before and after it stops. Plus its pure parts, without any server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from rich.console import Console

from edgebus.demo import MARKER_FILE, DemoError, claimed_data_dir
from edgebus.devices import reading
from edgebus.fleet_view import FleetSnapshot, ViewContext, fleet_view, per_site
from schemas.controller import Availability, Capacity, Inventory, Load, SiteRecord

EDGEBUS = Path(sys.executable).parent / "edgebus"
# center nats-server, controller, devices, and per site: supervisor, nats-server, agent.
PROCESSES_WITH_TWO_SITES = 3 + 2 * 3


def processes_mentioning(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and (
                proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class ProcessWatch:
    """Counts, in the background, the most processes naming `marker` seen at one time."""

    def __init__(self, marker: str, exclude: int) -> None:
        self.marker = marker
        self.exclude = exclude  # the demo itself
        self.most = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._done.wait(0.5):
            seen = [p for p in processes_mentioning(self.marker) if p.pid != self.exclude]
            self.most = max(self.most, len(seen))


def start_demo(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(EDGEBUS), "demo", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
    )


def finish(demo: subprocess.Popen[str], timeout_s: float) -> str:
    try:
        output, _ = demo.communicate(timeout=timeout_s)
    finally:
        if demo.poll() is None:  # the test failed: never leave the demo (and its tree) behind
            demo.send_signal(signal.SIGTERM)
            demo.communicate(timeout=40)
    return output


@pytest.mark.timeout(90)
def test_demo_runs_two_onboarded_sites_with_readings_and_stops_everything(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "demo"
    summary_path = tmp_path / "summary.json"
    started = time.monotonic()
    demo = start_demo(data_dir, "--duration", "25", "--summary-json", str(summary_path))
    with ProcessWatch(str(data_dir), exclude=demo.pid) as watch:
        output = finish(demo, timeout_s=70)
    print(f"\n{output}\ndemo ran {time.monotonic() - started:.1f}s")

    assert demo.returncode == 0, output
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    assert summary["ok"] and summary["stopped_by"] == "duration", summary
    assert summary["full_table_after_s"] is not None, summary
    for site in ("s001", "s002"):
        state = summary["sites"][site]
        assert state["onboarded"] and state["ever_online"], (site, state)
        assert state["version"] and state["devices"] == 3, (site, state)
        # Both kinds the demo sets for its group (ingest, alarm_rules) are applied.
        assert state["config_sync"] == "in-sync", (site, state)
        assert state["devices_sent"] > 0, (site, state)
        assert state["readings_at_center"] > 0, (site, state)
        # The center never holds more than the devices had acknowledged by the site.
        assert state["readings_at_center"] <= state["devices_sent"], (site, state)
    assert summary["center"]["streams"]["UP_READING"] > 0
    assert summary["center"]["dead_letters"] == 0
    # Real processes ran under the data dir (so the check below is not vacuous) ...
    assert watch.most >= PROCESSES_WITH_TWO_SITES, watch.most
    # ... and none of them outlived the demo.
    assert summary["processes_left"] == []
    assert processes_mentioning(str(data_dir)) == []
    assert "demo stopped; every process it started has exited" in output


@pytest.mark.timeout(90)
def test_a_crashed_controller_stops_the_whole_demo_with_its_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    summary_path = tmp_path / "summary.json"
    demo = start_demo(data_dir, "--summary-json", str(summary_path))  # no duration
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if "Ctrl-C stops it" in line:  # everything has been started
                break
        controllers = [
            p for p in processes_mentioning(str(data_dir)) if "services.controller" in p.cmdline()
        ]
        assert len(controllers) == 1, controllers
        assert controllers[0].ppid() == demo.pid
        controllers[0].kill()
        output = finish(demo, timeout_s=60)
    finally:
        if demo.poll() is None:
            finish(demo, timeout_s=1)

    assert demo.returncode == 1, output
    summary = json.loads(summary_path.read_text())
    assert summary["stopped_by"] == "error"
    assert "controller exited with code -9" in summary["error"]
    assert summary["processes_left"] == []
    assert processes_mentioning(str(data_dir)) == []


# -- pure parts ----------------------------------------------------------------------------


def test_readings_are_counted_per_site_from_the_center_subjects() -> None:
    counts = {
        "up.s001.reading.d01.temp": 5,
        "up.s001.reading.d02.temp": 2,
        "up.s002.reading.d01.humidity": 1,
        "center.alarm.s003": 4,
        "not.an.up.subject": 9,
    }

    assert per_site(counts) == {"s001": 7, "s002": 1, "s003": 4}


def _record(site: str, availability: Availability, devices: int = 0) -> SiteRecord:
    now = datetime.now(UTC)
    inventory = Inventory(
        agent_version="1.2.3",
        capacity=Capacity(cores=2, memory_bytes=1, disk_bytes=1),
        load=Load(cpu_percent=1.0, load1=0.1, memory_used_bytes=1, disk_used_bytes=1),
        device_count=devices,
    )
    return SiteRecord(
        site=site,
        added_at=now,
        availability=availability,
        last_seen=now - timedelta(seconds=3),
        inventory=inventory,
    )


def test_the_fleet_table_shows_each_real_site_and_sums_up_virtual_ones() -> None:
    snapshot = FleetSnapshot(
        records=(
            _record("s001", Availability.ONLINE, devices=3),
            *(_record(f"sim-{n}", Availability.OFFLINE) for n in range(3)),
            _record("sim-9", Availability.ONLINE),
        ),
        readings={"s001": 1234},
        active_alarms={"sim-1": 1},
        streams={"UP_READING": 1234, "DEADLETTER": 2},
    )
    context = ViewContext(
        real_sites=["s001", "s002"],
        now=datetime.now(UTC),
        elapsed_s=9,
        center_url="nats://127.0.0.1:4222",
        devices_sent={"s001": 1240},
        reading_rates={"s001": 6.0},
    )
    console = Console(width=80, record=True)
    console.print(fleet_view(snapshot, context))
    lines = console.export_text().splitlines()

    s001 = next(line for line in lines if line.startswith("s001")).split()
    assert s001 == ["s001", "online", "3s", "1.2.3", "3", "0", "1,240", "1,234", "6", "0"]
    assert next(line for line in lines if line.startswith("s002")).split()[:2] == [
        "s002",
        "not",  # "not added": the controller has no record of it (yet)
    ]
    assert "4 virtual sites (simulator): 1 online, 3 offline; 1 active alarms" in lines
    assert any("dead letters 2" in line for line in lines)
    assert max(len(line) for line in lines) <= 80


def test_a_device_reading_has_a_value_and_a_millisecond_timestamp() -> None:
    import random

    body = reading("temp", 0, 1_700_000_000.5, random.Random(1))

    assert set(body) == {"value", "ts"}
    assert body["ts"] == 1_700_000_000_500
    assert 15 < body["value"] < 27


def test_the_data_dir_of_an_earlier_demo_is_emptied_and_any_other_refused(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier"
    with claimed_data_dir(earlier):
        (earlier / "center").mkdir()
        (earlier / "center" / "store.dat").write_text("old")
    with claimed_data_dir(earlier):
        assert sorted(p.name for p in earlier.iterdir()) == [MARKER_FILE, "demo.lock"]
        with pytest.raises(DemoError, match="another demo"), claimed_data_dir(earlier):
            pass

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not made by the demo"), claimed_data_dir(foreign):
        pass
    assert (foreign / "precious.txt").read_text() == "keep me"
