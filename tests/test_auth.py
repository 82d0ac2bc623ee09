"""Per-site NATS credentials (operator mode): JWT mechanics, then real hub + leaf sites proving
a site cannot impersonate another, read another's commands or replies, or outlive revocation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import ServiceUnavailableError

from bus import subjects
from bus.auth import (
    SITE_ROLE,
    AuthError,
    CredentialAuthority,
    KeyKind,
    SiteIdentity,
    account_claims,
    account_lookup,
    creds_text,
    decode_jwt,
    encode_jwt,
    new_seed,
    public_key,
    push_account_update,
    read_creds_jwt,
    site_user_claims,
    verify_jwt,
    write_private,
)
from bus.client import connect_options
from bus.config import NatsConfig, ReconnectPolicy
from bus.streams import ensure_stream, ensure_uplink_streams, site_events_stream
from bus.testing import EdgeTopology

pytestmark = pytest.mark.timeout(60)

GROUPS = {"s1": ("g1",), "s2": ("g2", "g3")}  # s2: two group tags (multi-valued tag)
CONNECT_BOUND_S = 5.0  # every first connect is bounded (nats-py retries ~1 min otherwise)
REVOCATION_BOUND_S = 1.0  # measured ~3 ms; generous for a loaded 2-core machine
QUIET_S = 0.3  # how long "nothing more arrives" is watched
# How a refused request looks from nats-py: dropped (timeout) or no interest (503).
NOT_ANSWERED = (NatsTimeout, NoRespondersError, ServiceUnavailableError)


# -- unit: JWT, claims, keys (no server) ------------------------------------------------


def _part(token: str, index: int) -> dict[str, Any]:
    raw = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    return decoded


def test_jwt_round_trip_verifies_with_the_issuer_nkey() -> None:
    issuer = new_seed(KeyKind.ACCOUNT)
    user = public_key(new_seed(KeyKind.USER))
    claims = site_user_claims(user, site="s1", groups=["g1"], account="AXXX")

    token = encode_jwt(claims, issuer, iat=1_700_000_000)

    header_b64, payload_b64, sig_b64 = token.split(".")
    assert "=" not in token  # base64url without padding
    assert _part(token, 0) == {"typ": "JWT", "alg": "ed25519-nkey"}
    decoded = decode_jwt(token)
    assert decoded["sub"] == user and decoded["iss"] == public_key(issuer)
    assert decoded["iat"] == 1_700_000_000
    assert decoded["nats"]["tags"] == ["site:s1", "group:g1"]
    assert decoded["nats"]["issuer_account"] == "AXXX"
    # jti = base32(SHA-512/256(claims with an empty jti))
    unsigned = dict(decoded, jti="")
    digest = hashlib.new("sha512_256", json.dumps(unsigned, separators=(",", ":")).encode())
    assert decoded["jti"] == base64.b32encode(digest.digest()).rstrip(b"=").decode()
    # The signature checks with nkeys' own verify over "header.payload".
    signature = base64.urlsafe_b64decode(sig_b64 + "=" * (-len(sig_b64) % 4))
    assert nkeys.from_seed(bytearray(issuer)).verify(
        f"{header_b64}.{payload_b64}".encode(), signature
    )
    assert verify_jwt(token, public_key(issuer)) == decoded


def test_tampered_or_foreign_jwts_are_detected() -> None:
    issuer = new_seed(KeyKind.ACCOUNT)
    user = public_key(new_seed(KeyKind.USER))
    token = encode_jwt(site_user_claims(user, site="s1", groups=["g1"], account="AXXX"), issuer)
    header, _, sig = token.split(".")
    forged_claims = _part(token, 1)
    forged_claims["nats"]["tags"] = ["site:s2", "group:g1"]
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=")
    tampered = f"{header}.{forged_payload.decode()}.{sig}"

    with pytest.raises(AuthError, match="signature"):
        verify_jwt(tampered)
    with pytest.raises(nkeys.ErrInvalidSignature):
        nkeys.from_seed(bytearray(issuer)).verify(
            f"{header}.{forged_payload.decode()}".encode(),
            base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)),
        )
    with pytest.raises(AuthError, match="expected"):
        verify_jwt(token, public_key(new_seed(KeyKind.ACCOUNT)))
    with pytest.raises(AuthError):
        site_user_claims("UNOTAKEY", site="s1", groups=[], account="AXXX")
    with pytest.raises(AuthError, match="user public key"):  # an account key is not a user
        site_user_claims(public_key(issuer), site="s1", groups=[], account="AXXX")


def test_site_role_template_is_exactly_the_site_permission_set(tmp_path: Path) -> None:
    authority = CredentialAuthority(tmp_path / "authority")
    account = decode_jwt(authority.account_jwt())
    assert account["iss"] == authority.operator_key
    plain_key, scope = account["nats"]["signing_keys"]
    assert isinstance(plain_key, str) and scope["role"] == SITE_ROLE
    template = scope["template"]
    assert template["pub"] == {"allow": ["up.{{tag(site)}}.>", "_INBOX_center.{{tag(site)}}.>"]}
    assert template["sub"] == {
        "allow": [
            "down.{{tag(site)}}.>",
            "down.all.>",
            "down.group.{{tag(group)}}.>",
            "_INBOX.{{tag(site)}}.>",
        ]
    }
    # Rendered for one site, the set covers the subject functions that site uses...
    perms = subjects.site_permissions("s1", ("g1",))
    assert f"{subjects.site_inbox_prefix('s1')}.>" in perms.subscribe
    assert f"{subjects.center_inbox_prefix('s1')}.>" in perms.publish
    assert subjects.up("s1", "reading", "d1", "t").startswith("up.s1.")
    for subject in (subjects.down_site("s1", "cfg"), subjects.down_group("g1", "cfg")):
        assert subject.rsplit(".", 1)[0] + ".>" in perms.subscribe
    # ...and none of the wide grants that leaked in earlier experiments.
    for wide in (">", "_INBOX.>", "$JS.API.>", "down.>", "up.>"):
        assert wide not in perms.publish + perms.subscribe
    # Site ids that would alias the broadcast levels are refused before any JWT exists.
    for reserved in ("group", "all", "center", "s1.>", "*"):
        with pytest.raises(subjects.SubjectError):
            authority.issue_site_credentials(reserved, "g1", public_key(new_seed(KeyKind.USER)))
    enabled = CredentialAuthority(tmp_path / "authority", site_jetstream_from_center=True)
    scope = decode_jwt(enabled.account_jwt())["nats"]["signing_keys"][1]
    assert "$JS.{{tag(site)}}.API.>" in scope["template"]["sub"]["allow"]


def test_onboarding_keeps_the_seed_on_the_site(tmp_path: Path) -> None:
    authority = CredentialAuthority(tmp_path / "authority")
    site = SiteIdentity(tmp_path / "site")
    user_jwt = authority.issue_site_credentials("s1", "g1", site.public_key)

    claims = verify_jwt(user_jwt)
    assert claims["sub"] == site.public_key
    assert claims["nats"]["issuer_account"] == authority.edge_account
    assert claims["nats"]["tags"] == ["site:s1", "group:g1"]
    assert "pub" not in claims["nats"] and "sub" not in claims["nats"]  # scoped: none own
    assert site.seed_path.read_bytes().decode() not in user_jwt
    creds = site.install(user_jwt)
    assert read_creds_jwt(creds.read_text()) == user_jwt
    for secret in (creds, site.seed_path, *(tmp_path / "authority").glob("*.nk")):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    with pytest.raises(AuthError, match="another key"):
        SiteIdentity(tmp_path / "other").install(user_jwt)
    # Keys persist: a reloaded authority is the same operator and account.
    again = CredentialAuthority(tmp_path / "authority")
    assert (again.operator_key, again.edge_account) == (
        authority.operator_key,
        authority.edge_account,
    )
    # A revoked key cannot be re-issued; the site rotates its keypair instead.
    first = authority.account_jwt()
    revoked = authority.revoke(site.public_key)
    assert decode_jwt(revoked)["iat"] > decode_jwt(first)["iat"]
    assert site.public_key in decode_jwt(revoked)["nats"]["revocations"]
    with pytest.raises(AuthError, match="revoked"):
        authority.issue_site_credentials("s1", "g1", site.public_key)
    assert authority.issue_site_credentials("s1", "g1", site.rotate())


# -- real servers: hub in operator mode, sites as leaf nodes with their own creds ---------


class ConnectRefused(ConnectionError):
    """A bounded first connect that did not succeed (the reason is in the message)."""


@dataclass
class Client:
    nc: NatsClient
    errors: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    closed_at: list[float] = field(default_factory=list)  # time.monotonic() of the close

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]


class Clients:
    """Bounded connections built by bus.client.connect_options (so NatsConfig's
    credentials/inbox_prefix are what is exercised); every one is closed at teardown."""

    def __init__(self) -> None:
        self._all: list[Client] = []

    async def connect(
        self,
        url: str,
        *,
        creds: Path | None = None,
        inbox: str | None = None,
        reconnect: bool = False,
    ) -> Client:
        errors: list[str] = []
        closed = asyncio.Event()
        closed_at: list[float] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        async def on_closed() -> None:
            closed_at.append(time.monotonic())
            closed.set()

        config = NatsConfig.from_url(
            url,
            name=f"test-{uuid.uuid4().hex[:6]}",
            credentials=creds,
            inbox_prefix=inbox,
            connect_timeout_s=CONNECT_BOUND_S,
            reconnect=ReconnectPolicy(max_attempts=-1 if reconnect else 0, wait_s=0.1),
        )
        options = connect_options(config)
        # A refused first connect must fail fast with its reason: with reconnects on,
        # nats-py keeps retrying an auth refusal until the bound and the reason is lost.
        options["allow_reconnect"] = reconnect
        try:
            nc = await asyncio.wait_for(
                nats.connect(**options, error_cb=on_error, closed_cb=on_closed), CONNECT_BOUND_S
            )
        except Exception as exc:
            raise ConnectRefused(f"{exc!r}; errors: {errors}") from exc
        client = Client(nc, errors, closed, closed_at)
        self._all.append(client)
        return client

    async def close(self) -> None:
        for client in self._all:
            if not client.nc.is_closed:
                await client.nc.close()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    pool = Clients()
    try:
        yield pool
    finally:
        await pool.close()


@dataclass
class Deployment:
    topology: EdgeTopology
    authority: CredentialAuthority
    creds: dict[str, Path]

    @property
    def hub_url(self) -> str:
        return self.topology.hub.url

    def site_url(self, site: str) -> str:
        return self.topology.site(site).url


@contextmanager
def _deploy(
    base: Path, authority: CredentialAuthority, groups: dict[str, tuple[str, ...]]
) -> Iterator[Deployment]:
    topology = EdgeTopology(base / "edge", authority=authority)
    try:
        topology.start_hub()
        creds = {site: topology.site_credentials(site, g) for site, g in groups.items()}
        for site, path in creds.items():
            topology.add_site(site, credentials=path, mqtt=False)
        yield Deployment(topology, authority, creds)
    finally:
        topology.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Hub (operator mode) + sites s1 (group g1) and s2 (groups g2, g3), each onboarded:
    the site made its keypair, the authority signed its public key."""
    with _deploy(tmp_path, CredentialAuthority(tmp_path / "authority"), GROUPS) as deployment:
        yield deployment


