"""Config sync end to end: a real hub, the real controller and sync service, real site servers
and agents onboarded zero-touch; links cut, agents restarted with no center."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from bus import log as bus_log
from bus import subjects
from bus.client import Bus, RemoteError
from bus.streams import CONFIG_LAYERS_KV, ensure_uplink_streams
from edge_agent.config import AgentConfig
from edge_agent.onboarding import onboard
from edge_agent.runtime import EdgeAgent
from edge_agent.supervisor import agent_data_dir
from edge_agent.sync.agent import ALARM_ENTITY, apply_failed_cause
from edge_agent.sync.store import AppliedStore, store_dir
from edgebus.config_cli import config_history, get_config, set_config, sync_status
from edgebus.site import seed_config
from schemas.alarms import AlarmRaised, Severity, alarm_id
from schemas.bootstrap import BootstrapToken
from schemas.controller import SitesAdd, SitesAdded
from schemas.devices import DeviceReading
from schemas.sync import (
    ConfigDesired,
    ConfigGet,
    ConfigHistoryQuery,
    ConfigSet,
    ConfigSetResult,
    Scope,
    SyncState,
    SyncStatus,
    SyncStatusQuery,
    Target,
)
from services.sync.config import SyncConfig
from services.sync.service import SyncService
from services.sync.status import PushPolicy
from tests.siterig import wait_until
from tests.test_onboarding_edge import FAST_RETRY, HEARTBEAT_S, Center, running_center

pytestmark = pytest.mark.timeout(120)

ALL = Target(scope=Scope.ALL)
REPORT_S = 0.5
SYNC = SyncConfig(
    replica_id="sync-test",
    audit_interval_s=1.0,
    lease_ttl_s=2.0,
    policy=PushPolicy(resend_after_s=2.0, report_repush_after_s=0.5),
)


@dataclass
class Fleet:
    """Onboarded sites, each with its own nats-server (a leaf of the hub) and agent."""

    center: Center
    sync: SyncService
    base: Path
    agents: dict[str, EdgeAgent] = field(default_factory=dict)
    _runs: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=dict)

    @property
    def operator(self) -> Bus:
        return self.center.operator

    def site_dir(self, site: str) -> Path:
        return self.base / "sites" / site

    async def add(
        self, site: str, group: str = "default", tuning: dict[str, Any] | None = None, **labels: str
    ) -> EdgeAgent:
        added = await self.operator.request(
            subjects.control("controller", "sites", "add"),
            SitesAdd(sites=[site], group=group, labels=labels),
            SitesAdded,
        )
        token = BootstrapToken.decode(added.data.tokens[site])
        identity = await onboard(token, self.site_dir(site), retry=FAST_RETRY)
        seed_config(identity, self.site_dir(site))
        await asyncio.to_thread(self.center.topology.add_site, site, mqtt=False)
        return await self.start_agent(site, tuning)

    async def start_agent(self, site: str, tuning: dict[str, Any] | None = None) -> EdgeAgent:
        server = self.center.topology.site(site)
        config = AgentConfig(
            site=site,
            nats_url=server.url,
            data_dir=agent_data_dir(self.site_dir(site)),
            heartbeat_interval_s=HEARTBEAT_S,
            sync_report_interval_s=REPORT_S,
        )
        agent = EdgeAgent(replace(config, **(tuning or {})))
        stop = asyncio.Event()
        self._runs[site] = (stop, asyncio.create_task(agent.run(stop)))
        await asyncio.wait_for(agent.ready.wait(), 30)
        self.agents[site] = agent
        return agent

    async def stop_agent(self, site: str) -> None:
        stop, task = self._runs.pop(site)
        stop.set()
        await asyncio.wait_for(task, 30)

    async def stop_all(self) -> None:
        for site in list(self._runs):
            with contextlib.suppress(Exception):
                await self.stop_agent(site)

    async def set(self, kind: str, target: Target = ALL, **values: Any) -> ConfigSetResult:
        return await set_config(self.operator, ConfigSet(kind=kind, target=target, values=values))

    async def status(self, *sites: str) -> SyncStatus:
        return await sync_status(self.operator, SyncStatusQuery(sites=list(sites) or None))

    async def wait_in_sync(self, *sites: str, timeout: float = 20.0) -> None:
        async def in_sync() -> bool:
            status = await self.status(*sites)
            return all(state == SyncState.IN_SYNC for state in status.sites.values())

        await wait_until(in_sync, timeout, lambda: "not in sync")


def limit(agent: EdgeAgent) -> int:
    assert agent.ingest is not None
    return agent.ingest.limits.max_payload_bytes


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with running_center(tmp_path) as center:
        sync = SyncService(center.operator, SYNC)  # its own subscriptions on a center bus
        stop = asyncio.Event()
        task = asyncio.create_task(sync.run(stop))
        await asyncio.wait_for(sync.started.wait(), 15)
        fleet = Fleet(center, sync, tmp_path)
        try:
            yield fleet
        finally:
            await fleet.stop_all()
            stop.set()
            await asyncio.wait_for(task, 15)


async def test_layers_reach_exactly_the_targeted_sites(fleet: Fleet) -> None:
    s1 = await fleet.add("s1", group="a")
    s2 = await fleet.add("s2", group="a")
    s3 = await fleet.add("s3", group="b", zone="x")
    everyone = (s1, s2, s3)

    result = await fleet.set("ingest", max_payload_bytes=1000)
    assert (result.targeted, result.changed) == (3, 3) and result.rev
    await wait_until(lambda: all(limit(a) == 1000 for a in everyone), 15, "global not applied")
    await fleet.wait_in_sync()

    # What the center sends s3 from now on (a push may rightly be re-sent when a report
    # crosses it, so the test looks at which configs arrive, not how many messages).
    to_s3: list[int] = []

    async def seen_by_s3(msg: Msg) -> None:
        desired = fleet.operator.registry.decode_as(msg.data, ConfigDesired).data
        to_s3.append(desired.config["max_payload_bytes"])

    watch = await fleet.operator.nc.subscribe(subjects.config_desired("s3"), cb=seen_by_s3)
    await fleet.operator.nc.flush()
    group = Target(scope=Scope.GROUP, name="a")
    result = await fleet.set("ingest", group, max_payload_bytes=2000)
    assert (result.targeted, result.changed) == (2, 2)
    await wait_until(lambda: limit(s1) == limit(s2) == 2000, 15, "group not applied")

    site = Target(scope=Scope.SITE, name="s1")
    assert (await fleet.set("ingest", site, max_payload_bytes=3000)).changed == 1
    labels = Target(scope=Scope.LABELS, labels={"zone": "x"})
    assert (await fleet.set("ingest", labels, max_payload_bytes=4000)).changed == 1
    await wait_until(lambda: (limit(s1), limit(s3)) == (3000, 4000), 15, "not applied")
    await fleet.wait_in_sync()
    assert limit(s2) == 2000
    # s3 is in neither group a nor site s1: after the global change it got only the label one.
    await watch.unsubscribe()
    assert to_s3 and set(to_s3) == {4000}, to_s3

    view = await get_config(fleet.operator, ConfigGet(kind="ingest", site="s1"))
    assert view.effective == {"max_payload_bytes": 3000, "message_id_field": None}
    assert [layer.target.scope for layer in view.layers] == ["all", "group", "site"]
    history = await config_history(fleet.operator, ConfigHistoryQuery(kind="ingest"))
    assert [c.values["max_payload_bytes"] for c in history.changes] == [1000, 2000, 3000, 4000]
    assert [c.changed_sites for c in history.changes] == [3, 2, 1, 1]

    # Another key of the same kind reaches the running ingest too (QoS 1 re-send dedup).
    await fleet.set("ingest", site, message_id_field="msg")

    def dedup_field(agent: EdgeAgent) -> str | None:
        return agent.ingest.limits.message_id_field if agent.ingest else None

    await wait_until(lambda: dedup_field(s1) == "msg", 15, "message id field not applied")
    assert dedup_field(s2) is None and dedup_field(s3) is None


async def test_alarm_rules_and_log_levels_arrive_through_config_sync(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge alarm rules and the log ship level are set at the center, for one site."""
    # Applying a `log` config sets this (test) process's printed level: restored after.
    monkeypatch.setattr(bus_log._levels, "printed", bus_log._levels.printed)
    s1 = await fleet.add("s1")
    s2 = await fleet.add("s2")
    rule = {"kind": "threshold", "id": "hot", "channel": "temp", "path": "t", "raise_at": 80}
    site = Target(scope=Scope.SITE, name="s1")
    result = await fleet.set("alarm_rules", site, rules=[{**rule, "clear_at": 70}])
    assert result.changed == 1
    assert (await fleet.set("log", site, ship_level="error")).changed == 1
    await fleet.wait_in_sync()
    assert s1.rule_engine is not None and s2.rule_engine is not None
    assert [r.id for r in s1.rule_engine.config.rules] == ["hot"]
    assert s2.rule_engine.config.rules == []  # not targeted
    assert s1.log_shipper is not None and s1.log_shipper.queue.ship_level == "error"
    assert s2.log_shipper is not None and s2.log_shipper.queue.ship_level == "warning"

    assert s1.bus is not None and s1.alarms is not None
    active = s1.alarms.active

    hot = alarm_id("s1", "d1", "hot")
    await send_temp(s1, 91)
    await wait_until(lambda: hot in {a.alarm_id for a in active()}, 10, "the rule did not raise")
    await send_temp(s1, 60)
    await wait_until(lambda: hot not in {a.alarm_id for a in active()}, 10, "did not clear")


