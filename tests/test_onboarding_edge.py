"""Zero-touch onboarding and heartbeats, edge half: identity persistence and the token, then real
hubs and the real controller: refusals, retries, operator-mode creds, heartbeats over a cut link."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from bus import subjects
from bus.auth import CredentialAuthority, decode_jwt, read_creds_jwt
from bus.client import Bus
from bus.config import NatsConfig, ReconnectPolicy
from bus.natsserver import free_port
from bus.testing import EdgeTopology
from edge_agent.heartbeat import (
    HeartbeatSender,
    agent_heartbeat,
    build_inventory,
    inventory_from,
)
from edge_agent.heartbeat.sender import next_beat
from edge_agent.onboarding import (
    CenterUnreachable,
    IdentityError,
    OnboardingRefused,
    RetryPolicy,
    SiteIdentityRecord,
    load_identity,
    onboard,
    save_identity,
)
from edge_agent.onboarding.identity import center_urls_for, retry_delay, token_fingerprint
from edge_agent.supervisor import SiteSupervisor, agent_command, read_site_state
from edgebus.site import SiteToolError, prepare_site_run
from schemas import REGISTRY
from schemas.bootstrap import BootstrapToken
from schemas.controller import (
    Availability,
    Capacity,
    Load,
    SiteHeartbeat,
    SitesAdd,
    SitesAdded,
    SitesList,
    SitesQuery,
)
from services.controller.availability import AvailabilityPolicy
from services.controller.config import ControllerConfig
from services.controller.credentials import PushingAuthority
from services.controller.service import ControllerService

pytestmark = pytest.mark.timeout(90)

SECRET = "s3cr3t-" * 4
FAST_RETRY = RetryPolicy(min_s=0.1, max_s=0.4, connect_timeout_s=1.0, request_timeout_s=2.0)
HEARTBEAT_S = 0.2
# Stand-in agent for the supervisor (the leaf link is what is under test there).
STAND_IN = (
    sys.executable,
    "-c",
    "import signal,sys,time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
    "time.sleep(3600)",
)


# -- pure: token, identity.json, decisions -------------------------------------------------


def test_token_round_trip_and_malformed_tokens() -> None:
    token = BootstrapToken("s1", SECRET, ("nats://c1:4222", "nats://c2:4222"), "CREDS\nTEXT")
    text = token.encode()
    assert text.startswith("ebt1.") and "=" not in text
    assert BootstrapToken.decode(f"  {text}\n") == token
    assert BootstrapToken.decode(BootstrapToken("s1", SECRET).encode()).bootstrap_creds is None
    for bad in ("", "abc", "ebt1.", "ebt1.!!!!", "ebt1.WzEsMl0", "ebt1.eyJzaXRlIjoiczEifQ"):
        with pytest.raises(ValueError):  # not ours, not base64, a JSON list, no secret
            BootstrapToken.decode(bad)


def _record(site: str = "s1", credentials: Path | None = None) -> SiteIdentityRecord:
    return SiteIdentityRecord(
        site=site,
        group="g1",
        labels={"region": "eu"},
        leaf_urls=("nats-leaf://center:7422",),
        heartbeat_interval_s=15.0,
        onboarded_at=datetime(2026, 11, 22, 3, 0, tzinfo=UTC),
        credentials=credentials,
        user_public_key="UABC" if credentials else None,
        center_urls=("nats://center:4222",),
        token_sha256=token_fingerprint(SECRET),
        desired_config={"rev": 1},
    )


def test_identity_round_trip_survives_a_moved_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "site"
    record = _record(credentials=data_dir / "identity" / "site.creds")
    path = save_identity(data_dir, record)
    stored = json.loads(path.read_text())
    assert stored["credentials"] == "identity/site.creds"  # relative on disk
    assert stored["format"] == 1 and stored["token_sha256"] == token_fingerprint(SECRET)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record.credentials is not None
    resolved = record.model_copy(update={"credentials": record.credentials.resolve()})
    assert load_identity(data_dir, "s1") == resolved
    moved = tmp_path / "elsewhere"
    data_dir.rename(moved)
    loaded = load_identity(moved)
    assert loaded is not None and loaded.credentials == moved.resolve() / "identity/site.creds"
    assert load_identity(tmp_path / "never-onboarded") is None
    no_auth = _record()
    save_identity(moved, no_auth)
    assert load_identity(moved) == no_auth


def test_identity_of_another_site_or_unreadable_is_an_error(tmp_path: Path) -> None:
    save_identity(tmp_path, _record("s1"))
    with pytest.raises(IdentityError, match="not 's2'"):
        load_identity(tmp_path, "s2")
    (tmp_path / "identity.json").write_text("{half a file")
    with pytest.raises(IdentityError, match="unreadable"):
        load_identity(tmp_path)
    (tmp_path / "identity.json").write_text(json.dumps({"format": 99, "site": "s1"}))
    with pytest.raises(IdentityError, match="format"):
        load_identity(tmp_path)


def test_center_url_flag_wins_and_leaf_urls_are_refused() -> None:
    token = BootstrapToken("s1", SECRET, ("nats://from-token:4222",))
    assert center_urls_for(token, None) == ("nats://from-token:4222",)
    assert center_urls_for(token, "nats://a:1, nats://b:2") == ("nats://a:1", "nats://b:2")
    with pytest.raises(ValueError, match="no center URL"):
        center_urls_for(BootstrapToken("s1", SECRET), None)
    with pytest.raises(ValueError, match="leaf-node URL"):
        center_urls_for(token, "nats-leaf://center:7422")


def test_backoff_and_heartbeat_schedule() -> None:
    assert [retry_delay(n, 0.5, 4.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert next_beat(10.0, 2.0, 9.0) == 10.0
    assert next_beat(10.0, 2.0, 10.0) == 12.0
    assert next_beat(10.0, 2.0, 11.9) == 12.0
    assert next_beat(10.0, 2.0, 17.5) == 18.0  # a stall skips the missed slots, no burst


def test_inventory_from_the_agents_parts(tmp_path: Path) -> None:
    capacity = Capacity(cores=2, memory_bytes=4 << 30, disk_bytes=100 << 30)
    load = Load(cpu_percent=12.5, load1=0.7, memory_used_bytes=1 << 30, disk_used_bytes=5 << 30)
    snapshot = {"depth": 1234, "oldest_unsent_age_s": 42.5, "link_up": False}
    inventory = inventory_from("1.2.3", 17, snapshot, 0, capacity, load)
    assert (inventory.agent_version, inventory.device_count) == ("1.2.3", 17)
    assert (inventory.replay_backlog, inventory.replay_oldest_unsent_age_s) == (1234, 42.5)
    assert (inventory.capacity, inventory.load, inventory.function_count) == (capacity, load, 0)
    # Before the replay monitor's first check, with nothing owed, or with garbage: zeros.
    for odd in ({}, {"depth": 0, "oldest_unsent_age_s": None}, {"depth": "x", "oldest": -1}):
        empty = inventory_from("v" * 100, -3, odd, -1, capacity, load)
        assert (empty.replay_backlog, empty.replay_oldest_unsent_age_s) == (0, 0.0)
        assert (empty.device_count, empty.function_count) == (0, 0)
        assert len(empty.agent_version) == 64
    real = build_inventory("1.2.3", 3, snapshot, 1, tmp_path / "not-yet-created")
    assert real.capacity.cores >= 1 and real.capacity.memory_bytes > real.load.memory_used_bytes
    assert 0 < real.load.disk_used_bytes <= real.capacity.disk_bytes


def test_site_run_plan_from_identity_token_or_development(tmp_path: Path) -> None:
    data_dir = tmp_path / "s1"
    dev = prepare_site_run(site="s1", center="nats-leaf://c:7422", token=None, data_dir=data_dir)
    assert (dev.center_leaf_url, dev.leaf_credentials, dev.heartbeat_interval_s) == (
        "nats-leaf://c:7422",
        None,
        None,
    )
    with pytest.raises(SiteToolError, match="--token"):
        prepare_site_run(site="s1", center=None, token=None, data_dir=data_dir)

    creds = data_dir / "identity" / "site.creds"
    save_identity(data_dir, _record(credentials=creds))
    # Onboarded: no token, no center needed; the identity says where and with what.
    for token in (None, BootstrapToken("s1", "another-secret-entirely", ("nats://gone:1",))):
        config = prepare_site_run(site=None, center=None, token=token, data_dir=data_dir)
        assert config.site == "s1" and config.center_leaf_url == "nats-leaf://center:7422"
        assert config.leaf_credentials == creds.resolve() and config.heartbeat_interval_s == 15.0
        argv = agent_command(config, "nats://127.0.0.1:1", data_dir / "agent")
        assert argv[argv.index("--heartbeat-interval-s") + 1] == "15.0"
    override = prepare_site_run(
        site=None, center=None, token=None, data_dir=data_dir, leaf_url="nats-leaf://lb:7422"
    )
    assert override.center_leaf_url == "nats-leaf://lb:7422"
    with pytest.raises(SiteToolError, match="does not match"):
        prepare_site_run(
            site="s2", center=None, token=BootstrapToken("s1", SECRET), data_dir=data_dir
        )
    with pytest.raises(SiteToolError, match="not 's2'"):
        prepare_site_run(
            site=None, center=None, token=BootstrapToken("s2", SECRET), data_dir=data_dir
        )
    save_identity(data_dir, _record().model_copy(update={"leaf_urls": ()}))
    with pytest.raises(SiteToolError, match="--leaf-url"):
        prepare_site_run(site=None, center=None, token=None, data_dir=data_dir)


async def test_nothing_listening_gives_up_at_the_timeout(tmp_path: Path) -> None:
    token = BootstrapToken("s1", SECRET, (f"nats://127.0.0.1:{free_port()}",))
    started = time.monotonic()
    with pytest.raises(CenterUnreachable, match="within the timeout"):
        await onboard(token, tmp_path, timeout_s=1.0, retry=FAST_RETRY)
    assert 0.5 < time.monotonic() - started < 3.0
    assert load_identity(tmp_path) is None


# -- real hub + real controller --------------------------------------------------------------


async def connect(url: str, name: str, creds: Path | None = None, scope: str = "center") -> Bus:
    config = NatsConfig.from_url(
        url,
        name=name,
        credentials=creds,
        connect_timeout_s=5.0,
        reconnect=ReconnectPolicy(wait_s=0.1),
    )
    return await Bus.connect(config, scope=scope)


@dataclass
class Center:
    """A hub with the real controller service, and an operator connection to it."""

    topology: EdgeTopology
    operator: Bus
    service: ControllerService
    authority: CredentialAuthority | None
    _stop: asyncio.Event
    _task: asyncio.Task[None]
    _buses: list[Bus] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.topology.hub.url

    async def tokens(self, *sites: str, ttl_s: float = 600.0) -> dict[str, BootstrapToken]:
        added = await self.operator.request(
            subjects.control("controller", "sites", "add"),
            SitesAdd(sites=list(sites), token_ttl_s=ttl_s),
            SitesAdded,
        )
        tokens = {site: BootstrapToken.decode(t) for site, t in added.data.tokens.items()}
        if self.authority is not None:
            # What the center is to embed in each token in operator mode.
            creds = self.authority.issue_bootstrap_credentials()
            tokens = {s: replace(t, bootstrap_creds=creds) for s, t in tokens.items()}
        return tokens

    async def record(self, site: str) -> Any:
        listed = await self.operator.request(
            subjects.control("controller", "sites", "query"), SitesQuery(site=site), SitesList
        )
        return listed.data.sites[0] if listed.data.sites else None

    async def stop_controller(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 15)


@asynccontextmanager
async def running_center(
    base: Path, *, authority: CredentialAuthority | None = None
) -> AsyncIterator[Center]:
    topology = EdgeTopology(base / "edge", authority=authority)
    buses: list[Bus] = []
    try:
        await asyncio.to_thread(topology.start_hub)
        hub = topology.hub
        service_creds = topology.service_credentials() if authority else None
        controller_bus = await connect(hub.url, "controller", service_creds)
        operator = await connect(hub.url, "operator", service_creds)
        buses += [controller_bus, operator]
        site_authority = None
        if authority is not None:
            system = await connect(hub.url, "system", topology.system_credentials())
            buses.append(system)
            site_authority = PushingAuthority(authority, system.nc)
        config = ControllerConfig(
            policy=AvailabilityPolicy.for_interval(HEARTBEAT_S, offline_after_s=2.0),
            public_urls=(hub.url,),
            leaf_urls=(hub.leaf_url,),
            lease_ttl_s=1.0,
            sweep_interval_s=0.05,
            persist_every_s=0.5,
        )
        service = ControllerService(controller_bus, config, site_authority)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.started.wait(), 15)
        center = Center(topology, operator, service, authority, stop, task, buses)
        try:
            yield center
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=15)
    finally:
        for bus in reversed(buses):
            await bus.close()
        await asyncio.to_thread(topology.stop)


async def test_onboards_once_then_restarts_never_contact_the_center(tmp_path: Path) -> None:
    data_dir = tmp_path / "site"
    async with running_center(tmp_path) as center:
        token = (await center.tokens("s1"))["s1"]
        started = time.monotonic()
        identity = await onboard(token, data_dir, retry=FAST_RETRY)
        first_ms = (time.monotonic() - started) * 1e3
        more = await center.tokens(*(f"lat{i}" for i in range(5)))
        timings = []
        for site, other in more.items():
            started = time.monotonic()
            await onboard(other, tmp_path / site, retry=FAST_RETRY)
            timings.append((time.monotonic() - started) * 1e3)
        print(
            f"\nonboarding (no auth): first {first_ms:.1f} ms, next five median "
            f"{statistics.median(timings):.1f} ms (max {max(timings):.1f})"
        )
        assert identity.site == "s1" and identity.group == "default"
        assert identity.leaf_urls == (center.topology.hub.leaf_url,)
        assert identity.heartbeat_interval_s == HEARTBEAT_S
        assert identity.credentials is None  # a center without auth issues no JWT
        assert load_identity(data_dir, "s1") == identity
        assert (data_dir / "identity" / "site.nk").exists()  # the key stayed here
        record = await center.record("s1")
        assert record.onboarded_at is not None and record.inventory is not None
        assert record.inventory.capacity.cores >= 1
    # The center is gone entirely: a restart still has everything, at once.
    started = time.monotonic()
    again = await onboard(token, data_dir, timeout_s=0.5, retry=FAST_RETRY)
    assert again == identity and time.monotonic() - started < 0.5


async def test_refused_tokens_fail_at_once_with_their_reason(tmp_path: Path) -> None:
    async with running_center(tmp_path) as center:
        tokens = await center.tokens("s1", "s2")
        short = (await center.tokens("s3", ttl_s=0.05))["s3"]
        await onboard(tokens["s1"], tmp_path / "s1", retry=FAST_RETRY)
        cases = {
            "token_used": (tokens["s1"], tmp_path / "s1-copy"),
            "token_wrong": (replace(tokens["s2"], secret="x" * 32), tmp_path / "s2"),
            "token_unknown": (replace(tokens["s2"], site="nobody"), tmp_path / "nobody"),
            "token_expired": (short, tmp_path / "s3"),
        }
        await asyncio.sleep(0.1)  # s3's token has expired by now
        for code, (token, data_dir) in cases.items():
            started = time.monotonic()
            with pytest.raises(OnboardingRefused) as refused:
                await onboard(token, data_dir, timeout_s=30.0, retry=FAST_RETRY)
            elapsed = time.monotonic() - started
            print(f"\n{code}: {refused.value}")
            assert refused.value.code == code
            assert token.site in refused.value.message
            assert elapsed < 2.0  # not retried: a refused token will not become valid
            assert load_identity(data_dir) is None
        # The refused s2 attempt did not spend s2's real token.
        assert (await onboard(tokens["s2"], tmp_path / "s2", retry=FAST_RETRY)).site == "s2"


async def test_center_down_at_boot_then_up_onboards_after_retries(tmp_path: Path) -> None:
    async with running_center(tmp_path) as center:
        token = (await center.tokens("s1"))["s1"]
        await center.stop_controller()
        hub = center.topology.hub
        await asyncio.to_thread(hub.stop)
        with capture_logs() as logs:
            task = asyncio.create_task(
                onboard(token, tmp_path / "site", timeout_s=30.0, retry=FAST_RETRY)
            )
            await asyncio.sleep(1.0)  # the site boots before its center is reachable
            assert not task.done()
            await asyncio.to_thread(hub.start)
            await asyncio.sleep(0.8)  # the server is back, the controller not yet
            assert not task.done()
            controller_bus = await connect(hub.url, "controller-2")
            center._buses.append(controller_bus)
            service = ControllerService(controller_bus, center.service.config)
            stop = asyncio.Event()
            run = asyncio.create_task(service.run(stop))
            try:
                identity = await asyncio.wait_for(task, 20)
            finally:
                stop.set()
                await asyncio.wait({run}, timeout=15)
    retries = [e["error"] for e in logs if e["event"] == "onboarding_retry"]
    print(f"\n{len(retries)} retries: {sorted(set(retries))}")
    assert identity.site == "s1" and load_identity(tmp_path / "site") == identity
    assert any("could not connect" in error for error in retries)
    assert any("no controller answers" in error for error in retries)


async def test_operator_mode_site_links_with_its_installed_creds_and_heartbeats(
    tmp_path: Path,
) -> None:
    authority = CredentialAuthority(tmp_path / "authority")
    async with running_center(tmp_path, authority=authority) as center:
        tokens = await center.tokens("s1")
        # Without the token's bootstrap creds the center's server says no, at once.
        with pytest.raises(OnboardingRefused) as refused:
            await onboard(
                replace(tokens["s1"], bootstrap_creds=None),
                tmp_path / "nocreds",
                timeout_s=20.0,
                retry=FAST_RETRY,
            )
        assert refused.value.code == "bootstrap_unauthorized"

        data_dir = tmp_path / "site"
        started = time.monotonic()
        identity = await onboard(tokens["s1"], data_dir, retry=FAST_RETRY)
        print(f"\nonboarding (operator mode): {(time.monotonic() - started) * 1e3:.1f} ms")
        assert identity.credentials is not None
        user_jwt = read_creds_jwt(identity.credentials.read_text())
        assert decode_jwt(user_jwt)["sub"] == identity.user_public_key
        assert decode_jwt(user_jwt)["nats"]["tags"] == ["site:s1", "group:default"]
        seed = (data_dir / "identity" / "site.nk").read_bytes().strip()
        assert seed.decode() in identity.credentials.read_text()  # installed with its own seed
        assert not list((data_dir / "identity").glob(".bootstrap-*"))  # no creds left behind

        # `edgebus site run` as the CLI plans it: no token needed any more.
        config = prepare_site_run(
            site=None,
            center=None,
            token=None,
            data_dir=data_dir,
            agent_argv=STAND_IN,
            leaf_reconnect_s=0.25,
        )
        assert config.leaf_credentials == identity.credentials
        supervisor = SiteSupervisor(config)
        thread = threading.Thread(target=supervisor.run, name="site-s1", daemon=True)
        thread.start()
        try:
            hub = center.topology.hub
            await wait_until(lambda: "s1" in hub.leaf_names(), 20, "s1 leaf never linked")
            state = read_site_state(data_dir)
            site_bus = await connect(state.nats_url, "site-local", scope="s1")
            center._buses.append(site_bus)
            # The leaf carries only what s1's own JWT allows.
            seen: list[Msg] = []

            async def on_up(msg: Msg) -> None:
                seen.append(msg)

            await center.operator.nc.subscribe("up.>", cb=on_up)
            await center.operator.nc.flush()
            sender = HeartbeatSender(
                site_bus,
                "s1",
                HEARTBEAT_S,
                lambda: build_inventory("9.9.9", 5, {"depth": 3}, 0, data_dir),
            )
            stop = asyncio.Event()
            beats = asyncio.create_task(sender.run(stop))
            await site_bus.nc.publish(subjects.up("s2", "heartbeat"), b"forged")
            await wait_until(lambda: len(seen) >= 3, 10, "no heartbeats at the center")
            assert {m.subject for m in seen} == {"up.s1.heartbeat"}
            # The real controller took them: s1 is online with the reported inventory.
            await wait_until_async(
                lambda: _online(center, "s1"), 10, "controller never saw s1 online"
            )
            record = await center.record("s1")
            assert record.inventory.agent_version == "9.9.9"
            assert (record.inventory.device_count, record.inventory.replay_backlog) == (5, 3)
            stop.set()
            await beats
        finally:
            supervisor.request_stop()
            await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive()


async def _online(center: Center, site: str) -> bool:
    record = await center.record(site)
    return record is not None and record.availability == Availability.ONLINE


async def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            pytest.fail(f"after {within}s: {what}")
        await asyncio.sleep(0.05)


async def wait_until_async(check: Callable[[], Any], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"after {within}s: {what}")
        await asyncio.sleep(0.05)


# -- heartbeats through a real leaf link -----------------------------------------------------


async def test_heartbeats_at_the_interval_stop_when_the_link_is_cut_and_survive_faults(
    edge_topology: EdgeTopology, tmp_path: Path
) -> None:
    site = await asyncio.to_thread(edge_topology.add_site, "s1", mqtt=False)
    center = await connect(edge_topology.hub.url, "center")
    arrivals: list[tuple[float, SiteHeartbeat]] = []

    async def on_heartbeat(msg: Msg) -> None:
        event = REGISTRY.decode_as(msg.data, SiteHeartbeat)
        arrivals.append((time.monotonic(), event.data))

    await center.nc.subscribe(subjects.up_each("heartbeat"), cb=on_heartbeat)
    await center.nc.flush()
    agent_bus = await connect(site.url, "agent", scope="s1")
    snapshot: dict[str, Any] = {}
    sender = agent_heartbeat(
        agent_bus,
        "s1",
        interval_s=HEARTBEAT_S,
        data_dir=tmp_path,
        agent_version="1.0.0",
        device_count=lambda: 7,
        replay_snapshot=lambda: snapshot,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        await wait_for_count(arrivals, 8, 10)
        times = [t for t, _ in arrivals]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        print(
            f"\nheartbeat gaps: median {statistics.median(gaps) * 1e3:.0f} ms, "
            f"min {min(gaps) * 1e3:.0f}, max {max(gaps) * 1e3:.0f}"
        )
        assert 0.15 < statistics.median(gaps) < 0.3
        beats = [hb for _, hb in arrivals]
        assert [hb.seq for hb in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
        first = beats[0].inventory
        assert (first.agent_version, first.device_count, first.replay_backlog) == ("1.0.0", 7, 0)
        assert first.capacity.cores >= 1 and first.capacity.disk_bytes > 0
        snapshot.update(depth=250, oldest_unsent_age_s=12.0)  # read at every beat
        await wait_until(lambda: arrivals[-1][1].inventory.replay_backlog == 250, 5, "stale")
        assert arrivals[-1][1].inventory.replay_oldest_unsent_age_s == 12.0

        # Link cut: the site's server drops them (no interest across the leaf); none queue up.
        await asyncio.to_thread(edge_topology.cut_link, "s1")
        cut_at, sent_before = time.monotonic(), sender.stats().sent
        await asyncio.sleep(6 * HEARTBEAT_S)
        assert [t for t, _ in arrivals if t > cut_at + HEARTBEAT_S] == []
        assert sender.stats().sent >= sent_before + 4 and not task.done()
        last_seq = arrivals[-1][1].seq
        await asyncio.to_thread(edge_topology.restore_link, "s1")
        count = len(arrivals)
        await wait_for_count(arrivals, count + 2, 10)
        resumed = arrivals[count][1].seq
        print(f"link cut: last seq {last_seq}, resumed at {resumed}")
        assert resumed >= last_seq + 5  # the gap shows the center what it missed

        # The site's own server dies (kill -9): skipped, never raised; resumes after.
        await asyncio.to_thread(site.kill)
        await asyncio.sleep(4 * HEARTBEAT_S)
        assert sender.stats().skipped >= 2 and not task.done()
        await asyncio.to_thread(site.start)
        await asyncio.to_thread(edge_topology.wait_link_up, "s1")
        count = len(arrivals)
        await wait_for_count(arrivals, count + 2, 15)
        assert all(hb.sent_at > datetime.now(UTC).replace(year=2000) for _, hb in arrivals)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await agent_bus.close()
        await center.close()
    assert task.exception() is None


async def wait_for_count(items: list[Any], count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while len(items) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"after {within}s: {len(items)} of {count} heartbeats")
        await asyncio.sleep(0.02)


# -- `edgebus site run --token` as a real command ----------------------------------------------

EDGEBUS = Path(sys.executable).parent / "edgebus"


def _site_run(log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(EDGEBUS), "--log-level", "info", "site", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _print_logs(*paths: Path) -> None:
    """Shown by pytest only when the test fails: what the site said about itself."""
    for path in paths:
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-40:]
            print(f"--- {path} (last {len(tail)} lines)", *tail, sep="\n")


def _agent_cmdline(data_dir: Path) -> list[str]:
    pid = read_site_state(data_dir).children["agent"].pid
    return list(psutil.Process(pid).cmdline()) if pid else []


async def test_site_run_with_a_token_onboards_links_and_restarts_without_it(
    tmp_path: Path,
) -> None:
    authority = CredentialAuthority(tmp_path / "authority")
    data_dir = tmp_path / "site"
    async with running_center(tmp_path, authority=authority) as center:
        hub = center.topology.hub
        token = (await center.tokens("s1"))["s1"]
        token_file = tmp_path / "token"
        token_file.write_text(token.encode() + "\n")
        common = ("--data-dir", str(data_dir), "--leaf-reconnect-s", "0.25")
        proc = _site_run(tmp_path / "run1.log", "--token-file", str(token_file), *common)
        try:
            await wait_until(lambda: "s1" in hub.leaf_names(), 30, "site never linked")
            identity = load_identity(data_dir, "s1")
            assert identity is not None and identity.credentials is not None
            assert read_site_state(data_dir).center_leaf_url == hub.leaf_url
            await wait_until(lambda: bool(_agent_cmdline(data_dir)), 15, "no agent")
            argv = _agent_cmdline(data_dir)
            assert argv[argv.index("--heartbeat-interval-s") + 1] == str(HEARTBEAT_S)
        finally:
            _print_logs(tmp_path / "run1.log", data_dir / "nats" / "s1.log")
            assert _stop(proc) == 0
        await wait_until(lambda: "s1" not in hub.leaf_names(), 10, "leaf still linked")

        # A spent token in a fresh data dir: refused with the reason, exit code 3.
        refused = await asyncio.to_thread(
            subprocess.run,
            [
                str(EDGEBUS),
                "site",
                "run",
                "--token",
                token.encode(),
                "--center",
                hub.url,
                "--data-dir",
                str(tmp_path / "fresh"),
                "--onboard-timeout-s",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "token_used" in refused.stdout, refused.stdout

        # The controller is gone and the token spent: a restart with the same command line
        # (token still given) does not onboard again; it runs from identity.json.
        await center.stop_controller()
        proc = _site_run(tmp_path / "run2.log", "--token-file", str(token_file), *common)
        try:
            await wait_until(lambda: "s1" in hub.leaf_names(), 30, "restarted site never linked")
            assert load_identity(data_dir, "s1") == identity
        finally:
            assert _stop(proc) == 0