async def collector(client: Client, subject: str) -> list[Msg]:
    received: list[Msg] = []

    async def on_message(msg: Msg) -> None:
        received.append(msg)

    await client.nc.subscribe(subject, cb=on_message)
    await client.nc.flush()
    return received


async def wait_for(condition: Any, within: float, what: str) -> float:
    """Poll `condition()` every 5 ms; the seconds it took, or fail the test."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            pytest.fail(f"after {within}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def delivered(pub: Client, subject: str, received: list[Msg], within: float = 5.0) -> bytes:
    """Publish one unique probe until it shows up (interest crosses the leaf link
    asynchronously); then everything published before it on `pub` has been routed."""
    probe = uuid.uuid4().hex.encode()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        await pub.nc.publish(subject, probe)
        await pub.nc.flush()
        for _ in range(20):
            if any(m.data == probe for m in received):
                return probe
            await asyncio.sleep(0.005)
    pytest.fail(f"{subject} never delivered within {within}s")


async def test_site_publishes_only_its_own_subjects(
    deployment: Deployment, clients: Clients
) -> None:
    center = await clients.connect(
        deployment.hub_url, creds=deployment.topology.service_credentials()
    )
    at_center = await collector(center, "up.>")
    agent = await clients.connect(deployment.site_url("s1"), inbox=subjects.site_inbox_prefix("s1"))
    own = subjects.up("s1", "reading", "d1", "t")
    await delivered(agent, own, at_center)

    # Through the leaf: the forged publish goes first, a marker after it on the same path.
    await agent.nc.publish(subjects.up("s2", "reading", "d1", "t"), b"forged-by-s1-leaf")
    await delivered(agent, own, at_center)
    # Directly at the hub with s1's creds: refused, reported at error_cb (no exception).
    direct = await clients.connect(
        deployment.hub_url, creds=deployment.creds["s1"], inbox=subjects.site_inbox_prefix("s1")
    )
    await direct.nc.publish(subjects.up("s2", "reading", "d1", "t"), b"forged-by-s1-direct")
    await direct.nc.publish(subjects.down_site("s2", "cfg"), b"forged-command")
    await delivered(direct, own, at_center)
    await wait_for(lambda: len(direct.violations()) >= 2, 2.0, "no publish violations reported")

    assert not [m for m in at_center if m.subject.startswith("up.s2.")]
    assert 'publish to "up.s2.reading.d1.t"' in direct.violations()[0]
    assert 'publish to "down.s2.cfg"' in direct.violations()[1]
    assert not direct.closed.is_set()  # a violation does not cost the connection
    # Positive control: s2 itself does reach the center on its own subject.
    s2 = await clients.connect(deployment.site_url("s2"), inbox=subjects.site_inbox_prefix("s2"))
    await delivered(s2, subjects.up("s2", "reading", "d1", "t"), at_center)


async def test_site_cannot_read_other_sites_commands_or_replies(
    deployment: Deployment, clients: Clients
) -> None:
    center = await clients.connect(
        deployment.hub_url, creds=deployment.topology.service_credentials()
    )
    js_center = center.nc.jetstream()
    await ensure_uplink_streams(js_center)

    async def answer(msg: Msg) -> None:
        await center.nc.publish(msg.reply, b"reply-for-" + msg.subject.encode())

    await center.nc.subscribe("up.*.ping", cb=answer)
    # s1's site subscribes to EVERYTHING on its own server: the hub accepts the wildcard
    # interest from the leaf but must still deliver only what s1's JWT allows.
    s1 = await clients.connect(deployment.site_url("s1"), inbox=subjects.site_inbox_prefix("s1"))
    seen_by_s1 = await collector(s1, ">")
    s2 = await clients.connect(deployment.site_url("s2"), inbox=subjects.site_inbox_prefix("s2"))
    seen_by_s2 = await collector(s2, "down.>")
    await delivered(center, subjects.down_all("marker"), seen_by_s1)
    await delivered(center, subjects.down_all("marker"), seen_by_s2)

    secret = b"for-s2-only"
    for subject in (
        subjects.down_site("s2", "cfg"),
        subjects.down_group("g2", "cfg"),
        subjects.down_group("g3", "cfg"),
    ):
        await center.nc.publish(subject, secret)
    # s2's request reply and JetStream PubAck both travel on _INBOX.s2.*
    reply = await s2.nc.request("up.s2.ping", b"?", timeout=2.0)
    ack = await s2.nc.jetstream().publish(
        subjects.up("s2", "reading", "d2", "t"), b"v", timeout=2.0
    )
    await delivered(center, subjects.down_site("s1", "marker"), seen_by_s1)  # in order after

    assert reply.data == b"reply-for-up.s2.ping" and ack.stream == "UP_READING"
    assert sum(m.data == secret for m in seen_by_s2) == 3  # s2 did get them (g2 and g3)
    leaked = [
        m.subject for m in seen_by_s1 if m.data == secret or m.subject.startswith("_INBOX.s2")
    ]
    assert leaked == []
    assert not [m for m in seen_by_s1 if m.subject.startswith("_INBOX")]

    # Directly at the hub with s1's creds: every such subscription is refused.
    direct = await clients.connect(
        deployment.hub_url, creds=deployment.creds["s1"], inbox=subjects.site_inbox_prefix("s1")
    )
    for subject in ("down.s2.>", "down.group.g2.>", "_INBOX.s2.>", "_INBOX.>", "up.>"):
        await direct.nc.subscribe(subject, cb=_ignore)
    await direct.nc.subscribe(subjects.down_group("g1", "cfg"), cb=_ignore)  # allowed: own group
    await wait_for(lambda: len(direct.violations()) >= 5, 2.0, "no subscribe violations reported")
    await asyncio.sleep(QUIET_S)
    assert len(direct.violations()) == 5, direct.violations()
    assert all("subscription" in v for v in direct.violations())
    # A site issued with no group at all: the server drops the group grant, never widens it.
    lone_creds = deployment.topology.site_credentials("s9", groups=())
    lone = await clients.connect(
        deployment.hub_url, creds=lone_creds, inbox=subjects.site_inbox_prefix("s9")
    )
    await lone.nc.subscribe(subjects.down_site("s9", "cfg"), cb=_ignore)
    await lone.nc.subscribe(subjects.down_group("g1", "cfg"), cb=_ignore)
    await wait_for(lambda: bool(lone.violations()), 2.0, "no violation for a foreign group")
    await asyncio.sleep(QUIET_S)
    assert len(lone.violations()) == 1 and "down.group.g1.cfg" in lone.violations()[0]


async def _ignore(msg: Msg) -> None:
    return None


async def test_jetstream_publish_works_but_no_jetstream_api_access(
    deployment: Deployment, clients: Clients
) -> None:
    center = await clients.connect(
        deployment.hub_url, creds=deployment.topology.service_credentials()
    )
    await ensure_uplink_streams(center.nc.jetstream())
    s2 = await clients.connect(deployment.site_url("s2"), inbox=subjects.site_inbox_prefix("s2"))
    s2_ack = await s2.nc.jetstream().publish(subjects.up("s2", "reading", "d", "t"), b"s2-data")

    s1 = await clients.connect(deployment.site_url("s1"), inbox=subjects.site_inbox_prefix("s1"))
    start = time.monotonic()
    ack = await s1.nc.jetstream().publish(
        subjects.up("s1", "reading", "d", "t"), b"s1-data", timeout=2.0
    )
    elapsed_ms = (time.monotonic() - start) * 1e3
    print(f"\nJetStream publish s1 -> hub through the leaf: PubAck in {elapsed_ms:.1f} ms")
    assert (ack.stream, ack.domain) == ("UP_READING", "hub")
    # Without the per-site inbox prefix the PubAck cannot reach the site: fail closed.
    no_prefix = await clients.connect(deployment.site_url("s1"))
    with pytest.raises(NatsTimeout):
        await no_prefix.nc.jetstream().publish(
            subjects.up("s1", "reading", "d", "t"), b"x", timeout=0.5
        )

    # s1 reading s2's data through the hub's JetStream API: not reachable from the site...
    hub_js = s1.nc.jetstream(domain="hub", timeout=0.5)
    with pytest.raises(NOT_ANSWERED):
        await hub_js.get_msg(ack.stream, s2_ack.seq)
    with pytest.raises(NOT_ANSWERED):
        await hub_js.pull_subscribe("up.s2.>", stream="UP_READING")
    # ...nor directly at the hub with s1's creds (refused, reported at error_cb).
    direct = await clients.connect(
        deployment.hub_url, creds=deployment.creds["s1"], inbox=subjects.site_inbox_prefix("s1")
    )
    api_calls = [
        ("$JS.API.STREAM.MSG.GET.UP_READING", {"seq": s2_ack.seq}),
        (
            "$JS.API.CONSUMER.CREATE.UP_READING",
            {"stream_name": "UP_READING", "config": {"filter_subject": "up.s2.>"}},
        ),
        ("$JS.hub.API.STREAM.MSG.GET.UP_READING", {"seq": s2_ack.seq}),
    ]
    for subject, body in api_calls:
        with pytest.raises((NatsTimeout, NoRespondersError)):
            await direct.nc.request(subject, json.dumps(body).encode(), timeout=0.5)
    assert len(direct.violations()) == len(api_calls), direct.errors
    # Nothing was read or created: three stored messages (the un-acked one was stored too,
    # only its PubAck could not come back), and no consumer.
    info = await center.nc.jetstream().stream_info("UP_READING")
    assert info.state.messages == 3 and info.state.consumer_count == 0


async def test_center_requests_answered_only_on_the_sites_reply_prefix(
    deployment: Deployment, clients: Clients
) -> None:
    s1 = await clients.connect(deployment.site_url("s1"), inbox=subjects.site_inbox_prefix("s1"))

    async def pong(msg: Msg) -> None:
        await s1.nc.publish(msg.reply, b"pong-s1")

    await s1.nc.subscribe(subjects.down_site("s1", "ping"), cb=pong)
    await ensure_stream(s1.nc.jetstream(), site_events_stream("s1"))
    creds = deployment.topology.service_credentials("controller")
    controller = await clients.connect(
        deployment.hub_url, creds=creds, inbox=subjects.center_inbox_prefix("s1")
    )
    reply = None
    for _ in range(50):  # the site's interest crosses the leaf link asynchronously
        try:
            reply = await controller.nc.request(subjects.down_site("s1", "ping"), b"", timeout=0.2)
            break
        except (NatsTimeout, NoRespondersError):
            continue
    assert reply is not None and reply.data == b"pong-s1"
    # The default inbox is not one s1 may publish to: no answer.
    plain = await clients.connect(deployment.hub_url, creds=creds)
    with pytest.raises(NatsTimeout):
        await plain.nc.request(subjects.down_site("s1", "ping"), b"", timeout=0.5)
    # s2 cannot answer (or spoof answers to) requests made to s1.
    s2_direct = await clients.connect(
        deployment.hub_url, creds=deployment.creds["s2"], inbox=subjects.site_inbox_prefix("s2")
    )
    replies_for_s1 = await collector(controller, f"{subjects.center_inbox_prefix('s1')}.>")
    await s2_direct.nc.publish(f"{subjects.center_inbox_prefix('s1')}.spoof", b"pong-from-s2")
    await wait_for(lambda: bool(s2_direct.violations()), 2.0, "no violation for a spoofed reply")
    await asyncio.sleep(QUIET_S)
    assert replies_for_s1 == []
    # Least privilege: by default the center cannot reach a site's own JetStream domain.
    with pytest.raises(NOT_ANSWERED):
        await controller.nc.jetstream(domain="s1", timeout=0.5).stream_info("EVENTS")


async def test_center_reaches_site_jetstream_only_when_enabled(
    tmp_path: Path, clients: Clients
) -> None:
    authority = CredentialAuthority(tmp_path / "authority", site_jetstream_from_center=True)
    with _deploy(tmp_path, authority, {"s1": ("g1",), "s2": ("g2",)}) as deployment:
        s1 = await clients.connect(
            deployment.site_url("s1"), inbox=subjects.site_inbox_prefix("s1")
        )
        await ensure_stream(s1.nc.jetstream(), site_events_stream("s1"))
        creds = deployment.topology.service_credentials("controller")
        controller = await clients.connect(
            deployment.hub_url, creds=creds, inbox=subjects.center_inbox_prefix("s1")
        )
        info = None
        for _ in range(50):
            try:
                info = await controller.nc.jetstream(domain="s1", timeout=0.2).stream_info("EVENTS")
                break
            except NOT_ANSWERED:
                continue
        assert info is not None and info.config.name == "EVENTS"
        # The grant is per site: s2's creds still cannot drive s1's JetStream.
        s2_direct = await clients.connect(
            deployment.hub_url, creds=deployment.creds["s2"], inbox=subjects.site_inbox_prefix("s2")
        )
        with pytest.raises((NatsTimeout, NoRespondersError)):
            await s2_direct.nc.request("$JS.s1.API.STREAM.INFO.EVENTS", b"", timeout=0.5)
        assert s2_direct.violations()


async def test_revocation_drops_the_site_at_once_and_for_good(
    deployment: Deployment, clients: Clients
) -> None:
    topology, authority = deployment.topology, deployment.authority
    system = await clients.connect(deployment.hub_url, creds=topology.system_credentials())
    # An agent-style direct connection that would reconnect for ever if it could.
    s1_direct = await clients.connect(
        deployment.hub_url,
        creds=deployment.creds["s1"],
        inbox=subjects.site_inbox_prefix("s1"),
        reconnect=True,
    )
    s2_direct = await clients.connect(
        deployment.hub_url,
        creds=deployment.creds["s2"],
        inbox=subjects.site_inbox_prefix("s2"),
        reconnect=True,
    )
    assert topology.link_up("s1") and topology.link_up("s2")

    account_jwt = authority.revoke(topology.site_identity("s1").public_key)
    start = time.monotonic()
    await push_account_update(system.nc, account_jwt, operator=authority.operator_key)
    pushed = time.monotonic() - start
    await wait_for(s1_direct.closed.is_set, REVOCATION_BOUND_S, "s1 client kept")
    await wait_for(
        lambda: "s1" not in topology.hub.leaf_names(), REVOCATION_BOUND_S, "s1 leaf kept"
    )
    leaf_gone = time.monotonic() - start  # upper bound: includes the monitor polling
    client_gone = s1_direct.closed_at[0] - start
    print(
        f"\nrevocation: push incl. lookups {pushed * 1e3:.1f} ms; from push start, s1 client "
        f"closed at {client_gone * 1e3:.1f} ms, leaf gone from the hub by {leaf_gone * 1e3:.1f} ms"
    )
    assert client_gone < REVOCATION_BOUND_S and leaf_gone < REVOCATION_BOUND_S
    # nats-py closes for good (no reconnect), error_cb is not called: last_error says why.
    assert "revoked" in str(s1_direct.nc.last_error), s1_direct.nc.last_error
    assert await account_lookup(system.nc, authority.edge_account) == account_jwt

    # Reconnects are refused: the client at once, the leaf on every retry (every 0.25 s).
    with pytest.raises(ConnectRefused, match="Authorization Violation"):
        await clients.connect(deployment.hub_url, creds=deployment.creds["s1"])
    await asyncio.sleep(1.0)
    assert not topology.link_up("s1")
    # s2 is unaffected.
    assert not s2_direct.closed.is_set() and s2_direct.nc.is_connected
    assert topology.link_up("s2")
    center = await clients.connect(deployment.hub_url, creds=topology.service_credentials())
    at_center = await collector(center, "up.>")
    s2 = await clients.connect(deployment.site_url("s2"), inbox=subjects.site_inbox_prefix("s2"))
    await delivered(s2, subjects.up("s2", "status"), at_center)

    # It holds across a hub restart (the resolver keeps the pushed JWT, not the preload).
    await center.nc.close()
    await system.nc.close()
    await asyncio.to_thread(topology.hub.restart)
    await asyncio.to_thread(topology.wait_link_up, "s2")
    with pytest.raises(ConnectRefused, match="Authorization Violation"):
        await clients.connect(deployment.hub_url, creds=deployment.creds["s1"])
    assert not topology.link_up("s1")
    # Re-onboarding needs a fresh keypair; the new creds work at once.
    identity = topology.site_identity("s1")
    fresh = identity.install(
        authority.issue_site_credentials("s1", GROUPS["s1"], identity.rotate())
    )
    again = await clients.connect(
        deployment.hub_url, creds=fresh, inbox=subjects.site_inbox_prefix("s1")
    )
    assert again.nc.is_connected


async def test_forged_credentials_are_refused(
    deployment: Deployment, clients: Clients, tmp_path: Path
) -> None:
    authority = deployment.authority
    s1_creds = deployment.creds["s1"].read_text()
    s1_jwt = read_creds_jwt(s1_creds)
    header, _, signature = s1_jwt.split(".")
    claims = decode_jwt(s1_jwt)
    claims["nats"]["tags"] = ["site:s2", "group:g2"]
    re_tagged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    attacker_seed = new_seed(KeyKind.USER)
    other_authority = CredentialAuthority(tmp_path / "other-authority")
    stranger = SiteIdentity(tmp_path / "stranger")
    forgeries = {
        # a whole other operator's creds (its account is unknown to the hub)
        "foreign operator": stranger.install(
            other_authority.issue_site_credentials("s1", "g1", stranger.public_key)
        ),
        # our EDGE account named as issuer, but signed by the attacker's own key
        "self-signed": write_private(
            tmp_path / "self-signed.creds",
            creds_text(
                encode_jwt(
                    site_user_claims(
                        public_key(attacker_seed),
                        site="s2",
                        groups=["g2"],
                        account=authority.edge_account,
                    ),
                    new_seed(KeyKind.ACCOUNT),
                ),
                attacker_seed,
            ),
        ),
        # s1's genuine JWT with its tags rewritten to s2's
        "re-tagged": write_private(
            tmp_path / "re-tagged.creds",
            creds_text(f"{header}.{re_tagged}.{signature}", topology_seed(deployment, "s1")),
        ),
        # s1's genuine JWT without s1's seed (stolen JWT, own key)
        "stolen jwt": write_private(tmp_path / "stolen.creds", creds_text(s1_jwt, attacker_seed)),
    }
    for what, path in forgeries.items():
        start = time.monotonic()
        with pytest.raises(ConnectRefused, match="Authorization Violation"):
            await clients.connect(deployment.hub_url, creds=path)
        elapsed = time.monotonic() - start
        print(f"\nforged creds ({what}): refused in {elapsed * 1e3:.0f} ms")
        assert elapsed < CONNECT_BOUND_S
    # A leaf node with forged creds never links up.
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(
            deployment.topology.add_site,
            "s3",
            credentials=forgeries["re-tagged"],
            mqtt=False,
            timeout=1.5,
        )
    assert "s3" not in deployment.topology.hub.leaf_names()


def topology_seed(deployment: Deployment, site: str) -> bytes:
    return deployment.topology.site_identity(site).seed_path.read_bytes().strip()


async def test_account_push_refuses_roll_back_and_foreign_operator(
    deployment: Deployment, clients: Clients
) -> None:
    authority = deployment.authority
    system = await clients.connect(
        deployment.hub_url, creds=deployment.topology.system_credentials()
    )
    current = await authority.push(system.nc)
    older = encode_jwt(
        {k: v for k, v in decode_jwt(current).items() if k not in ("iss", "iat", "jti")},
        authority._keys.operator,  # the genuine operator, but an older iat
        iat=decode_jwt(current)["iat"] - 60,
    )
    with pytest.raises(AuthError, match="newer"):
        await push_account_update(system.nc, older, operator=authority.operator_key)
    foreign = encode_jwt(
        account_claims(authority.edge_account, name="EDGE"), new_seed(KeyKind.OPERATOR)
    )
    with pytest.raises(AuthError, match="expected"):
        await push_account_update(system.nc, foreign, operator=authority.operator_key)
    assert await account_lookup(system.nc, authority.edge_account) == current
    # Sites still connect under the JWT that stayed in force.
    site = await clients.connect(deployment.hub_url, creds=deployment.creds["s2"])
    assert site.nc.is_connected


# -- the shared bootstrap user (onboarding before a site has its own identity) ---------------


def test_bootstrap_user_may_only_onboard_and_is_one_stable_key(tmp_path: Path) -> None:
    authority = CredentialAuthority(tmp_path / "authority")
    creds = authority.issue_bootstrap_credentials()
    claims = verify_jwt(read_creds_jwt(creds))
    assert claims["sub"] == authority.bootstrap_user_key
    assert claims["nats"]["issuer_account"] == authority.edge_account
    assert claims["nats"]["pub"] == {"allow": ["ctl.controller.onboard"]}
    assert claims["nats"]["sub"] == {"allow": ["_INBOX_bootstrap.>"]}
    assert claims["nats"]["allowed_connection_types"] == ["STANDARD"]
    # One shared user: every call (and a reloaded authority) names the same key.
    again = CredentialAuthority(tmp_path / "authority").issue_bootstrap_credentials()
    assert decode_jwt(read_creds_jwt(again))["sub"] == authority.bootstrap_user_key
    # Once revoked it is replaced, never revived by a newer JWT for the same key.
    revoked = authority.bootstrap_user_key
    authority.revoke(revoked)
    fresh = decode_jwt(read_creds_jwt(authority.issue_bootstrap_credentials()))["sub"]
    assert fresh != revoked and fresh == authority.bootstrap_user_key


async def test_bootstrap_creds_reach_only_the_onboarding_request(
    deployment: Deployment, clients: Clients, tmp_path: Path
) -> None:
    center = await clients.connect(
        deployment.hub_url, creds=deployment.topology.service_credentials()
    )
    seen_at_center = await collector(center, ">")

    async def answer(msg: Msg) -> None:
        await center.nc.publish(msg.reply, b"welcome")

    await center.nc.subscribe(subjects.onboard(), cb=answer)
    bootstrap_creds = write_private(
        tmp_path / "bootstrap.creds", deployment.authority.issue_bootstrap_credentials()
    )
    newcomer = await clients.connect(
        deployment.hub_url, creds=bootstrap_creds, inbox=subjects.bootstrap_inbox_prefix("n1")
    )
    reply = await newcomer.nc.request(subjects.onboard(), b"hello", timeout=2.0)
    assert reply.data == b"welcome"

    forged = (
        subjects.up("s1", "reading", "d1", "t"),
        subjects.down_site("s1", "cfg"),
        subjects.control("controller", "sites", "add"),
    )
    for subject in forged:
        await newcomer.nc.publish(subject, b"forged-by-bootstrap")
    for subject in ("up.>", "down.>", "_INBOX.>", "_INBOX_center.>", ">"):
        await newcomer.nc.subscribe(subject, cb=_ignore)
    expected = len(forged) + 5
    await wait_for(lambda: len(newcomer.violations()) >= expected, 2.0, "violations missing")
    await asyncio.sleep(QUIET_S)
    assert len(newcomer.violations()) == expected, newcomer.violations()
    assert not [m for m in seen_at_center if m.data == b"forged-by-bootstrap"]
    # What it may do, it still can: the violations cost it nothing.
    assert (await newcomer.nc.request(subjects.onboard(), b"again", timeout=2.0)).data
    # Without the bootstrap inbox prefix the reply cannot reach it: fail closed.
    plain = await clients.connect(deployment.hub_url, creds=bootstrap_creds)
    with pytest.raises(NatsTimeout):
        await plain.nc.request(subjects.onboard(), b"hello", timeout=0.5)
    # The creds cannot open a leaf node (a site pretending to be onboarded).
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(
            deployment.topology.add_site,
            "s3",
            credentials=bootstrap_creds,
            mqtt=False,
            timeout=1.5,
        )
    assert "s3" not in deployment.topology.hub.leaf_names()