async def test_an_alarm_raised_before_an_agent_restart_is_cleared_after_it(fleet: Fleet) -> None:
    """The condition ends while the agent is down: the restarted agent still owes the clear,
    and the center gets it (else the center would show the alarm active for good)."""
    await ensure_uplink_streams(fleet.operator.js)
    await fleet.add("s1")
    rule = {"kind": "threshold", "id": "hot", "channel": "temp", "path": "t", "raise_at": 80}
    await fleet.set("alarm_rules", rules=[{**rule, "clear_at": 70}])
    await fleet.wait_in_sync()
    hot = alarm_id("s1", "d1", "hot")

    def active(agent: EdgeAgent) -> set[str]:
        return {a.alarm_id for a in agent.alarms.active()} if agent.alarms else set()

    s1 = fleet.agents["s1"]
    await send_temp(s1, 91)
    await wait_until(lambda: hot in active(s1), 10, "not raised")
    await wait_until(
        lambda: _eq(alarm_changes_at_center(fleet, hot), ["AlarmRaised"]),
        15,
        "the raise did not reach the center",
    )
    await fleet.stop_agent("s1")
    s1 = await fleet.start_agent("s1")
    assert hot in active(s1)  # remembered
    await send_temp(s1, 60)
    await wait_until(lambda: hot not in active(s1), 10, "not cleared after the restart")
    await wait_until(
        lambda: _eq(alarm_changes_at_center(fleet, hot), ["AlarmRaised", "AlarmCleared"]),
        15,
        "no clear at the center",
    )


