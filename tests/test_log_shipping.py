"""Log shipping on real servers.

In process: `LogShipper` appends queued records to a real site's replay log (kind "log", key =
level), holds what a full log refuses, and reports drops. End to end: a real agent process
logs while its link to the center is cut; once the link is back, `edgebus logs` (the installed
command) shows those records with the time they were logged, and filters by level.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest

from bus import log as buslog
from bus.client import Bus
from bus.config import NatsConfig
from bus.log import get_logger
from bus.natsserver import NatsServerProcess
from bus.replaylog import STREAM, ReplayLog
from bus.streams import (
    ReplayFullPolicy,
    StreamSpec,
    dead_letter_stream,
    ensure_stream,
    ensure_uplink_streams,
    site_replay_stream,
)
from bus.testing import EdgeTopology
from edge_agent.logship import LogShipper, ShipTuning
from edge_agent.logship.queue import SHIPPER_COMPONENT
from edgebus.logs import CaughtUp, LogQuery, ShippedLog, read_logs
from schemas import REGISTRY
from schemas.logs import LogConfig, LogLevel, LogRecord
from tests.siterig import AgentProcess, observer, wait_agent_up, wait_until

pytestmark = pytest.mark.timeout(90)

SITE = "s1"
EDGEBUS = Path(sys.executable).parent / "edgebus"


@pytest.fixture
def logging_state() -> Iterator[None]:
    get_logger("tests")
    printed, taps = buslog._levels.printed, buslog._levels.taps
    yield
    buslog._levels.printed, buslog._levels.taps = printed, taps


# -- in process: the shipper against a real site server --------------------------------------


@dataclass
class Shipping:
    bus: Bus
    shipper: LogShipper
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def has_entries(self) -> bool:
        return bool((await self.bus.js.stream_info(STREAM)).state.messages)

    async def logged_upto(self) -> tuple[list[tuple[str, LogRecord]], int]:
        """The log entries in the replay log, and the last stream sequence they go up to."""
        state = (await self.bus.js.stream_info(STREAM)).state
        if not state.messages:
            return [], state.last_seq
        out = []
        for seq in range(state.first_seq, state.last_seq + 1):
            raw = await self.bus.js.get_msg(STREAM, seq=seq)
            record = REGISTRY.decode_as(raw.data or b"", LogRecord).data
            # This process's other warnings (a connection hiccup) would be shipped too.
            if record.logger.startswith("tests.") or record.logger == SHIPPER_COMPONENT:
                out.append((raw.subject or "", record))
        return out, state.last_seq

    async def logged(self) -> list[tuple[str, LogRecord]]:
        """(subject, record) of every log entry in the replay log, in order."""
        return (await self.logged_upto())[0]


async def start_shipping(
    edge_topology: EdgeTopology, spec: StreamSpec, tuning: ShipTuning
) -> Shipping:
    await asyncio.to_thread(edge_topology.add_site, SITE, mqtt=False)
    bus = await Bus.connect(
        NatsConfig.from_url(edge_topology.site(SITE).url, name="logship"),
        scope=SITE,
        source=f"/sites/{SITE}",
    )
    replay_log = ReplayLog(bus.nc, SITE, spec, batch_size=100, ack_wait_s=5)
    await replay_log.declare()
    shipper = LogShipper(bus, replay_log, SITE, ship_level="warning", tuning=tuning)
    stop = asyncio.Event()
    task = asyncio.create_task(shipper.run(stop))
    await asyncio.sleep(0.05)  # let it install its tap
    return Shipping(bus, shipper, stop, task)


@pytest.fixture
async def roomy(edge_topology: EdgeTopology, logging_state: None) -> AsyncIterator[Shipping]:
    spec = site_replay_stream(
        SITE, max_bytes=1024**2, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
    )
    s = await start_shipping(edge_topology, spec, ShipTuning(capacity=5))
    yield s
    s.stop.set()
    await asyncio.wait_for(s.task, 10)
    await s.bus.close()


async def wait_logged(s: Shipping, count: int) -> list[tuple[str, LogRecord]]:
    async def enough() -> bool:
        return len(await s.logged()) >= count

    await wait_until(enough, 10, lambda: f"fewer than {count} records in the replay log")
    return await s.logged()


async def test_records_at_the_ship_level_land_in_the_replay_log_by_level(roomy: Shipping) -> None:
    log = get_logger("tests.shipping", device="pump-1")
    before = datetime.now(UTC)
    log.info("too_low")
    log.warning("overheat", celsius=82)
    log.error("pump_failed")
    entries = await wait_logged(roomy, 2)
    assert [(subject, r.message) for subject, r in entries] == [
        (f"replay.{SITE}.log.warning", "overheat"),
        (f"replay.{SITE}.log.error", "pump_failed"),
    ]
    warning = entries[0][1]
    assert warning.fields == {"celsius": 82} and warning.device == "pump-1"
    assert before <= warning.timestamp <= datetime.now(UTC)

    # Config `log` changes the ship level live: info goes out now, and the printed level too.
    roomy.shipper.apply_config(LogConfig(level="error", ship_level="info"))
    assert buslog._levels.printed == 40
    log.info("now_shipped")
    entries = await wait_logged(roomy, 3)
    assert entries[-1] == (f"replay.{SITE}.log.info", entries[-1][1])
    assert entries[-1][1].message == "now_shipped"
    assert roomy.shipper.stats().shipped == 3


async def test_a_burst_beyond_the_queue_is_dropped_and_reported(roomy: Shipping) -> None:
    log = get_logger("tests.burst")
    for n in range(20):  # no await in between: the shipper cannot drain the queue meanwhile
        log.warning("burst", n=n)
    entries = await wait_logged(roomy, 6)
    records = [r for _, r in entries]
    assert [r.fields.get("n") for r in records[:5]] == [0, 1, 2, 3, 4]
    summary = records[5]
    assert summary.message == "15 records dropped" and summary.level is LogLevel.WARNING
    stats = roomy.shipper.stats()
    assert (stats.shipped, stats.dropped, stats.summaries) == (6, 15, 1)


async def test_records_a_full_log_refuses_are_held_and_go_in_order_later(
    edge_topology: EdgeTopology, logging_state: None
) -> None:
    spec = site_replay_stream(
        SITE, max_bytes=4 * 1024, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
    )
    s = await start_shipping(edge_topology, spec, ShipTuning(retry_min_s=0.1, retry_max_s=0.2))
    try:
        log = get_logger("tests.full")
        for n in range(12):  # ~600 bytes each: more than the 4 KiB log holds
            log.warning("filling", n=n, pad="x" * 200)
        await wait_until(lambda: s.shipper.stats().held > 0, 10, "nothing held")
        seen: list[Any] = []
        for _ in range(12):  # move out what the log holds, as the forwarder would, until done
            entries, last_seq = await s.logged_upto()
            assert 0 < len(entries) < 12
            seen += [r.fields["n"] for _, r in entries]
            await s.bus.js.purge_stream(STREAM, seq=last_seq + 1)
            if len(seen) == 12:
                break
            await wait_until(s.has_entries, 10, "the held records never went in")
        assert seen == list(range(12))  # none lost, in the order they were logged
        assert s.shipper.stats().held == 0 and s.shipper.stats().refused > 0
    finally:
        s.stop.set()
        await asyncio.wait_for(s.task, 10)
        await s.bus.close()


# -- end to end: a real agent, a cut link, the real command ------------------------------------


MS = timedelta(milliseconds=1)
FAST = ("--ack-wait-s", "2", "--publish-timeout-s", "0.5", "--backoff-max-s", "0.5")


def printed_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines an agent printed (its log file)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def edgebus_logs(hub_url: str, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(EDGEBUS), "logs", "--server", hub_url, "--site", SITE, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


async def test_records_logged_offline_reach_the_center_with_their_own_time(
    edge_topology: EdgeTopology, tmp_path: Path
) -> None:
    hub = await nats.connect(edge_topology.hub.url)
    hub_js = hub.jetstream()
    await ensure_uplink_streams(hub_js)
    site = await asyncio.to_thread(edge_topology.add_site, SITE)
    local = await observer(site.url, SITE)
    agent = AgentProcess(
        SITE,
        site.url,
        tmp_path / "agent",
        *FAST,
        "--log-level",
        "info",
        "--log-ship-level",
        "warning",
    )
    try:
        await agent.start()
        await wait_agent_up(local, agent)

        await asyncio.to_thread(edge_topology.cut_link, SITE)
        cut_at = datetime.now(UTC)
        at_cut = (await hub_js.stream_info("UP_LOG")).state.messages
        # A device message that is not JSON is dead-lettered with a warning; with the site's
        # dead-letter stream gone, storing it fails too, and the agent logs an error.
        await local.js.delete_stream("DEADLETTER")
        await local.js.publish("dev.s1.d1.temp", b"not json")

        async def both_logged() -> bool:
            info = await local.js.stream_info(STREAM, subjects_filter=f"replay.{SITE}.log.>")
            held = info.state.subjects or {}
            return bool(held.get(f"replay.{SITE}.log.warning")) and bool(
                held.get(f"replay.{SITE}.log.error")
            )

        await wait_until(
            both_logged, 20, lambda: f"no records in the replay log\n{agent.log_tail()}"
        )
        await ensure_stream(local.js, dead_letter_stream(SITE))  # the redelivery now settles
        await asyncio.sleep(1.0)  # offline a little longer: logged and stored times differ
        assert (await hub_js.stream_info("UP_LOG")).state.messages == at_cut  # still offline
        restored_at = datetime.now(UTC)
        await asyncio.to_thread(edge_topology.restore_link, SITE)

        async def at_center() -> bool:
            info = await hub_js.stream_info("UP_LOG", subjects_filter=f"up.{SITE}.log.error")
            return bool(info.state.subjects)

        await wait_until(at_center, 30, lambda: f"no error at the center\n{agent.log_tail()}")

        every = await asyncio.to_thread(edgebus_logs, edge_topology.hub.url, "--since", "10m")
        levels = {line["level"] for line in every}
        assert levels <= {"warning", "error", "critical"}, levels  # ship level warning
        dead = [line for line in every if line["message"] == "dead_letter"]
        assert dead, every
        first = dead[0]
        assert first["logger"] == "bus.deadletter" and first["level"] == "warning"
        assert first["fields"]["reason"] == "malformed" and first["site"] == SITE
        logged_at = datetime.fromisoformat(first["time"])
        stored_at = datetime.fromisoformat(first["stored_at"])
        # Its own time, not its arrival (printed times are cut to milliseconds).
        assert cut_at - MS <= logged_at <= restored_at <= stored_at + MS

        errors = await asyncio.to_thread(
            edgebus_logs, edge_topology.hub.url, "--since", "10m", "--level", "error"
        )
        assert errors and {line["level"] for line in errors} <= {"error", "critical"}
        assert "dead_letter_store_failed" in {line["message"] for line in errors}
        assert len(errors) < len(every)

        # Info records were logged (and printed) but never shipped.
        printed = printed_records(agent.log_path)
        assert any(line.get("level") == "info" for line in printed)
        hub_info = await hub_js.stream_info("UP_LOG", subjects_filter=f"up.{SITE}.log.info")
        assert not hub_info.state.subjects
        # The command leaves no consumer behind.
        assert (await hub_js.stream_info("UP_LOG")).state.consumer_count == 0
    finally:
        await agent.stop()
        await local.close()
        await hub.close()


async def test_follow_prints_the_backlog_then_each_record_as_it_arrives(
    hub: NatsServerProcess,
) -> None:
    """`edgebus logs --follow`: the stored records, `CaughtUp`, then new ones live."""
    bus = await Bus.connect(NatsConfig.from_url(hub.url, name="logs-follow"), scope="center")
    try:
        await ensure_uplink_streams(bus.js)

        async def ship(message: str, level: LogLevel = LogLevel.WARNING) -> None:
            record = LogRecord(
                site=SITE, level=level, logger="test", message=message, timestamp=datetime.now(UTC)
            )
            await bus.publish_js(f"up.{SITE}.log.{level.value}", bus.event(record))

        await ship("before")
        await ship("too quiet", LogLevel.INFO)  # below the asked level: never shown
        query = LogQuery(since=datetime.now(UTC) - timedelta(minutes=1), level="warning")
        items = read_logs(bus.js, query, follow=True)
        try:
            first = await asyncio.wait_for(anext(items), 10)
            assert isinstance(first, ShippedLog) and first.record.message == "before"
            assert isinstance(await asyncio.wait_for(anext(items), 10), CaughtUp)
            await ship("live")
            live = await asyncio.wait_for(anext(items), 10)
            assert isinstance(live, ShippedLog) and live.record.message == "live"
        finally:
            await items.aclose()
        assert (await bus.js.consumers_info("UP_LOG")) == []  # its consumer went with it
    finally:
        await bus.close()
