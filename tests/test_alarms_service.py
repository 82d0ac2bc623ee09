"""The alarms service on real servers: a real site (agent process, MQTT device) raising and
clearing while its link is cut; a flapping storm; restarts and a second replica; bad input;
the `edgebus alarms` commands and the site health of `sites list`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from bus import subjects
from bus.client import MSG_ID_HEADER, Bus
from bus.config import NatsConfig
from bus.deadletter import HEADER_PREFIX
from bus.streams import ensure_uplink_streams
from bus.testing import EdgeTopology
from edgebus.sites import site_health
from schemas import REGISTRY, Event
from schemas.alarms import (
    AlarmAck,
    AlarmAckReply,
    AlarmCleared,
    AlarmHistory,
    AlarmHistoryQuery,
    AlarmNotice,
    AlarmRaised,
    AlarmRecord,
    AlarmRulesConfig,
    AlarmsList,
    AlarmsQuery,
    AlarmsStats,
    AlarmsSummary,
    AlarmsSummaryQuery,
    AlarmState,
    HistoryKind,
    NoticeKind,
    Severity,
    SiteHealth,
    ThresholdRule,
    alarm_id,
)
from schemas.envelope import EventData
from services.alarms.config import AlarmsConfig
from services.alarms.service import AlarmsService
from services.alarms.state import FlapPolicy
from services.alarms.storm import StormPolicy
from tests.siterig import AgentProcess, Fleet, observer, wait_agent_up, wait_until

pytestmark = pytest.mark.timeout(90)

EDGEBUS = Path(sys.executable).parent / "edgebus"
FAST_AGENT = ("--ack-wait-s", "2", "--publish-timeout-s", "0.5", "--backoff-max-s", "0.5")


def fast_config(replica: str, **overrides: Any) -> AlarmsConfig:
    values: dict[str, Any] = {
        "replica_id": replica,
        "lease_ttl_s": 2.0,
        "flush_every_s": 0.05,
        "busy_flush_every_s": 0.2,
        "tick_s": 0.1,
        "ack_wait_s": 5.0,
        "flap": FlapPolicy(window_s=60, threshold=6, quiet_s=600),
        "storm": StormPolicy(site_rate_per_s=2, site_burst=10, summary_every_s=0.5),
    }
    return AlarmsConfig(**{**values, **overrides})


@dataclass
class Replica:
    service: AlarmsService
    stop: asyncio.Event
    task: asyncio.Task[None]
    bus: Bus

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)
        await self.bus.close()


@dataclass
class Center:
    url: str
    bus: Bus  # the operator's (and the forwarders' stand-in) connection
    replicas: list[Replica] = field(default_factory=list)

    async def start_replica(self, name: str, **overrides: Any) -> Replica:
        bus = await Bus.connect(NatsConfig.from_url(self.url, name=name), source="/center/alarms")
        service = AlarmsService(bus, fast_config(name, **overrides))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.started.wait(), 20)
        replica = Replica(service, stop, task, bus)
        self.replicas.append(replica)
        return replica

    async def ask(self, op: str, data: EventData, reply: type[Any], timeout: float = 20) -> Any:
        answer = await self.bus.request(subjects.alarms_control(op), data, reply, timeout=timeout)
        return answer.data

    async def alarms(self, **query: Any) -> list[AlarmRecord]:
        listed: AlarmsList = await self.ask("list", AlarmsQuery(**query), AlarmsList)
        return listed.alarms

    async def history(self, **query: Any) -> AlarmHistory:
        query.setdefault("since", datetime.now(UTC) - timedelta(hours=1))
        history: AlarmHistory = await self.ask("history", AlarmHistoryQuery(**query), AlarmHistory)
        return history

    async def leader_stats(self, *, settled: bool = False) -> AlarmsStats | None:
        """The leader's counters; None if no replica leads (or, with `settled`, if the
        leader still has consumed changes not yet stored)."""
        for replica in self.replicas:
            service = replica.service
            if service.is_leader and service.processor is not None:
                if settled and not service.processor.settled:
                    return None
                return AlarmsStats(
                    replica=service.config.replica_id,
                    leader=True,
                    records=len(service.processor.table),
                    counters=service.counters(),
                    at=datetime.now(UTC),
                )
        return None

    async def wait_applied(self, count: int, timeout: float = 30) -> None:
        """Until the leading replica has consumed `count` messages (this term and before)
        and stored what they changed (so queries see it)."""

        async def done() -> bool:
            stats = await self.leader_stats(settled=True)
            return stats is not None and stats.counters.get("consumed", 0) >= count

        async def progress() -> str:
            return f"consumed {(await self.leader_stats())!r}, wanted {count}"

        try:
            await wait_until(done, timeout, "alarm changes consumed")
        except AssertionError:
            raise AssertionError(await progress()) from None

    async def send(self, site: str, data: AlarmRaised | AlarmCleared, key: str = "x") -> str:
        """What a site's forwarder does: the event into `up.<site>.alarm.<key>`, id-deduplicated."""
        event = self.bus.event(data, subject=data.alarm_id)
        await self.bus.js.publish(
            subjects.up(site, "alarm", key),
            REGISTRY.encode(event),
            headers={MSG_ID_HEADER: event.id},
        )
        return event.id