async def alarm_changes_at_center(fleet: Fleet, ident: str) -> list[str]:
    """The event types of alarm `ident` in the center's UP_ALARM stream, in order."""
    js = fleet.operator.js
    state = (await js.stream_info("UP_ALARM")).state
    names = []
    for seq in range(state.first_seq, state.last_seq + 1):
        event = fleet.operator.registry.decode((await js.get_msg("UP_ALARM", seq)).data or b"")
        if getattr(event.data, "alarm_id", None) == ident:
            names.append(type(event.data).__name__)
    return names


async def _eq(names: Awaitable[list[str]], expected: list[str]) -> bool:
    return await names == expected


async def send_temp(agent: EdgeAgent, value: float) -> None:
    """A reading of device d1's temp channel on the site's bus, as ingest would publish it."""
    assert agent.bus is not None
    reading = DeviceReading(site=agent.site, device="d1", channel="temp", payload={"t": value})
    subject = subjects.site_readings(agent.site, "d1", "temp")
    await agent.bus.publish(subject, agent.bus.event(reading))


async def test_a_config_version_the_agent_cannot_read_is_dead_lettered_and_alarmed(
    fleet: Fleet,
) -> None:
    """A center newer than the agent sends a version it does not know: the agent keeps
    running its config, stores the message as a dead letter and raises a major alarm, which
    the center gets; the alarm clears once no such dead letter came for a quiet while."""
    await ensure_uplink_streams(fleet.operator.js)
    s1 = await fleet.add("s1", tuning={"dead_letter_quiet_s": 2.0})
    event = json.loads(
        fleet.operator.registry.encode(
            fleet.operator.event(ConfigDesired(kind="ingest", rev=9, digest="x", config={}))
        )
    )
    event["dataschema"] = event["dataschema"].replace(":v1", ":v99")
    assert s1.bus is not None
    dead_letters = s1.bus.dead_letters.counts

    async def sent_and_dead_lettered() -> bool:
        # Re-sent until it arrives: the agent's subscription may not have crossed the leaf yet.
        await fleet.operator.nc.publish(subjects.config_desired("s1"), json.dumps(event).encode())
        await asyncio.sleep(0.2)
        return dead_letters["unsupported_version"] > 0

    await wait_until(sent_and_dead_lettered, 10, "never dead-lettered")

    ident = alarm_id("s1", "dead-letters", "unsupported_version")

    def alarm() -> AlarmRaised | None:
        assert s1.alarms is not None
        return next((a for a in s1.alarms.active() if a.alarm_id == ident), None)

    await wait_until(lambda: alarm() is not None, 10, "no dead-letter alarm")
    raised = alarm()
    assert raised is not None and raised.severity == Severity.MAJOR
    assert "config-sync dead-lettered down.s1.config" in raised.text, raised.text
    await wait_until(lambda: alarm() is None, 10, "not cleared after the quiet while")
    await wait_until(
        lambda: _eq(alarm_changes_at_center(fleet, ident), ["AlarmRaised", "AlarmCleared"]),
        15,
        "the alarm's raise and clear did not reach the center",
    )


