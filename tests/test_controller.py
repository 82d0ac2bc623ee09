"""The controller against a real hub (and real leaf sites): onboarding and its refusals,
restarts, two replicas at once, availability through a cut link, alarms, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from bus import subjects
from bus.auth import CredentialAuthority, SiteIdentity, decode_jwt
from bus.client import Bus, RemoteError
from bus.config import NatsConfig, ReconnectPolicy
from bus.testing import EdgeTopology
from schemas import REGISTRY, Event
from schemas.alarms import AlarmCleared, AlarmRaised
from schemas.controller import (
    AuditEvent,
    Availability,
    Capacity,
    Inventory,
    Load,
    OnboardReply,
    OnboardRequest,
    SiteChange,
    SiteChanged,
    SiteHeartbeat,
    SiteRecord,
    SitesAdd,
    SitesAdded,
    SitesList,
    SitesQuery,
)
from services.controller.availability import AvailabilityPolicy
from services.controller.config import ControllerConfig
from services.controller.credentials import PushingAuthority
from services.controller.service import ControllerService, request_subjects
from services.controller.tokens import BootstrapToken

pytestmark = pytest.mark.timeout(90)

INTERVAL_S = 0.2
# Small thresholds keep the tests fast; the gaps leave room for a loaded 2-core machine.
POLICY = AvailabilityPolicy.for_interval(INTERVAL_S, degraded_after_s=0.7, offline_after_s=1.6)
LEASE_TTL_S = 1.0
OPS = request_subjects()
EDGEBUS = Path(sys.executable).parent / "edgebus"
ON, DEG, OFF, PEND = (
    Availability.ONLINE,
    Availability.DEGRADED,
    Availability.OFFLINE,
    Availability.PENDING,
)


# -- harness ---------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"after {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def connect(url: str, name: str, scope: str = "center", source: str | None = None) -> Bus:
    config = NatsConfig.from_url(
        url, name=name, connect_timeout_s=5.0, reconnect=ReconnectPolicy(wait_s=0.1)
    )
    return await Bus.connect(config, scope=scope, source=source)


@dataclass
class Replica:
    service: ControllerService
    bus: Bus
    task: asyncio.Task[None]
    stop: asyncio.Event

    @property
    def served(self) -> dict[str, int]:
        assert self.service.requests is not None
        return self.service.requests.served


@dataclass
class Center:
    """The hub, controller replicas run in-process, and an operator connection."""

    topology: EdgeTopology
    operator: Bus
    replicas: list[Replica] = field(default_factory=list)
    buses: list[Bus] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.topology.hub.url

    def config(self, **overrides: Any) -> ControllerConfig:
        base = ControllerConfig(
            policy=POLICY,
            public_urls=(self.url,),
            leaf_urls=(self.topology.hub.leaf_url,),
            lease_ttl_s=LEASE_TTL_S,
            sweep_interval_s=0.05,
            persist_every_s=0.5,
        )
        return replace(base, **overrides)

    async def start_replica(self, **overrides: Any) -> Replica:
        config = self.config(**overrides)
        bus = await connect(self.url, f"controller-{config.replica_id}", source="/center/ctl")
        service = ControllerService(bus, config)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        started = asyncio.create_task(service.started.wait())
        done, _ = await asyncio.wait({task, started}, timeout=15, return_when="FIRST_COMPLETED")
        if started not in done:
            started.cancel()
            if task in done:
                task.result()  # raises what made it fail
            raise AssertionError("controller did not start within 15 s")
        replica = Replica(service, bus, task, stop)
        self.replicas.append(replica)
        return replica

    async def stop_replica(self, replica: Replica) -> None:
        replica.stop.set()
        await asyncio.wait_for(replica.task, 10)
        await replica.bus.close()
        self.replicas.remove(replica)

    async def crash_replica(self, replica: Replica) -> None:
        """Lose a replica abruptly: its connection dies first, so it cannot hand over."""
        await replica.bus.nc.close()
        replica.task.cancel()
        with contextlib.suppress(BaseException):
            await replica.task
        self.replicas.remove(replica)

    async def bus(self, url: str, name: str, scope: str = "center") -> Bus:
        bus = await connect(url, name, scope=scope)
        self.buses.append(bus)
        return bus

    # -- operator requests ----------------------------------------------------------------

    async def add(self, *sites: str, ttl_s: float = 3600.0, **fields: Any) -> SitesAdded:
        request = SitesAdd(sites=list(sites), token_ttl_s=ttl_s, **fields)
        return (await self.operator.request(OPS["add"], request, SitesAdded)).data

    async def onboard(self, site: str, secret: str, **fields: Any) -> OnboardReply:
        request = OnboardRequest(site=site, token_secret=secret, **fields)
        return (await self.operator.request(OPS["onboard"], request, OnboardReply)).data

    async def add_and_onboard(self, site: str, **fields: Any) -> OnboardReply:
        token = BootstrapToken.decode((await self.add(site, **fields)).tokens[site])
        return await self.onboard(site, token.secret)

    async def query(self, **fields: Any) -> SitesList:
        return (await self.operator.request(OPS["query"], SitesQuery(**fields), SitesList)).data

    async def record(self, site: str) -> SiteRecord | None:
        found = (await self.query(site=site)).sites
        return found[0] if found else None

    async def change(self, site: str, **fields: Any) -> SiteChanged:
        change = SiteChange(site=site, **fields)
        return (await self.operator.request(OPS["change"], change, SiteChanged)).data

    async def availability(self, site: str) -> Availability | None:
        record = await self.record(site)
        return record.availability if record else None

    async def wait_state(self, site: str, state: Availability, timeout: float = 10.0) -> None:
        async def reached() -> bool:
            return await self.availability(site) == state

        await eventually(reached, timeout, f"{site} {state.value}")

    async def raw(self, stream: str, prefix: str = "") -> list[tuple[str, bytes]]:
        """(subject, data) of every message in a stream whose subject starts with prefix."""
        js = self.operator.js
        info = await js.stream_info(stream)
        found: list[tuple[str, bytes]] = []
        if info.state.messages == 0:
            return found
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            if msg.subject.startswith(prefix):
                found.append((msg.subject, msg.data or b""))
        return found

    async def stored(self, stream: str, prefix: str = "") -> list[Event[Any]]:
        """Every event in a center stream (optionally only subjects starting with prefix)."""
        return [REGISTRY.decode(data) for _, data in await self.raw(stream, prefix)]

    async def audits(self, site: str) -> list[AuditEvent]:
        return [e.data for e in await self.stored("AUDIT") if e.data.site == site]

    async def transitions(self, site: str) -> list[tuple[Availability, Availability]]:
        events = await self.stored("SITE_EVENTS", subjects.site_availability(site))
        return [(e.data.previous, e.data.current) for e in events]

    async def alarms(self, site: str) -> list[Event[Any]]:
        return await self.stored("CENTER_ALARMS", subjects.center_alarm(site))


@pytest.fixture
async def center(edge_topology: EdgeTopology) -> AsyncIterator[Center]:
    operator = await connect(edge_topology.hub.url, "operator", source="/operators/test")
    center = Center(edge_topology, operator)
    try:
        yield center
    finally:
        for replica in list(center.replicas):
            with contextlib.suppress(Exception):
                await center.stop_replica(replica)
        for bus in [*center.buses, operator]:
            with contextlib.suppress(Exception):
                await bus.close()


def inventory(version: str = "1.4.2") -> Inventory:
    return Inventory(
        agent_version=version,
        capacity=Capacity(cores=4, memory_bytes=8 << 30, disk_bytes=64 << 30),
        load=Load(cpu_percent=7.5, load1=0.3, memory_used_bytes=1 << 30, disk_used_bytes=3 << 30),
        device_count=12,
        replay_backlog=0,
        function_count=2,
    )


class Heartbeats:
    """Plays a site's heartbeat publisher (the edge half is another issue's work)."""

    def __init__(self, bus: Bus, site: str, claimed_site: str | None = None) -> None:
        self._bus = bus
        self._subject = subjects.up(site, "heartbeat")
        self._claimed = claimed_site or site
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    async def send_one(self) -> None:
        beat = SiteHeartbeat(
            site=self._claimed, seq=self.sent, sent_at=datetime.now(UTC), inventory=inventory()
        )
        await self._bus.publish(self._subject, self._bus.event(beat))
        self.sent += 1

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a cut link: keep beating into the void
                await self.send_one()
            await asyncio.sleep(INTERVAL_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# -- onboarding -------------------------------------------------------------------------------


async def test_add_then_onboard_gives_the_site_its_identity(center: Center) -> None:
    await center.start_replica()

    added = await center.add("s1", group="plant-7", labels={"env": "prod", "zone": "a"})
    token = BootstrapToken.decode(added.tokens["s1"])
    pending = await center.record("s1")
    reply = await center.onboard(
        "s1", token.secret, user_public_key="UFAKEPUBLICKEY", inventory=inventory()
    )
    record = await center.record("s1")
    # The reply was lost, say: the same identity asking again gets the same answer...
    repeat = await center.onboard("s1", token.secret, user_public_key="UFAKEPUBLICKEY")
    # ...but nobody else holding the token does.
    with pytest.raises(RemoteError) as other_key:
        await center.onboard("s1", token.secret, user_public_key="UANOTHERKEY")
    with pytest.raises(RemoteError) as no_key:
        await center.onboard("s1", token.secret)

    assert added.refused == {}
    assert token.site == "s1" and token.center_urls == (center.url,)
    assert pending is not None and pending.availability == PEND and pending.onboarded_at is None
    assert reply.site == "s1" and reply.group == "plant-7"
    assert reply.labels == {"env": "prod", "zone": "a"}
    assert reply.user_jwt is None  # this center runs without auth
    assert reply.leaf_urls == [center.topology.hub.leaf_url]
    assert reply.heartbeat_interval_s == INTERVAL_S
    assert repeat == reply
    assert other_key.value.code == no_key.value.code == "token_used"
    assert record is not None and record.onboarded_at is not None
    assert record.user_public_key == "UFAKEPUBLICKEY"
    assert record.inventory is not None and record.inventory.device_count == 12
    audits = await center.audits("s1")
    assert [(a.action, a.outcome) for a in audits] == [
        ("add", "allowed"),
        ("onboard", "allowed"),
        ("onboard", "allowed"),
        ("onboard", "refused"),
        ("onboard", "refused"),
    ]
    assert "same key" in audits[2].reason
    assert all(a.actor == "/operators/test" for a in audits)


async def test_every_onboarding_refusal_has_its_code_and_an_audit_event(center: Center) -> None:
    await center.start_replica()
    added = await center.add("wrong", "used", "replaced")
    short = await center.add("expired", ttl_s=0.3)
    secrets = {
        site: BootstrapToken.decode(text).secret
        for site, text in {**added.tokens, **short.tokens}.items()
    }
    await center.onboard("used", secrets["used"])
    await center.add("replaced")  # a new token for it: the first one no longer matches
    await asyncio.sleep(0.4)  # past the short token's lifetime

    attempts = {
        "never-added": ("token_unknown", secrets["wrong"]),
        "wrong": ("token_wrong", "x" * 32),
        "expired": ("token_expired", secrets["expired"]),
        "used": ("token_used", secrets["used"]),
        "replaced": ("token_wrong", secrets["replaced"]),
    }
    for site, (code, secret) in attempts.items():
        with pytest.raises(RemoteError) as refused:
            await center.onboard(site, secret)
        assert refused.value.code == code, site
        assert site in str(refused.value)  # the message says which site and why

    for site, (code, _) in attempts.items():
        audit = (await center.audits(site))[-1]
        assert (audit.action, audit.outcome) == ("onboard", "refused"), site
        assert audit.reason.startswith(code), audit.reason
        record = await center.record(site)
        assert record is None or record.site == "used" or record.onboarded_at is None


async def test_an_onboarded_site_is_not_re_added_until_deleted(center: Center) -> None:
    await center.start_replica()
    first = BootstrapToken.decode((await center.add("s1")).tokens["s1"])
    await center.onboard("s1", first.secret)

    again = await center.add("s1")
    deleted = await center.change("s1", delete=True)
    with pytest.raises(RemoteError) as after_delete:
        await center.onboard("s1", first.secret)
    readded = await center.add("s1", group="g2")
    reply = await center.onboard("s1", BootstrapToken.decode(readded.tokens["s1"]).secret)

    assert "s1" not in again.tokens and "already onboarded" in again.refused["s1"]
    assert deleted.deleted and deleted.record.site == "s1"
    assert after_delete.value.code == "token_unknown"
    assert reply.group == "g2"
    actions = [(a.action, a.outcome) for a in await center.audits("s1")]
    assert ("delete", "allowed") in actions and actions.count(("add", "refused")) == 1


async def test_controller_restart_keeps_the_registry_and_its_verdicts(
    center: Center, tmp_path: Path
) -> None:
    """A real controller process, killed with SIGKILL and started again."""
    log = tmp_path / "controller.log"

    async def start() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.controller", "--nats", center.url,
            "--heartbeat-interval-s", str(INTERVAL_S), "--offline-after-s", "1.6",
            "--lease-ttl-s", str(LEASE_TTL_S), "--sweep-interval-s", "0.05",
            "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=log.open("ab"),
        )  # fmt: skip

        async def answers() -> bool:
            try:
                await center.operator.request(OPS["query"], SitesQuery(), SitesList, timeout=1)
            except Exception:
                return False
            return True

        await eventually(answers, 20, f"controller answering; log: {log}")
        return process

    process = await start()
    try:
        added = await center.add("a1", "a2", group="g", labels={"k": "v"})
        secret = BootstrapToken.decode(added.tokens["a1"]).secret
        await center.onboard("a1", secret)
        await center.change("a2", managed=False, set_labels={"x": "y"})
        before = {r.site: r for r in (await center.query()).sites}

        process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)
        process = await start()
        after = {r.site: r for r in (await center.query()).sites}
        with pytest.raises(RemoteError) as reused:
            await center.onboard("a1", secret)
        pending = BootstrapToken.decode(added.tokens["a2"]).secret
        reply = await center.onboard("a2", pending)  # a token minted before the crash
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()

    assert process.returncode == 0  # SIGTERM: a clean stop
    assert set(after) == {"a1", "a2"}
    assert after["a1"] == before["a1"]
    assert after["a1"].onboarded_at is not None
    assert (after["a2"].managed, after["a2"].labels) == (False, {"k": "v", "x": "y"})
    assert reused.value.code == "token_used"
    assert reply.labels == {"k": "v", "x": "y"}


async def test_a_restart_neither_drops_live_sites_nor_revives_dead_ones(center: Center) -> None:
    """After a restart the controller has heard nobody: it gives every site one offline
    threshold of grace, and a site offline before stays offline until it heartbeats."""
    replica = await center.start_replica()
    beats = {}
    for site in ("live", "quiet", "dead"):
        await center.add_and_onboard(site)
        beats[site] = Heartbeats(await center.bus(center.url, site, scope=site), site)
        beats[site].start()
    for site in beats:
        await center.wait_state(site, ON)
    await beats["dead"].stop()
    await center.wait_state("dead", OFF)

    await center.crash_replica(replica)
    await beats["quiet"].stop()  # goes silent while no controller runs
    await asyncio.sleep(1.5 * POLICY.offline_after_s)
    loop = asyncio.get_running_loop()
    restarted_at = loop.time()
    await center.start_replica()
    right_after = {site: await center.availability(site) for site in beats}
    await center.wait_state("quiet", OFF)
    quiet_took = loop.time() - restarted_at
    await asyncio.sleep(POLICY.offline_after_s)  # time enough for any false transition
    await beats["live"].stop()

    assert right_after == {"live": ON, "quiet": ON, "dead": OFF}
    assert quiet_took >= 0.9 * POLICY.offline_after_s  # one threshold of grace, not zero
    assert await center.transitions("live") == [(PEND, ON)]
    assert await center.transitions("quiet") == [(PEND, ON), (ON, DEG), (DEG, OFF)]
    assert await center.transitions("dead") == [(PEND, ON), (ON, DEG), (DEG, OFF)]


async def test_a_hub_outage_loses_no_registry_write_and_raises_no_false_alarm(
    center: Center,
) -> None:
    # Thresholds with room for the lease to be taken again after the outage.
    policy = AvailabilityPolicy.for_interval(INTERVAL_S, degraded_after_s=1.5, offline_after_s=2.5)
    a = await center.start_replica(policy=policy, lease_ttl_s=0.6)
    b = await center.start_replica(policy=policy, lease_ttl_s=0.6)
    await center.add_and_onboard("s1")
    beats = Heartbeats(await center.bus(center.url, "s1", scope="s1"), "s1")
    beats.start()
    await center.wait_state("s1", ON)

    # Down for longer than the offline threshold, and the site's next heartbeat comes after
    # a leader is sweeping again (as with 30 s heartbeats in production): its last one
    # looks old, yet the silence was the center's own.
    await beats.stop()
    await asyncio.to_thread(center.topology.hub.stop)
    await asyncio.sleep(1.4 * policy.offline_after_s)
    await asyncio.to_thread(center.topology.hub.start)
    await eventually(lambda: a.service.is_leader or b.service.is_leader, 10, "a leader again")
    await asyncio.sleep(0.3)  # several sweeps
    beats.start()
    await eventually(lambda: center.operator.nc.is_connected, 10, "operator reconnected")
    changed = await center.change("s1", set_labels={"after": "restart"})

    def both_see_it() -> bool:
        records = [r.service.registry.get("s1") if r.service.registry else None for r in (a, b)]
        return all(rec is not None and rec.labels.get("after") == "restart" for rec in records)

    # Without asking them (no query barrier): each replica's own copy catches up.
    await eventually(both_see_it, 10, "both replicas' registry copies see the change")
    await asyncio.sleep(policy.offline_after_s)
    await beats.stop()

    assert changed.record.labels == {"after": "restart"}
    # Heartbeats missed while the hub was down are the center's fault, not the site's.
    assert await center.transitions("s1") == [(PEND, ON)]
    assert await center.alarms("s1") == []


# -- two replicas ------------------------------------------------------------------------------


async def test_two_replicas_let_exactly_one_onboarding_per_token_win(center: Center) -> None:
    a = await center.start_replica()
    b = await center.start_replica()
    sites = [f"r{i:02d}" for i in range(20)]
    added = await center.add(*sites)
    secrets = {s: BootstrapToken.decode(t).secret for s, t in added.tokens.items()}

    async def attempt(site: str) -> str:
        try:
            await center.onboard(site, secrets[site])
        except RemoteError as exc:
            return exc.code
        return "onboarded"

    # Over the wire: three concurrent attempts per token, spread by the queue group.
    outcomes = await asyncio.gather(*(attempt(site) for site in sites for _ in range(3)))
    by_site = [outcomes[i * 3 : i * 3 + 3] for i in range(len(sites))]

    # And straight into both replicas' handlers at once, so the race is certain.
    extra = (await center.add("race")).tokens["race"]
    request = center.operator.event(
        OnboardRequest(site="race", token_secret=BootstrapToken.decode(extra).secret)
    )
    assert a.service.requests is not None and b.service.requests is not None
    race = await asyncio.gather(
        a.service.requests.onboard(request), b.service.requests.onboard(request)
    )

    assert all(sorted(o) == ["onboarded", "token_used", "token_used"] for o in by_site), by_site
    assert a.served["onboard"] > 0 and b.served["onboard"] > 0
    assert sorted(type(r).__name__ for r in race) == ["ErrorReply", "OnboardReply"]
    records = {r.site: r for r in (await center.query()).sites}
    assert all(records[s].onboarded_at is not None for s in [*sites, "race"])


async def test_two_replicas_lose_none_of_200_concurrent_label_writes(center: Center) -> None:
    a = await center.start_replica()
    b = await center.start_replica()
    await center.add("shared")

    await asyncio.gather(
        *(center.change("shared", set_labels={f"k{i:03d}": str(i)}) for i in range(200))
    )
    record = await center.record("shared")

    assert record is not None
    assert record.labels == {f"k{i:03d}": str(i) for i in range(200)}
    assert a.served["change"] > 0 and b.served["change"] > 0
    assert a.service.registry is not None and b.service.registry is not None
    # The replicas did collide (and re-read instead of overwriting).
    assert a.service.registry.conflicts + b.service.registry.conflicts > 0


async def test_only_one_replica_leads_and_a_crashed_leader_is_replaced(center: Center) -> None:
    first = await center.start_replica()
    second = await center.start_replica()
    await center.add_and_onboard("s1")
    beats = Heartbeats(await center.bus(center.url, "s1-beats", scope="s1"), "s1")
    beats.start()
    await center.wait_state("s1", ON)

    leaders = [r for r in (first, second) if r.service.is_leader]
    assert len(leaders) == 1
    leader = leaders[0]
    follower = second if leader is first else first
    await center.crash_replica(leader)
    await eventually(lambda: follower.service.is_leader, 3 * LEASE_TTL_S, "follower leads")
    await asyncio.sleep(POLICY.offline_after_s)  # heartbeats continue: no false alarm
    assert await center.availability("s1") == ON
    await beats.stop()
    await center.wait_state("s1", OFF)

    assert await center.transitions("s1") == [(PEND, ON), (ON, DEG), (DEG, OFF)]
    assert [type(e.data) for e in await center.alarms("s1")] == [AlarmRaised]


# -- availability ---------------------------------------------------------------------------------


async def test_a_cut_link_takes_a_real_site_offline_and_back(center: Center) -> None:
    await center.start_replica()
    await center.add_and_onboard("s1")
    site = await asyncio.to_thread(center.topology.add_site, "s1", mqtt=False)
    beats = Heartbeats(await center.bus(site.url, "s1-agent", scope="s1"), "s1")
    beats.start()
    await center.wait_state("s1", ON)

    await asyncio.to_thread(center.topology.cut_link, "s1")
    await center.wait_state("s1", OFF)
    offline = await center.record("s1")
    await asyncio.to_thread(center.topology.restore_link, "s1")
    await center.wait_state("s1", ON)
    await beats.stop()

    assert await center.transitions("s1") == [(PEND, ON), (ON, DEG), (DEG, OFF), (OFF, ON)]
    assert offline is not None and "no heartbeat" in offline.availability_reason
    alarms = await center.alarms("s1")
    assert [type(e.data) for e in alarms] == [AlarmRaised, AlarmCleared]
    raised, cleared = alarms[0].data, alarms[1].data
    assert raised.alarm_id == cleared.alarm_id == "s1/site/site_offline"
    assert raised.severity == "major" and raised.entity == "site"
    record = await center.record("s1")
    assert record is not None and record.inventory is not None
    assert record.inventory.agent_version == "1.4.2"


async def test_an_unmanaged_site_goes_offline_without_an_alarm(center: Center) -> None:
    await center.start_replica()
    await center.add_and_onboard("quiet")
    await center.change("quiet", managed=False)
    beats = Heartbeats(await center.bus(center.url, "quiet", scope="quiet"), "quiet")
    beats.start()
    await center.wait_state("quiet", ON)
    await beats.stop()
    await center.wait_state("quiet", OFF)
    silent = await center.alarms("quiet")

    await center.change("quiet", managed=True)  # managed again while offline: alarm
    managed = await center.alarms("quiet")
    beats.start()
    await center.wait_state("quiet", ON)
    await beats.stop()

    assert silent == []
    assert [type(e.data) for e in managed] == [AlarmRaised]
    assert [type(e.data) for e in await center.alarms("quiet")] == [AlarmRaised, AlarmCleared]


async def test_bad_heartbeats_are_dead_lettered_not_believed(center: Center) -> None:
    await center.start_replica()
    await center.add_and_onboard("s1")
    rogue = await center.bus(center.url, "rogue", scope="s2")

    await Heartbeats(rogue, "s2", claimed_site="s1").send_one()  # s2 posing as s1
    await Heartbeats(rogue, "ghost").send_one()  # a site nobody added
    await rogue.nc.publish(subjects.up("s1", "heartbeat"), b"{not json")

    async def dead_lettered() -> set[str]:
        entries = await center.raw("DEADLETTER", "dlq.center.controller-heartbeat.")
        return {subject.rsplit(".", 1)[-1] for subject, _ in entries}

    await eventually(
        lambda: _has(dead_lettered(), {"site_mismatch", "unknown_site", "malformed"}),
        5,
        "three dead letters",
    )
    assert await center.availability("s1") == PEND  # none of them counted as s1 alive


async def _has(found: Awaitable[set[str]], wanted: set[str]) -> bool:
    return wanted <= await found


# -- the command line -----------------------------------------------------------------------------


async def run_cli(center: Center, *args: str) -> tuple[int, str, str]:
    """The installed `edgebus` script, without blocking the in-process controller."""
    process = await asyncio.create_subprocess_exec(
        str(EDGEBUS), *args, "--server", center.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_sites_cli_against_a_running_controller(center: Center) -> None:
    await center.start_replica()

    code, out, err = await run_cli(
        center, "sites", "add", "c1", "c2", "--group", "g1", "--label", "env=lab", "--json"
    )
    assert code == 0, err
    tokens = json.loads(out)["tokens"]
    await center.onboard("c1", BootstrapToken.decode(tokens["c1"]).secret)
    beats = Heartbeats(await center.bus(center.url, "c1", scope="c1"), "c1")
    beats.start()
    await center.wait_state("c1", ON)

    code, out, err = await run_cli(center, "sites", "list", "--json")
    assert code == 0, err
    listed = {row["site"]: row for row in json.loads(out)}
    code, table, _ = await run_cli(center, "sites", "list", "--state", "online")
    assert code == 0
    assert (await run_cli(center, "sites", "label", "c2", "tier=edge", "--remove", "env"))[0] == 0
    assert (await run_cli(center, "sites", "unmanage", "c2"))[0] == 0
    code, out, _ = await run_cli(center, "sites", "show", "c2", "--json")
    shown = json.loads(out)
    code_del, _, _ = await run_cli(center, "sites", "delete", "c2")
    code_missing, _, err_missing = await run_cli(center, "sites", "show", "c2")
    code_bad, _, err_bad = await run_cli(center, "sites", "label", "c1", "novalue")
    code_id, _, err_id = await run_cli(center, "sites", "add", "no spaces!")
    code_ttl, _, err_ttl = await run_cli(center, "sites", "add", "c3", "--ttl", "90d")
    await beats.stop()

    assert set(listed) == {"c1", "c2"}
    assert listed["c1"]["availability"] == "online" and listed["c1"]["onboarded_at"]
    assert listed["c1"]["inventory"]["agent_version"] == "1.4.2"
    assert listed["c2"]["availability"] == "pending" and listed["c2"]["group"] == "g1"
    assert "c1" in table and "c2" not in table and "1.4.2" in table
    assert shown["labels"] == {"tier": "edge"} and shown["managed"] is False
    assert code_del == 0
    assert code_missing == 1 and "no site c2" in err_missing
    assert code_bad == 2 and "key=value" in err_bad
    assert code_id == 2 and "invalid input" in err_id
    assert code_ttl == 2 and "token_ttl_s" in err_ttl
    assert await center.record("c3") is None


async def test_sites_cli_says_so_when_no_controller_answers(center: Center) -> None:
    code, _, err = await run_cli(center, "sites", "list", "--timeout", "2")

    assert code == 2
    assert "no controller answered" in err


# -- with per-site credentials (operator mode) -------------------------------------------------


async def test_with_an_authority_sites_get_their_own_credentials_and_delete_revokes_them(
    tmp_path: Path,
) -> None:
    authority = CredentialAuthority(tmp_path / "authority")
    topology = EdgeTopology(tmp_path / "edge", authority=authority)
    buses: list[Bus] = []

    async def connect_as(name: str, creds: Path, inbox: str | None = None) -> Bus:
        config = NatsConfig.from_url(
            topology.hub.url, name=name, credentials=creds, inbox_prefix=inbox,
            connect_timeout_s=5.0, reconnect=ReconnectPolicy(wait_s=0.1),
        )  # fmt: skip
        bus = await Bus.connect(config, scope="center")
        buses.append(bus)
        return bus

    try:
        await asyncio.to_thread(topology.start_hub)
        service_creds = topology.service_credentials("controller")
        controller_bus = await connect_as("controller", service_creds)
        system = await connect_as("system", topology.system_credentials())
        operator = await connect_as("operator", service_creds)
        config = ControllerConfig(
            policy=POLICY, public_urls=(topology.hub.url,), lease_ttl_s=LEASE_TTL_S,
            sweep_interval_s=0.05,
        )  # fmt: skip
        service = ControllerService(controller_bus, config, PushingAuthority(authority, system.nc))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.started.wait(), 15)

        added = await operator.request(OPS["add"], SitesAdd(sites=["s1"], group="g1"), SitesAdded)
        token = BootstrapToken.decode(added.data.tokens["s1"])
        assert token.bootstrap_creds  # a new site can reach the center with the token alone
        bootstrap_file = tmp_path / "bootstrap.creds"
        bootstrap_file.write_text(token.bootstrap_creds)
        newcomer = await connect_as(
            "newcomer", bootstrap_file, subjects.bootstrap_inbox_prefix("n1")
        )
        identity = SiteIdentity(tmp_path / "s1-identity")
        request = OnboardRequest(site="s1", token_secret=token.secret)
        with pytest.raises(RemoteError) as keyless:
            await newcomer.request(subjects.onboard(), request, OnboardReply)
        with_key = request.model_copy(update={"user_public_key": identity.public_key})
        reply = (await newcomer.request(subjects.onboard(), with_key, OnboardReply)).data
        assert reply.user_jwt is not None
        site_creds = identity.install(reply.user_jwt)
        agent = await connect_as("s1-agent", site_creds, subjects.site_inbox_prefix("s1"))
        beats = Heartbeats(agent, "s1")
        beats.start()

        async def online() -> bool:
            listed = await operator.request(OPS["query"], SitesQuery(site="s1"), SitesList)
            return bool(listed.data.sites) and listed.data.sites[0].availability == ON

        await eventually(online, 10, "s1 online with its own credentials")
        await operator.request(OPS["change"], SiteChange(site="s1", delete=True), SiteChanged)
        await eventually(lambda: agent.nc.is_closed, 5, "s1's connection revoked")
        await beats.stop()
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        for bus in reversed(buses):
            with contextlib.suppress(Exception):
                await bus.close()
        await asyncio.to_thread(topology.stop)

    assert keyless.value.code == "public_key_required"  # and the token was not spent on it
    claims = decode_jwt(reply.user_jwt)
    assert claims["sub"] == identity.public_key
    assert sorted(claims["nats"]["tags"]) == ["group:g1", "site:s1"]
    assert "revoked" in str(agent.nc.last_error)
    assert identity.public_key in authority.revocations