@pytest.fixture
async def center(edge_topology: EdgeTopology) -> AsyncIterator[Center]:
    bus = await Bus.connect(NatsConfig.from_url(edge_topology.hub.url, name="operator"))
    await ensure_uplink_streams(bus.js)  # as a real center has: sites also forward logs
    c = Center(edge_topology.hub.url, bus)
    try:
        yield c
    finally:
        for replica in c.replicas:
            if not replica.task.done():
                with contextlib.suppress(Exception):
                    await replica.halt()
        await bus.close()


def raised(
    site: str,
    entity: str,
    cause: str,
    at: datetime,
    severity: Severity = Severity.MAJOR,
    text: str = "",
) -> AlarmRaised:
    return AlarmRaised(
        alarm_id=alarm_id(site, entity, cause),
        site=site,
        entity=entity,
        severity=severity,
        probable_cause=cause,
        text=text or f"{entity} {cause}",
        raised_at=at,
    )


def cleared(site: str, entity: str, cause: str, at: datetime) -> AlarmCleared:
    return AlarmCleared(
        alarm_id=alarm_id(site, entity, cause),
        site=site,
        entity=entity,
        probable_cause=cause,
        text="back to normal",
        cleared_at=at,
    )


# -- a real site, cut off -------------------------------------------------------------------------