async def test_a_layer_written_while_the_follower_was_away_still_reaches_the_sites(
    fleet: Fleet,
) -> None:
    """Another replica writes a layer while this one's copy of the layers is not following
    (its consumer lost, a reconnect): the reload tells the service, whose audit pushes it."""
    s1 = await fleet.add("s1")
    await fleet.set("ingest", max_payload_bytes=1000)
    await wait_until(lambda: limit(s1) == 1000, 15, "global not applied")
    layers = fleet.sync.layers
    assert layers is not None
    [(key, stored)] = list(layers.items())
    await layers.pause()
    kv = await fleet.operator.js.key_value(CONFIG_LAYERS_KV.bucket)
    written = stored.model_copy(update={"values": {**stored.values, "max_payload_bytes": 1500}})
    await kv.put(key, written.model_dump_json().encode())  # as another replica would
    await layers.resume()
    await wait_until(lambda: limit(s1) == 1500, 15, "the other replica's layer not applied")
    await fleet.wait_in_sync()


async def test_a_preview_shows_which_sites_change_and_how(fleet: Fleet) -> None:
    await fleet.add("s1", group="a")
    await fleet.add("s2", group="b")
    await fleet.set("ingest", Target(scope=Scope.SITE, name="s2"), max_payload_bytes=5000)
    preview = await set_config(
        fleet.operator,
        ConfigSet(kind="ingest", target=ALL, values={"max_payload_bytes": 800}, dry_run=True),
    )
    assert preview.rev is None and (preview.targeted, preview.changed) == (2, 1)
    [only] = preview.diffs
    assert only.site == "s1"
    assert [(c.key, c.before, c.after) for c in only.changes] == [
        ("max_payload_bytes", 64 * 1024, 800)
    ]
    history = await config_history(fleet.operator, ConfigHistoryQuery())
    assert len(history.changes) == 1  # the preview is not a change


async def test_invalid_config_is_refused_at_the_center_before_anything_is_sent(
    fleet: Fleet,
) -> None:
    s1 = await fleet.add("s1")
    for values, code in (
        ({"max_payload_bytes": 10}, "invalid_value"),  # below the schema's minimum
        ({"max_payload_bytes": "big"}, "invalid_value"),
        ({"payload_limit": 1000}, "unknown_key"),
    ):
        with pytest.raises(RemoteError) as refused:
            await fleet.set("ingest", **values)
        assert refused.value.code == code, str(refused.value)
    with pytest.raises(RemoteError) as refused:
        await fleet.set("nonsense", x=1)
    assert refused.value.code == "unknown_kind"
    await asyncio.sleep(3 * REPORT_S)
    assert s1.sync is not None and s1.sync.stats["received"] == 0
    assert (await config_history(fleet.operator, ConfigHistoryQuery())).changes == []


