"""LocalAlarms on a real site server: idempotent raise/clear, local publish, replay-log entries.

A change the full log refuses waits and goes out, in order, once there is room.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.deadletter import DeadLetterNotice
from bus.replaylog import STREAM, AppendStatus, LogEntry, ReplayLog
from bus.streams import ReplayFullPolicy, StreamSpec, site_replay_stream
from bus.testing import EdgeTopology
from edge_agent.alarms import LocalAlarms
from edge_agent.alarms.deadletters import ENTITY as DL_ENTITY
from edge_agent.alarms.deadletters import OWNER as DL_OWNER
from edge_agent.alarms.deadletters import DeadLetterAlarms
from edge_agent.alarms.local import replay_key
from edge_agent.alarms.store import ActiveAlarmStore
from schemas import REGISTRY, new_event
from schemas.alarms import AlarmCleared, AlarmRaised, Severity
from schemas.devices import DeviceReading

SITE = "s1"


@dataclass
class Setup:
    bus: Bus
    log: ReplayLog
    alarms: LocalAlarms
    local: list[bytes]


async def setup(edge_topology: EdgeTopology, spec: StreamSpec) -> Setup:
    await asyncio.to_thread(edge_topology.add_site, SITE, mqtt=False)
    bus = await Bus.connect(
        NatsConfig.from_url(edge_topology.site(SITE).url, name="alarms"),
        scope=SITE,
        source=f"/sites/{SITE}",
    )
    log = ReplayLog(bus.nc, SITE, spec, batch_size=100, ack_wait_s=5)
    await log.declare()
    local: list[bytes] = []

    async def on_alarm(msg: Msg) -> None:
        local.append(msg.data)

    await bus.nc.subscribe(subjects.site_event(SITE, "alarm"), cb=on_alarm)
    return Setup(bus, log, LocalAlarms(bus, log, SITE), local)


@pytest.fixture
async def roomy(edge_topology: EdgeTopology) -> AsyncIterator[Setup]:
    spec = site_replay_stream(
        SITE, max_bytes=1024**2, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
    )
    s = await setup(edge_topology, spec)
    yield s
    await s.bus.close()


@pytest.fixture
async def tiny(edge_topology: EdgeTopology) -> AsyncIterator[Setup]:
    spec = site_replay_stream(
        SITE, max_bytes=8 * 1024, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
    )
    s = await setup(edge_topology, spec)
    yield s
    await s.bus.close()


async def logged(s: Setup) -> list[tuple[str, bytes]]:
    js = s.bus.js
    state = (await js.stream_info(STREAM)).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1):
        raw = await js.get_msg(STREAM, seq=seq)
        out.append((raw.subject or "", raw.data or b""))
    return out


async def wait_local(s: Setup, count: int) -> None:
    for _ in range(100):
        if len(s.local) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(s.local)} local alarm events, wanted {count}")


async def test_raise_and_clear_are_idempotent_published_and_logged(roomy: Setup) -> None:
    alarms = roomy.alarms
    assert await alarms.raise_("pump-1", "overheat", Severity.MAJOR, "82 C")
    assert not await alarms.raise_("pump-1", "overheat", Severity.CRITICAL, "90 C")
    assert [a.alarm_id for a in alarms.active()] == [f"{SITE}/pump-1/overheat"]
    assert not await alarms.clear("pump-1", "low-flow")  # never raised
    assert await alarms.clear("pump-1", "overheat", "back to 60 C")
    assert not await alarms.clear("pump-1", "overheat")
    assert alarms.active() == [] and alarms.pending == 0

    await wait_local(roomy, 2)
    await asyncio.sleep(0.1)
    assert len(roomy.local) == 2  # one raise, one clear: repeats published nothing
    raised = REGISTRY.decode_as(roomy.local[0], AlarmRaised)
    cleared = REGISTRY.decode_as(roomy.local[1], AlarmCleared)
    assert (raised.data.severity, raised.data.text) == (Severity.MAJOR, "82 C")
    assert cleared.data.text == "back to 60 C"

    entries = await logged(roomy)
    assert [subject for subject, _ in entries] == [f"replay.{SITE}.alarm.pump-1"] * 2
    in_log = REGISTRY.decode_as(entries[0][1], AlarmRaised)
    assert in_log.id == raised.id and in_log.data.raised_at == raised.data.raised_at
    assert REGISTRY.decode_as(entries[1][1], AlarmCleared).id == cleared.id


async def test_entity_that_is_not_a_subject_token_still_logs(roomy: Setup) -> None:
    assert replay_key("dev.7:temp/1") == "dev_7_temp_1"
    assert await roomy.alarms.raise_("dev.7:temp/1", "stale", Severity.WARNING, "no data")
    assert [s for s, _ in await logged(roomy)] == [f"replay.{SITE}.alarm.dev_7_temp_1"]


async def test_refused_changes_wait_and_go_in_order_once_there_is_room(tiny: Setup) -> None:
    refused = 0
    for n in range(100):  # fill the log until it refuses
        data = DeviceReading(site=SITE, device="d0", channel="t", payload={"n": n})
        entry = LogEntry("reading", "d0", new_event(data, source=f"/sites/{SITE}"))
        if (await tiny.log.append(entry)).status is AppendStatus.REFUSED:
            refused += 1
            break
    assert refused == 1

    alarms = tiny.alarms
    assert await alarms.raise_("replay-log", "full", Severity.CRITICAL, "log full")
    assert await alarms.clear("replay-log", "full")
    assert alarms.pending == 2  # both refused by the log, kept in order
    await wait_local(tiny, 2)  # local subscribers got them at once regardless
    assert await alarms.flush_pending() == 2  # still no room

    await tiny.bus.js.purge_stream(STREAM)  # as if the forwarder had moved everything out
    assert await alarms.flush_pending() == 0
    entries = await logged(tiny)
    assert [s for s, _ in entries] == [f"replay.{SITE}.alarm.replay-log"] * 2
    assert REGISTRY.decode_as(entries[0][1], AlarmRaised).data.probable_cause == "full"
    REGISTRY.decode_as(entries[1][1], AlarmCleared)


async def test_pending_list_is_bounded(edge_topology: EdgeTopology) -> None:
    spec = site_replay_stream(
        SITE, max_bytes=1024, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
    )
    s = await setup(edge_topology, spec)
    try:
        alarms = LocalAlarms(s.bus, s.log, SITE, max_pending=3)
        for i in range(5):  # each alarm is bigger than the whole log: all refused
            await alarms.raise_(f"e{i}", "cause", Severity.MINOR, "x" * 1500)
        assert (alarms.pending, alarms.lost) == (3, 2)
        assert len(alarms.active()) == 5
    finally:
        await s.bus.close()


async def test_a_restarted_agent_remembers_its_active_alarms_and_still_clears_them(
    roomy: Setup, tmp_path: Path
) -> None:
    store = ActiveAlarmStore(tmp_path / "alarms")
    before = LocalAlarms(roomy.bus, roomy.log, SITE, store=store)
    assert await before.raise_("pump-1", "overheat", Severity.CRITICAL, "95 C", owner="rules")
    assert await before.raise_("pump-2", "overheat", Severity.MAJOR, "85 C")
    assert await before.clear("pump-2", "overheat", "70 C")
    raised_id = before._raised["s1/pump-1/overheat"].event.id

    after = LocalAlarms(roomy.bus, roomy.log, SITE, store=store)  # as a restarted agent
    assert [a.alarm_id for a in after.active()] == ["s1/pump-1/overheat"]
    assert after.is_active("pump-1", "overheat") and not after.is_active("pump-2", "overheat")
    assert [a.alarm_id for a in after.owned_by("rules")] == ["s1/pump-1/overheat"]
    assert after._raised["s1/pump-1/overheat"].event.id == raised_id  # re-sent: one event
    assert not await after.raise_("pump-1", "overheat", Severity.CRITICAL, "96 C")  # idempotent
    assert await after.clear("pump-1", "overheat", "back to 60 C")  # its clear still goes out
    _, last = (await logged(roomy))[-1]
    cleared = REGISTRY.decode(last).data
    assert isinstance(cleared, AlarmCleared) and cleared.alarm_id == "s1/pump-1/overheat"
    assert LocalAlarms(roomy.bus, roomy.log, SITE, store=store).active() == []


async def test_dead_letters_raise_one_alarm_per_reason_cleared_when_quiet(roomy: Setup) -> None:
    sink = roomy.bus.dead_letters

    def broken(notice: DeadLetterNotice) -> None:
        raise RuntimeError("a listener with a bug")

    sink.add_listener(broken)  # logged, and the others are still told
    alarms = DeadLetterAlarms(roomy.alarms, quiet_s=0.3)
    sink.add_listener(alarms.on_dead_letter)
    for n in range(3):
        await sink.record(
            component="ingest", subject=f"dev.s1.d{n}.t", data=b"{", reason="malformed", detail="x"
        )
    await sink.record(
        component="config-sync",
        subject="down.s1.config",
        data=b"{}",
        reason="unsupported_version",
        detail="v99 is newer than v1",
    )
    assert sink.counts == {"malformed": 3, "unsupported_version": 1}  # all stored and counted
    await alarms.settle()
    raised = {a.probable_cause: a for a in roomy.alarms.active()}
    assert set(raised) == {"malformed", "unsupported_version"}
    assert raised["unsupported_version"].severity is Severity.MAJOR
    assert raised["malformed"].severity is Severity.WARNING
    assert raised["malformed"].text == "ingest dead-lettered dev.s1.d0.t: x"  # the first one

    await asyncio.sleep(0.35)
    await alarms.settle()
    assert roomy.alarms.active() == []
    _, last = (await logged(roomy))[-2]
    cleared = REGISTRY.decode(last).data
    assert isinstance(cleared, AlarmCleared) and "3 dead letter(s)" in cleared.text

    # Raised before a restart: the new agent clears it after a quiet while too.
    await roomy.alarms.raise_(DL_ENTITY, "malformed", Severity.WARNING, "old", owner=DL_OWNER)
    restarted = DeadLetterAlarms(roomy.alarms, quiet_s=0.2)
    await asyncio.sleep(0.25)
    await restarted.settle()
    assert roomy.alarms.active() == []