async def test_alarms_raised_and_cleared_while_cut_off_reach_the_center_with_original_times(
    edge_topology: EdgeTopology, center: Center, tmp_path: Path
) -> None:
    await center.start_replica("a1")
    rules = AlarmRulesConfig(
        rules=[
            ThresholdRule(
                id="overheat",
                channel="temp",
                path="temp",
                raise_at=80,
                clear_at=70,
                severity=Severity.CRITICAL,
                text="boiler too hot",
            )
        ]
    )
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(rules.model_dump_json())
    server = await asyncio.to_thread(edge_topology.add_site, "s1")
    local = await observer(server.url, "s1")
    agent = AgentProcess(
        "s1", server.url, tmp_path / "agent", *FAST_AGENT, "--alarm-rules", str(rules_file)
    )
    fleet = Fleet("s1", server.mqtt_port, ["d0", "d1"])
    seen_locally: list[Event[Any]] = []

    async def on_local_alarm(msg: Msg) -> None:
        seen_locally.append(REGISTRY.decode(msg.data))

    try:
        await agent.start()
        await wait_agent_up(local, agent)
        await local.nc.subscribe(subjects.site_event("s1", "alarm"), cb=on_local_alarm)
        await asyncio.to_thread(fleet.connect)
        d0, d1 = fleet.devices

        await asyncio.to_thread(edge_topology.cut_link, "s1")
        d0.publish(temp=91.5)  # raise ...
        await wait_until(lambda: len(seen_locally) >= 1, 20, "d0 raised at the site")
        d0.publish(temp=75)  # inside the band: nothing
        d0.publish(temp=60)  # ... and clear, all while cut off
        d1.publish(temp=99)  # raised, stays raised
        await wait_until(lambda: len(seen_locally) >= 3, 20, "three changes at the site")
        await asyncio.sleep(0.5)
        assert await center.alarms(site="s1") == [], "nothing crosses a cut link"

        restored_at = datetime.now(UTC)
        await asyncio.to_thread(edge_topology.restore_link, "s1")

        async def all_there() -> bool:
            history = await center.history(site="s1")
            return len(history.entries) >= 3

        await wait_until(all_there, 30, "the site's alarm history at the center")
    finally:
        await asyncio.to_thread(fleet.close)
        await agent.stop()
        await local.close()

    local_times = {
        (type(e.data).__name__, e.data.alarm_id): (
            e.data.raised_at if isinstance(e.data, AlarmRaised) else e.data.cleared_at
        )
        for e in seen_locally
    }
    assert set(local_times) == {
        ("AlarmRaised", "s1/d0/overheat"),
        ("AlarmCleared", "s1/d0/overheat"),
        ("AlarmRaised", "s1/d1/overheat"),
    }
    history = await center.history(site="s1")
    entries = [(e.kind, e.alarm_id) for e in history.entries]
    assert entries.count((HistoryKind.RAISED, "s1/d0/overheat")) == 1
    assert entries.count((HistoryKind.CLEARED, "s1/d0/overheat")) == 1
    d0_entries = [e for e in history.entries if e.alarm_id == "s1/d0/overheat"]
    assert [e.kind for e in d0_entries] == [HistoryKind.RAISED, HistoryKind.CLEARED]
    for entry in history.entries:
        name = "AlarmRaised" if entry.kind is HistoryKind.RAISED else "AlarmCleared"
        assert entry.at == local_times[(name, entry.alarm_id)]  # the site's own time ...
        assert entry.at < restored_at  # ... from before the link came back
        assert entry.received_at is not None and entry.received_at >= restored_at
        assert entry.severity is Severity.CRITICAL  # a clear's severity comes from its raise
    assert "boiler too hot: temp=91.5 >= 80" in [e.text for e in d0_entries]

    open_alarms = await center.alarms(site="s1")
    assert [(a.alarm_id, a.state) for a in open_alarms] == [("s1/d1/overheat", AlarmState.ACTIVE)]
    every = {a.alarm_id: a for a in await center.alarms(site="s1", include_cleared=True)}
    assert every["s1/d0/overheat"].state is AlarmState.CLEARED
    assert every["s1/d0/overheat"].raised_at == local_times[("AlarmRaised", "s1/d0/overheat")]
    summary: AlarmsSummary = await center.ask("summary", AlarmsSummaryQuery(), AlarmsSummary)
    assert summary.health == {"s1": SiteHealth.CRITICAL}
    assert summary.totals["critical"] == 1


# -- storms ---------------------------------------------------------------------------------------


async def test_a_flapping_alarm_is_summarised_not_flooded_and_its_history_is_whole(
    center: Center,
) -> None:
    await center.start_replica("a1")
    notices: Counter[tuple[str, NoticeKind]] = Counter()

    async def on_notice(msg: Msg) -> None:
        notice = REGISTRY.decode_as(msg.data, AlarmNotice).data
        notices[(notice.site, notice.kind)] += 1

    await center.bus.nc.subscribe(subjects.alarm_notice_all(), cb=on_notice)
    start = datetime.now(UTC) - timedelta(minutes=10)
    flaps = 600  # one site flapping: 300 raises and 300 clears within a few seconds
    for n in range(flaps):
        at = start + timedelta(milliseconds=10 * n)
        change = (
            raised("s9", "link", "down", at) if n % 2 == 0 else cleared("s9", "link", "down", at)
        )
        await center.send("s9", change, key="link")
    # Meanwhile a calm site raises one alarm: operators must still hear about it.
    await center.send("s2", raised("s2", "door", "open", start, Severity.MINOR))
    await center.wait_applied(flaps + 1)

    async def summarised() -> bool:
        return notices[("s9", NoticeKind.FLAPPING_STARTED)] == 1

    await wait_until(summarised, 10, lambda: f"flapping notice: {dict(notices)}")
    [record] = await center.alarms(site="s9")
    assert record.flapping and record.state is AlarmState.CLEARED
    assert record.transitions == flaps and record.suppressed == flaps - 6
    assert notices[("s2", NoticeKind.RAISED)] == 1
    s9_live = sum(n for (site, _), n in notices.items() if site == "s9")
    assert s9_live <= 10, dict(notices)  # 5 changes before it counted as flapping, + summaries

    history = await center.history(site="s9", since=start, limit=1000)
    changes = [e for e in history.entries if e.kind in (HistoryKind.RAISED, HistoryKind.CLEARED)]
    assert len(changes) == flaps and not history.truncated  # nothing lost
    assert [e.at for e in changes] == sorted(e.at for e in changes)
    kinds = {e.kind for e in history.entries}
    assert HistoryKind.FLAPPING_STARTED in kinds

    # Many distinct alarms of one site at once: per-site rate limit, then one stored summary.
    for n in range(60):
        await center.send("s8", raised("s8", f"dev{n}", "silent", start), key=f"dev{n}")
    await center.wait_applied(flaps + 1 + 60)

    async def storm_summary() -> bool:
        return notices[("s8", NoticeKind.SITE_STORM)] >= 1

    await wait_until(storm_summary, 10, lambda: f"site storm summary: {dict(notices)}")
    assert notices[("s8", NoticeKind.RAISED)] <= 12  # burst of 10 (+ refill meanwhile)
    stored = await center.history(site="s8", since=start)
    storms = [e for e in stored.entries if e.kind is HistoryKind.SITE_STORM]
    assert storms and sum(int(e.text.split()[0]) for e in storms) >= 48
    assert len(await center.alarms(site="s8")) == 60  # every alarm is in the table