async def test_an_offline_site_converges_straight_to_the_newest_revision(fleet: Fleet) -> None:
    s1 = await fleet.add("s1")
    s2 = await fleet.add("s2")
    await fleet.set("ingest", max_payload_bytes=1000)
    await fleet.wait_in_sync()
    assert s2.sync is not None
    applied_before = s2.sync.stats["applied"]

    await asyncio.to_thread(fleet.center.topology.cut_link, "s2")
    for size in (1100, 1200, 1300):
        await fleet.set("ingest", max_payload_bytes=size)
    await wait_until(lambda: limit(s1) == 1300, 15, "s1 did not follow")
    await asyncio.sleep(3 * REPORT_S)
    assert limit(s2) == 1000  # cut off: it heard none of them
    [row] = (await fleet.status("s2")).rows[:1]
    assert row.state == SyncState.OUT_OF_SYNC

    await asyncio.to_thread(fleet.center.topology.restore_link, "s2")
    await wait_until(lambda: limit(s2) == 1300, 20, "s2 did not converge")
    await fleet.wait_in_sync("s2")
    # Straight to the newest: one apply, not a replay of 1100 and 1200.
    assert s2.sync.stats["applied"] == applied_before + 1


async def test_a_site_that_cannot_run_a_config_reports_failed_and_keeps_its_own(
    fleet: Fleet,
) -> None:
    s1 = await fleet.add("s1")
    await fleet.add("s2")
    target = Target(scope=Scope.SITE, name="s1")
    # Valid for the schema, but more than this site's storage can reserve.
    result = await fleet.set("replay", target, max_bytes=10**16)
    assert result.changed == 1

    async def failed() -> bool:
        status = await fleet.status("s1")
        return any(r.kind == "replay" and r.state == SyncState.FAILED for r in status.rows)

    await wait_until(failed, 20, "s1 never reported failed")
    status = await fleet.status("s1")
    [row] = [r for r in status.rows if r.kind == "replay"]
    print(f"\nfailed apply reported: {row.error}")
    assert row.error and row.applied_rev == result.rev
    assert status.sites["s1"] == SyncState.FAILED
    assert s1.alarms is not None
    ident = alarm_id("s1", ALARM_ENTITY, apply_failed_cause("replay"))
    assert ident in {a.alarm_id for a in s1.alarms.active()}
    assert s1.monitor is not None and s1.monitor.snapshot()  # still running
    assert (await fleet.status("s2")).sites["s2"] == SyncState.IN_SYNC  # untouched

    # The audit does not resend a config the site failed (it would fail again) ...
    pushed = fleet.sync.stats["pushed"]
    await asyncio.sleep(2 * SYNC.audit_interval_s + SYNC.policy.resend_after_s)
    assert fleet.sync.stats["pushed"] == pushed
    # ... a new revision is applied, the alarm clears, the stream has the new bound.
    await fleet.set("replay", target, max_bytes=64 * 1024 * 1024)
    await fleet.wait_in_sync("s1")
    await wait_until(lambda: ident not in {a.alarm_id for a in s1.alarms.active()}, 10, "alarm")
    assert s1.bus is not None
    info = await s1.bus.js.stream_info("REPLAY")
    assert info.config.max_bytes == 64 * 1024 * 1024


async def test_restart_with_no_center_runs_the_last_known_config(fleet: Fleet) -> None:
    await fleet.add("s1")
    await fleet.set("ingest", max_payload_bytes=1234)
    await fleet.wait_in_sync("s1")
    await fleet.stop_agent("s1")

    await asyncio.to_thread(fleet.center.topology.cut_link, "s1")
    agent = await fleet.start_agent("s1")
    # Applied from disk before the agent reported ready: no center involved.
    assert limit(agent) == 1234
    assert agent.sync is not None and agent.sync.stats["received"] == 0


async def test_a_new_site_gets_its_whole_config_at_onboarding(fleet: Fleet) -> None:
    await fleet.set("ingest", Target(scope=Scope.GROUP, name="late"), max_payload_bytes=777)
    await fleet.set("replay", max_bytes=32 * 1024 * 1024)
    # Onboarding brings the config: the agent runs it from its first moment, even with
    # the link cut right after onboarding.
    agent = await fleet.add("s9", group="late")
    assert limit(agent) == 777
    assert agent.sync is not None
    assert {k: r.config for k, r in agent.sync.store.running.items()} == {
        "ingest": {"max_payload_bytes": 777, "message_id_field": None},
        "replay": {
            "max_bytes": 32 * 1024 * 1024,
            "max_age_s": 7 * 24 * 3600.0,
            "policy": "refuse_new",
            "near_full_ratio": 0.8,
        },
    }
    await fleet.wait_in_sync("s9")