# -- restarts, replicas, acknowledgement -----------------------------------------------------------


async def test_restart_keeps_the_table_and_catches_up_a_second_replica_takes_over(
    center: Center,
) -> None:
    first = await center.start_replica("a1")
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    for n in range(5):
        await center.send("s1", raised("s1", f"pump{n}", "hot", t0, Severity.MAJOR))
    await center.wait_applied(5)
    await wait_until(lambda: _count(center.alarms(site="s1"), 5), 10, "five open alarms visible")
    before = {a.alarm_id: a for a in await center.alarms(site="s1")}

    await first.halt()
    # While no replica runs: one alarm clears, another is raised (the sites do not wait).
    await center.send("s1", cleared("s1", "pump0", "hot", t0 + timedelta(minutes=1)))
    await center.send("s1", raised("s1", "pump9", "hot", t0 + timedelta(minutes=2)))

    second = await center.start_replica("a2")
    restored = {a.alarm_id: a for a in await center.alarms(site="s1")}
    # Straight from the stored table, before consuming anything new.
    assert set(restored) >= set(before) - {"s1/pump0/hot"}
    await center.wait_applied(2)
    await wait_until(lambda: _count(center.alarms(site="s1"), 5), 20, "caught up")
    after = {a.alarm_id: a for a in await center.alarms(site="s1")}
    assert set(after) == {f"s1/pump{n}/hot" for n in (1, 2, 3, 4, 9)}
    assert after["s1/pump1/hot"].raised_at == before["s1/pump1/hot"].raised_at
    # The durable consumers resumed where the first replica stopped: only the 2 new ones.
    stats = await center.leader_stats()
    assert stats is not None and stats.counters["consumed"] == 2, stats

    # A second replica shares the requests; acknowledging through either works.
    third = await center.start_replica("a3")
    reply: AlarmAckReply = await center.ask(
        "ack", AlarmAck(alarm_id="s1/pump1/hot", by="ann", note="on it"), AlarmAckReply
    )
    assert reply.accepted and reply.applied and reply.record is not None
    assert reply.record.acknowledged_by == "ann"
    unknown: AlarmAckReply = await center.ask("ack", AlarmAck(alarm_id="s1/nope/x"), AlarmAckReply)
    assert not unknown.accepted and "no alarm" in unknown.reason
    for _ in range(6):  # whichever replica answers, it sees the acknowledgement
        [one] = [a for a in await center.alarms(site="s1") if a.alarm_id == "s1/pump1/hot"]
        assert one.acknowledged_by == "ann"

    # The leader stops: the other replica takes over and keeps processing.
    await second.halt()
    await center.send("s1", cleared("s1", "pump9", "hot", t0 + timedelta(minutes=3)))
    await wait_until(lambda: _count(center.alarms(site="s1"), 4), 20, "the new leader applies")
    assert third.service.is_leader
    history = await center.history(site="s1", since=t0 - timedelta(minutes=1))
    acks = [e for e in history.entries if e.kind is HistoryKind.ACKNOWLEDGED]
    assert [(e.alarm_id, e.by, e.text) for e in acks] == [("s1/pump1/hot", "ann", "on it")]