async def test_drift_at_a_site_is_found_and_resynced(fleet: Fleet) -> None:
    await fleet.add("s1")
    await fleet.set("ingest", max_payload_bytes=1500)
    await fleet.wait_in_sync("s1")
    await fleet.stop_agent("s1")
    # Someone edits the site's applied config by hand while the agent is down.
    agent_dir = agent_data_dir(fleet.site_dir("s1"))
    store = AppliedStore(store_dir(agent_dir)).load()
    running = store.running["ingest"]
    store.running["ingest"] = replace(running, config={"max_payload_bytes": 99_000}, digest="x")
    store.attempts["ingest"] = store.attempts["ingest"].model_copy(update={"digest": "x"})
    store.save()

    # It restarts cut off (no pull at start can fix it), then the link comes back: its
    # periodic report shows the drift and the center sends the desired config again.
    await asyncio.to_thread(fleet.center.topology.cut_link, "s1")
    agent = await fleet.start_agent("s1")
    await asyncio.sleep(2 * REPORT_S)
    assert limit(agent) == 99_000
    pushed = fleet.sync.stats["pushed"]
    await asyncio.to_thread(fleet.center.topology.restore_link, "s1")
    await wait_until(lambda: limit(agent) == 1500, 15, "drift never corrected")
    await fleet.wait_in_sync("s1")
    assert fleet.sync.stats["pushed"] > pushed


EDGEBUS = Path(sys.executable).parent / "edgebus"


async def edgebus(fleet: Fleet, *args: str) -> tuple[int, str, str]:
    """The installed `edgebus` command against the fleet's center."""
    process = await asyncio.create_subprocess_exec(
        str(EDGEBUS), *args, "--server", fleet.center.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_config_and_sync_commands(fleet: Fleet) -> None:
    s1 = await fleet.add("s1", group="a")
    await fleet.add("s2", group="b")

    code, out, err = await edgebus(fleet, "config", "diff", "ingest", "max_payload_bytes=2048")
    assert code == 0, err
    assert "would change" in out and "s1" in out and "65536" in out and "2048" in out
    code, out, err = await edgebus(
        fleet, "config", "set", "ingest", "max_payload_bytes=2048", "--group", "a", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert (result["changed"], result["diffs"][0]["site"]) == (1, "s1") and result["rev"]
    await wait_until(lambda: limit(s1) == 2048, 15, "not applied")
    await fleet.wait_in_sync()

    code, out, err = await edgebus(fleet, "config", "set", "ingest", "max_payload_bytes=1")
    assert code == 1 and "invalid_value" in err, (out, err)
    code, out, err = await edgebus(
        fleet, "config", "set", "ingest", "x=1", "--site", "s1", "-g", "a"
    )
    assert code == 2 and "choose one target" in err

    code, out, err = await edgebus(fleet, "config", "get", "ingest", "--site", "s1", "--effective")
    effective = {"max_payload_bytes": 2048, "message_id_field": None}
    assert code == 0 and json.loads(out) == effective, err
    code, out, err = await edgebus(fleet, "config", "history", "--json")
    assert code == 0 and [c["rev"] for c in json.loads(out)["changes"]] == [result["rev"]]

    code, out, err = await edgebus(fleet, "sync", "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["sites"] == {"s1": "in-sync", "s2": "in-sync"}
    assert {(r["site"], r["kind"], r["desired_rev"]) for r in status["rows"]} >= {
        ("s1", "ingest", result["rev"]),
        ("s2", "ingest", 0),
    }
    code, out, err = await edgebus(fleet, "sites", "list", "--json")
    assert code == 0, err
    assert {r["site"]: r["sync"] for r in json.loads(out)} == {"s1": "in-sync", "s2": "in-sync"}
    code, out, err = await edgebus(fleet, "sites", "list")
    assert code == 0 and "sync" in out and "in-sync" in out, err