async def _count(found: Awaitable[list[AlarmRecord]], count: int) -> bool:
    return len(await found) == count


# A leader that flushes only when asked: what it consumes stays unstored meanwhile.
NEVER_FLUSHING = {"flush_every_s": 60.0, "busy_flush_every_s": 60.0, "ack_wait_s": 600.0}


async def wait_consumed(replica: Replica, count: int) -> None:
    async def consumed_all() -> bool:
        processor = replica.service.processor
        return processor is not None and processor.stats["consumed"] == count

    await wait_until(consumed_all, 20, f"the leader consumed all {count} changes")


async def test_a_leader_that_dies_before_storing_leaves_nothing_for_its_successor_to_skip(
    center: Center,
) -> None:
    # A first leader consumes 40 changes of one alarm, then dies before storing any: its
    # flush never comes (long intervals) and its last one fails (it lost the right to write).
    first = await center.start_replica("a1", **NEVER_FLUSHING)
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    changes = 40
    for n in range(changes):
        at = t0 + timedelta(seconds=n)
        await center.send(
            "s1",
            raised("s1", "pump", "hot", at) if n % 2 == 0 else cleared("s1", "pump", "hot", at),
        )

    await wait_consumed(first, changes)
    assert first.service.processor is not None and not first.service.processor.settled
    first.service.processor.stop_writing()
    await first.halt()

    # Its successor must apply all 40, in order, now: not wait out the 600 s ack wait and
    # then skip them as older than what it applied meanwhile.
    second = await center.start_replica("a2", ack_wait_s=600.0)
    await center.send("s1", raised("s1", "pump", "hot", t0 + timedelta(minutes=1)))
    await center.wait_applied(changes + 1)
    [record] = await center.alarms(site="s1")
    assert record.state is AlarmState.ACTIVE and record.transitions == changes + 1, record
    assert record.raised_at == t0 + timedelta(minutes=1)
    assert second.service.counters()["consumed"] == changes + 1


async def test_a_flush_cancelled_midway_leaves_its_changes_dirty_and_unacked(
    center: Center,
) -> None:
    leader = await center.start_replica("a1", **NEVER_FLUSHING)
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    for n in range(6):
        entity = f"pump{n % 3}"
        await center.send("s1", raised("s1", entity, "hot", t0 + timedelta(seconds=n)))

    await wait_consumed(leader, 6)
    processor = leader.service.processor
    assert processor is not None and not processor.settled
    publisher = processor._publisher
    send = publisher.publish_batch
    stuck = asyncio.Event()

    async def hang(messages: Any) -> Any:  # a shutdown catches the flush here
        stuck.set()
        await asyncio.Event().wait()

    publisher.publish_batch = hang  # type: ignore[method-assign]
    flush = asyncio.create_task(processor.flush())
    await asyncio.wait_for(stuck.wait(), 10)
    flush.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flush
    # Nothing stored, nothing acked: the next flush (or the next leader) has it all.
    assert sorted(processor._dirty) == [f"s1/pump{n}/hot" for n in range(3)]
    assert not processor.settled
    info = await center.bus.js.consumer_info("UP_ALARM", "alarms")
    assert info.ack_floor.stream_seq == 0

    publisher.publish_batch = send  # type: ignore[method-assign]
    await processor.flush()
    assert processor.settled

    async def all_acked() -> bool:  # acks are fire-and-forget: the server takes a moment
        info = await center.bus.js.consumer_info("UP_ALARM", "alarms")
        return info.ack_floor.stream_seq == 6

    await wait_until(all_acked, 10, "the next flush acks all six")
    assert len(await center.alarms(site="s1")) == 3


async def test_forged_and_malformed_changes_are_dead_lettered_not_applied(center: Center) -> None:
    await center.start_replica("a1")
    now = datetime.now(UTC)
    await center.send("s1", raised("s2", "pump", "hot", now))  # s1 speaking for s2
    forged = raised("s1", "pump", "hot", now).model_copy(update={"alarm_id": "s1/other/x"})
    await center.send("s1", forged)
    await center.bus.js.publish(subjects.up("s1", "alarm", "x"), b"{not json")
    await center.bus.js.publish(subjects.alarm_ack("s1"), b"{not an ack")
    await center.send("s1", raised("s1", "fine", "ok", now))
    await center.wait_applied(5)

    assert [a.alarm_id for a in await center.alarms()] == ["s1/fine/ok"]
    state = await center.bus.js.stream_info("DEADLETTER")
    letters = set()
    for seq in range(state.state.first_seq, state.state.last_seq + 1):
        msg = await center.bus.js.get_msg("DEADLETTER", seq=seq)
        subject = (msg.headers or {}).get(f"{HEADER_PREFIX}Subject", "")
        letters.add(((msg.subject or "").rsplit(".", 1)[-1], subject.split(".", 1)[0]))
    assert letters == {
        ("site_mismatch", "up"),
        ("alarm_id_mismatch", "up"),
        ("malformed", "up"),
        ("malformed", "center"),  # the acknowledgement
    }


# -- the command line ------------------------------------------------------------------------------


async def run_cli(url: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(EDGEBUS),
        *args,
        "--server",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_alarms_cli_and_site_health(center: Center) -> None:
    assert await site_health(center.bus, ["s1"], timeout=0.5) == {}  # no service: "?" shown
    code, _, err = await run_cli(center.url, "alarms", "list", "--timeout", "2")
    assert code == 2 and "no alarms service answered" in err

    await center.start_replica("a1")
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    await center.send("s1", raised("s1", "pump", "hot", t0, Severity.CRITICAL, "82 C"))
    await center.send("s2", raised("s2", "fan", "slow", t0, Severity.MINOR))
    await center.send("s2", cleared("s2", "fan", "slow", t0 + timedelta(minutes=1)))
    await center.send("s3", raised("s3", "disk", "full", t0, Severity.MAJOR))
    await center.wait_applied(4)

    code, out, err = await run_cli(center.url, "alarms", "list", "--json")
    assert code == 0, err
    assert [a["alarm_id"] for a in json.loads(out)] == ["s1/pump/hot", "s3/disk/full"]
    code, out, _ = await run_cli(center.url, "alarms", "list", "--severity", "major", "--json")
    assert [a["alarm_id"] for a in json.loads(out)] == ["s3/disk/full"]
    code, table, _ = await run_cli(center.url, "alarms", "list", "--site", "s1")
    assert code == 0 and "s1/pump/hot" in table and "critical" in table and "s3" not in table

    code, out, _ = await run_cli(center.url, "alarms", "summary", "--json")
    summary = json.loads(out)
    assert summary["health"] == {"s1": "critical", "s3": "degraded"}
    assert summary["totals"] == {"critical": 1, "major": 1, "minor": 0, "warning": 0}

    code, out, _ = await run_cli(center.url, "alarms", "history", "--since", "1h", "--json")
    kinds = [(e["kind"], e["alarm_id"]) for e in json.loads(out)["entries"]]
    assert ("cleared", "s2/fan/slow") in kinds and len(kinds) == 4
    code, out, _ = await run_cli(
        center.url,
        "alarms",
        "history",
        "--since",
        "1h",
        "--site",
        "s2",
        "--severity",
        "minor",
        "--json",
    )
    assert [e["kind"] for e in json.loads(out)["entries"]] == ["raised", "cleared"]
    code, out, _ = await run_cli(center.url, "alarms", "history", "--since", "10m", "--json")
    assert json.loads(out)["entries"] == []  # everything happened 30 minutes ago

    code, out, err = await run_cli(center.url, "alarms", "ack", "s1/pump/hot", "--by", "ann")
    assert code == 0 and "acknowledged s1/pump/hot" in out, err
    code, _, err = await run_cli(center.url, "alarms", "ack", "s9/nothing/here")
    assert code == 1 and "no alarm" in err
    code, _, err = await run_cli(center.url, "alarms", "history", "--since", "yesterday")
    assert code == 2 and "not a duration" in err

    health = await site_health(center.bus, ["s1", "s2", "s3", "s4"])
    assert health == {"s1": "critical", "s2": "ok", "s3": "degraded", "s4": "ok"}
