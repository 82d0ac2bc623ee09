"""NATS decentralized auth (operator mode) made in Python: nkeys, JWTs, creds files, revocation.
Mechanism only: which site gets credentials, and when they are revoked, is the controller's call."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import nkeys
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from nats.aio.client import Client as NatsClient

from bus import subjects

__all__ = [
    "CLAIMS_UPDATE",
    "SITE_GROUP_TAG",
    "SITE_ROLE",
    "SITE_TAG",
    "AuthError",
    "CredentialAuthority",
    "KeyKind",
    "SiteIdentity",
    "account_claims",
    "account_lookup",
    "bootstrap_user_claims",
    "check_public_key",
    "creds_text",
    "decode_jwt",
    "encode_jwt",
    "new_seed",
    "operator_claims",
    "public_key",
    "push_account_update",
    "read_creds_jwt",
    "service_user_claims",
    "site_scope",
    "site_user_claims",
    "verify_jwt",
    "write_private",
]

SITE_ROLE = "site"
# Tag keys of a site user's JWT; the "site" role's template expands them.
SITE_TAG = "site"
SITE_GROUP_TAG = "group"
_TAG_EXPR = "{{{{tag({})}}}}"

_JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_CLAIMS_VERSION = 2
# Account/user limits: -1 = no limit. JetStream limits only on the edge account
# (the system account must not have JetStream).
_NO_LIMITS: dict[str, Any] = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
_JETSTREAM_NO_LIMITS: dict[str, Any] = {
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
    "max_ack_pending": -1,
}
_USER_NO_LIMITS: dict[str, Any] = {"subs": -1, "data": -1, "payload": -1}


class AuthError(ValueError):
    """A key, JWT or creds file that is malformed, mis-signed or of the wrong kind."""


# -- keys ---------------------------------------------------------------------------


class KeyKind(Enum):
    """nkey roles we use; the value is nkeys' prefix byte (first letter of the public key)."""

    OPERATOR = nkeys.PREFIX_BYTE_OPERATOR  # "O..."
    ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT  # "A..."
    USER = nkeys.PREFIX_BYTE_USER  # "U..."

    @property
    def letter(self) -> str:
        return {"OPERATOR": "O", "ACCOUNT": "A", "USER": "U"}[self.name]


def new_seed(kind: KeyKind) -> bytes:
    """A fresh nkey seed ("S..."); nkeys has no generator of its own."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), kind.value)
    return seed


def public_key(seed: bytes) -> str:
    """The public key ("O...", "A...", "U...") of a seed."""
    key: bytes = _keypair(seed).public_key
    return key.decode()


def _keypair(seed: bytes) -> Any:
    try:
        return nkeys.from_seed(bytearray(seed))
    except nkeys.NkeysError as exc:
        raise AuthError(f"invalid nkey seed: {exc}") from None


def _sign(seed: bytes, data: bytes) -> bytes:
    signature: bytes = _keypair(seed).sign(data)
    return signature


def _verify_key(public: str, kind: KeyKind | None = None) -> VerifyKey:
    """The ed25519 key inside an nkey public key, after checking its prefix and CRC."""
    try:
        raw = base64.b32decode(public.encode() + b"=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        raise AuthError(f"not an nkey public key: {public!r}") from None
    if len(raw) != 35:
        raise AuthError(f"not an nkey public key: {public!r}")
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if nkeys.crc16(body) != crc:
        raise AuthError(f"nkey public key has a bad checksum: {public!r}")
    if kind is not None and body[0] != kind.value:
        raise AuthError(f"expected a {kind.name.lower()} public key, got {public!r}")
    if body[0] not in (k.value for k in KeyKind):
        raise AuthError(f"unsupported nkey kind: {public!r}")
    return VerifyKey(bytes(body[1:]))


def check_public_key(public: str, kind: KeyKind) -> str:
    """`public` if it is a well-formed public key of `kind`, else AuthError."""
    _verify_key(public, kind)
    return public


# -- JWT ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise AuthError("JWT part is not base64url") from None


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode()


def encode_jwt(claims: Mapping[str, Any], issuer_seed: bytes, *, iat: int | None = None) -> str:
    """Sign `claims` (which must hold `sub` and `nats`) with the issuer's nkey.

    Sets `iss` (issuer public key), `iat` (now unless given) and `jti`: base32 of
    SHA-512/256 over the claims with an empty `jti`, as the reference library does.
    """
    body = dict(claims)
    body["iss"] = public_key(issuer_seed)
    body["iat"] = int(time.time()) if iat is None else iat
    body["jti"] = ""
    digest = hashlib.new("sha512_256", _json(body)).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signing_input = f"{_b64(_json(_JWT_HEADER))}.{_b64(_json(body))}"
    return f"{signing_input}.{_b64(_sign(issuer_seed, signing_input.encode()))}"


def _split(token: str) -> tuple[str, str, str]:
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise AuthError("a JWT has three dot-separated parts")
    return parts[0], parts[1], parts[2]


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT, WITHOUT checking its signature (see verify_jwt)."""
    header, payload, _ = _split(token)
    try:
        if json.loads(_unb64(header)) != _JWT_HEADER:
            raise AuthError("not an ed25519-nkey JWT")
        claims = json.loads(_unb64(payload))
    except json.JSONDecodeError:
        raise AuthError("JWT part is not JSON") from None
    if not isinstance(claims, dict):
        raise AuthError("JWT claims are not an object")
    return claims


def verify_jwt(token: str, issuer: str | None = None) -> dict[str, Any]:
    """The claims of a JWT whose signature verifies against its `iss` key.

    With `issuer`, the JWT must also have been signed by exactly that key.
    """
    claims = decode_jwt(token)
    iss = claims.get("iss")
    if not isinstance(iss, str):
        raise AuthError("JWT has no issuer")
    if issuer is not None and iss != issuer:
        raise AuthError(f"JWT issued by {iss}, expected {issuer}")
    header, payload, signature = _split(token)
    try:
        _verify_key(iss).verify(f"{header}.{payload}".encode(), _unb64(signature))
    except BadSignatureError:
        raise AuthError("JWT signature does not verify") from None
    return claims


# -- claims -------------------------------------------------------------------------


def operator_claims(operator: str, *, name: str, system_account: str) -> dict[str, Any]:
    """Self-signed operator: the root every server of this deployment trusts."""
    return {
        "sub": operator,
        "name": name,
        "nats": {"type": "operator", "version": _CLAIMS_VERSION, "system_account": system_account},
    }


def site_scope(signing_key: str, *, site_jetstream_from_center: bool = False) -> dict[str, Any]:
    """The scoped signing key of the "site" role: every site user gets exactly this template.

    The server expands `{{tag(site)}}` / `{{tag(group)}}` from the user JWT's tags, so one
    template scopes every site to its own subjects (see subjects.site_permissions).
    """
    perms = subjects.site_permissions(
        _TAG_EXPR.format(SITE_TAG),
        (_TAG_EXPR.format(SITE_GROUP_TAG),),
        site_jetstream_from_center=site_jetstream_from_center,
    )
    return {
        "kind": "user_scope",
        "key": signing_key,
        "role": SITE_ROLE,
        "template": {
            "pub": {"allow": list(perms.publish)},
            "sub": {"allow": list(perms.subscribe)},
            **_USER_NO_LIMITS,
        },
        "description": "edge site: its own subjects and inboxes only",
    }


def account_claims(
    account: str,
    *,
    name: str,
    signing_keys: Sequence[str | Mapping[str, Any]] = (),
    revocations: Mapping[str, int] | None = None,
    jetstream: bool = True,
) -> dict[str, Any]:
    """An account; `revocations` maps user public keys to the time before which their
    JWTs are void (the server compares it with each user JWT's `iat`)."""
    nats: dict[str, Any] = {
        "type": "account",
        "version": _CLAIMS_VERSION,
        "limits": {**_NO_LIMITS, **(_JETSTREAM_NO_LIMITS if jetstream else {})},
        "default_permissions": {"pub": {}, "sub": {}},
    }
    if signing_keys:
        nats["signing_keys"] = [k if isinstance(k, str) else dict(k) for k in signing_keys]
    if revocations:
        nats["revocations"] = dict(revocations)
    return {"sub": account, "name": name, "nats": nats}


def site_user_claims(
    user: str, *, site: str, groups: Sequence[str], account: str
) -> dict[str, Any]:
    """A site user for a scoped signing key: tags only, no permissions of its own
    (the server refuses a scoped user that carries any)."""
    tags = [f"{SITE_TAG}:{subjects.site_id(site)}"]
    tags += [f"{SITE_GROUP_TAG}:{subjects.token(g)}" for g in groups]
    return {
        "sub": check_public_key(user, KeyKind.USER),
        "name": f"site-{site}",
        "nats": {
            "type": "user",
            "version": _CLAIMS_VERSION,
            "issuer_account": account,
            "tags": tags,
        },
    }


def service_user_claims(user: str, *, name: str, account: str | None = None) -> dict[str, Any]:
    """A user with every permission of its account (center services, system user).

    `account` is set when a signing key, not the account key itself, signs the JWT.
    """
    nats: dict[str, Any] = {
        "type": "user",
        "version": _CLAIMS_VERSION,
        "pub": {},
        "sub": {},
        **_USER_NO_LIMITS,
    }
    if account is not None:
        nats["issuer_account"] = account
    return {"sub": check_public_key(user, KeyKind.USER), "name": name, "nats": nats}


def bootstrap_user_claims(user: str, *, account: str) -> dict[str, Any]:
    """The shared bootstrap user: may only ask to onboard and read onboarding replies.

    Sharing one user across every token is safe because an onboarding reply is worth
    nothing to an eavesdropper: the user JWT in it names the site's own public key and
    is useless without the site's seed, which never leaves the site. The reply's other
    fields (group, labels, leaf URLs, desired config) are readable by any holder of the
    bootstrap creds, so they must never carry secrets. A plain client connection only:
    the creds cannot open a leaf node, websocket or MQTT session.
    """
    perms = subjects.bootstrap_permissions()
    return {
        "sub": check_public_key(user, KeyKind.USER),
        "name": "edgebus-bootstrap",
        "nats": {
            "type": "user",
            "version": _CLAIMS_VERSION,
            "issuer_account": account,
            "pub": {"allow": list(perms.publish)},
            "sub": {"allow": list(perms.subscribe)},
            "allowed_connection_types": ["STANDARD"],
            # An onboarding request is well under 1 KiB; nothing else is published.
            "subs": 16,
            "data": -1,
            "payload": 64 * 1024,
        },
    }


# -- creds files ----------------------------------------------------------------------

_CREDS_TEMPLATE = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""


def creds_text(user_jwt: str, user_seed: bytes) -> str:
    """A standard `.creds` file (what nats-py `user_credentials=` and leaf remotes read)."""
    return _CREDS_TEMPLATE.format(jwt=user_jwt.strip(), seed=user_seed.decode())


def read_creds_jwt(text: str) -> str:
    """The user JWT inside a `.creds` file's text."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "BEGIN NATS USER JWT" in line and i + 1 < len(lines):
            return lines[i + 1].strip()
    raise AuthError("no user JWT in creds text")


def write_private(path: Path, data: str | bytes) -> Path:
    """Write atomically, readable by the owner only (0600): seeds and creds are secrets."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# -- the site side ----------------------------------------------------------------------


class SiteIdentity:
    """The site's own user nkey, kept in its directory; only the public key ever leaves.

    Onboarding: send `public_key` to the controller, get a user JWT back, `install` it.
    """

    SEED_FILE = "site.nk"
    CREDS_FILE = "site.creds"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def seed_path(self) -> Path:
        return self.directory / self.SEED_FILE

    @property
    def creds_path(self) -> Path:
        return self.directory / self.CREDS_FILE

    def _seed(self) -> bytes:
        if not self.seed_path.exists():
            write_private(self.seed_path, new_seed(KeyKind.USER))
        return self.seed_path.read_bytes().strip()

    @property
    def public_key(self) -> str:
        """The site's user public key; the keypair is created on first use."""
        return public_key(self._seed())

    def rotate(self) -> str:
        """A new keypair (after a revocation, re-onboard with a fresh key); its public key."""
        write_private(self.seed_path, new_seed(KeyKind.USER))
        return self.public_key

    def install(self, user_jwt: str) -> Path:
        """Write the creds file for a JWT issued to this site's key; returns its path."""
        claims = decode_jwt(user_jwt)
        if claims.get("sub") != self.public_key:
            raise AuthError("this JWT was issued for another key")
        return write_private(self.creds_path, creds_text(user_jwt, self._seed()))


# -- the center side --------------------------------------------------------------------


@dataclass(frozen=True)
class _Keys:
    operator: bytes
    system: bytes
    account: bytes
    signing: bytes  # plain signing key: center services
    site_signing: bytes  # scoped signing key: role "site"


class CredentialAuthority:
    """Operator, accounts and signing keys of one deployment, persisted in `directory` (0600).

    Two accounts: SYS (the server's system account, used only to push account updates)
    and EDGE (center services and every site). The EDGE account JWT, with its revocation
    list, is the source of truth pushed to the servers; keep one authority per deployment.
    """

    OPERATOR_NAME = "edgebus"
    EDGE_ACCOUNT = "EDGE"
    SYSTEM_ACCOUNT = "SYS"

    def __init__(self, directory: Path, *, site_jetstream_from_center: bool = False) -> None:
        """Load the keys from `directory`, creating them on first use.

        site_jetstream_from_center: let the center reach each site's JetStream API
        (`$JS.<site>.API.>`); off by default (least privilege, nothing needs it yet).
        """
        self.directory = directory
        self.site_jetstream_from_center = site_jetstream_from_center
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._keys = _Keys(
            operator=self._load_seed("operator", KeyKind.OPERATOR),
            system=self._load_seed("system", KeyKind.ACCOUNT),
            account=self._load_seed("account", KeyKind.ACCOUNT),
            signing=self._load_seed("signing", KeyKind.ACCOUNT),
            site_signing=self._load_seed("site_signing", KeyKind.ACCOUNT),
        )
        self._revocations: dict[str, int] = self._load_revocations()
        # iat of the last EDGE account JWT issued, so the next is newer even after a restart.
        self._last_iat = 0
        if self._account_jwt_path.exists():
            self._last_iat = int(decode_jwt(self._account_jwt_path.read_text()).get("iat", 0))

    def _load_seed(self, name: str, kind: KeyKind) -> bytes:
        path = self.directory / f"{name}.nk"
        if not path.exists():
            write_private(path, new_seed(kind))
        seed = path.read_bytes().strip()
        if not public_key(seed).startswith(kind.letter):
            raise AuthError(f"{path} does not hold a {kind.name.lower()} seed")
        return seed

    @property
    def _revocations_path(self) -> Path:
        return self.directory / "revocations.json"

    @property
    def _account_jwt_path(self) -> Path:
        return self.directory / "account.jwt"

    def _load_revocations(self) -> dict[str, int]:
        try:
            data = json.loads(self._revocations_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): int(v) for k, v in data.items()}

    # -- public keys ------------------------------------------------------------------

    @property
    def operator_key(self) -> str:
        return public_key(self._keys.operator)

    @property
    def system_account(self) -> str:
        return public_key(self._keys.system)

    @property
    def edge_account(self) -> str:
        return public_key(self._keys.account)

    @property
    def revocations(self) -> dict[str, int]:
        return dict(self._revocations)

    # -- JWTs -------------------------------------------------------------------------

    def _now(self) -> int:
        # Strictly increasing iat, so a later account JWT always supersedes an earlier
        # one even within the same second (push_account_update refuses roll-backs).
        self._last_iat = max(int(time.time()), self._last_iat + 1)
        return self._last_iat

    def operator_jwt(self) -> str:
        claims = operator_claims(
            self.operator_key, name=self.OPERATOR_NAME, system_account=self.system_account
        )
        return encode_jwt(claims, self._keys.operator)

    def system_account_jwt(self) -> str:
        claims = account_claims(self.system_account, name=self.SYSTEM_ACCOUNT, jetstream=False)
        return encode_jwt(claims, self._keys.operator)

    def account_jwt(self) -> str:
        """A new EDGE account JWT: signing keys and current revocations, newest `iat`."""
        claims = account_claims(
            self.edge_account,
            name=self.EDGE_ACCOUNT,
            signing_keys=[
                public_key(self._keys.signing),
                site_scope(
                    public_key(self._keys.site_signing),
                    site_jetstream_from_center=self.site_jetstream_from_center,
                ),
            ],
            revocations=self._revocations,
        )
        token = encode_jwt(claims, self._keys.operator, iat=self._now())
        write_private(self._account_jwt_path, token)
        return token

    # -- users ------------------------------------------------------------------------

    def issue_site_credentials(self, site: str, group: str | Sequence[str], public: str) -> str:
        """The user JWT for a site's own public key (the site keeps the seed).

        The site gets exactly the "site" role's template, expanded with its tags (one
        `group:` tag per group; with none, the server drops the group subject).
        A revoked key is refused: after a revocation the site makes a new keypair.
        """
        groups = [group] if isinstance(group, str) else list(group)
        if public in self._revocations:
            raise AuthError(f"user key {public} was revoked; generate a new keypair")
        claims = site_user_claims(public, site=site, groups=groups, account=self.edge_account)
        return encode_jwt(claims, self._keys.site_signing)

    def issue_service_credentials(self, name: str) -> str:
        """Creds text (JWT + a fresh seed) for a center service: every EDGE permission."""
        seed = new_seed(KeyKind.USER)
        claims = service_user_claims(public_key(seed), name=name, account=self.edge_account)
        return creds_text(encode_jwt(claims, self._keys.signing), seed)

    @property
    def bootstrap_user_key(self) -> str:
        """Public key of the shared bootstrap user (revoke it to void every token's creds)."""
        return public_key(self._load_seed("bootstrap", KeyKind.USER))

    def issue_bootstrap_credentials(self) -> str:
        """Creds text for the ONE bootstrap user every bootstrap token carries.

        Its key is kept in the directory, so every call names the same user and one
        revocation (`revoke(bootstrap_user_key)`) voids the creds of every token minted;
        the next call then makes a new key (re-issuing the revoked one would revive it).
        """
        seed = self._load_seed("bootstrap", KeyKind.USER)
        if public_key(seed) in self._revocations:
            write_private(self.directory / "bootstrap.nk", new_seed(KeyKind.USER))
            seed = self._load_seed("bootstrap", KeyKind.USER)
        claims = bootstrap_user_claims(public_key(seed), account=self.edge_account)
        return creds_text(encode_jwt(claims, self._keys.signing), seed)

    def system_credentials(self) -> str:
        """Creds text for a system-account user: it can push account JWTs. Center only."""
        seed = new_seed(KeyKind.USER)
        claims = service_user_claims(public_key(seed), name="edgebus-system")
        return creds_text(encode_jwt(claims, self._keys.system), seed)

    def revoke(self, user_public_key: str) -> str:
        """Revoke every EDGE-account JWT issued so far to this user key (a site or a
        service); returns the new account JWT: push it (`push`) and connected servers
        drop the user at once. Persisted, so the revocation outlives this process."""
        check_public_key(user_public_key, KeyKind.USER)
        self._revocations[user_public_key] = int(time.time())
        write_private(self._revocations_path, json.dumps(self._revocations, indent=1))
        return self.account_jwt()

    # -- server configuration ---------------------------------------------------------

    def server_config_block(self, resolver_dir: Path) -> str:
        """nats-server config lines for operator mode (hub): trust, system account, resolver.

        The full resolver keeps account JWTs in `resolver_dir` and takes pushes at runtime;
        the preload seeds it with the system and current EDGE account JWTs.
        """
        operator_path = write_private(self.directory / "operator.jwt", self.operator_jwt())
        preload = {
            self.system_account: self.system_account_jwt(),
            self.edge_account: self.account_jwt(),
        }
        lines = [
            f"operator: {_q(operator_path)}",
            f"system_account: {self.system_account}",
            "resolver: {",
            "  type: full",
            f"  dir: {_q(resolver_dir)}",
            "  allow_delete: true",
            "}",
            "resolver_preload: {",
            *(f"  {key}: {_q(jwt)}" for key, jwt in preload.items()),
            "}",
        ]
        return "\n".join(lines) + "\n"

    async def push(self, nc_system: NatsClient, account_jwt: str | None = None) -> str:
        """Push `account_jwt` (default: a fresh one) to the servers; returns what was pushed."""
        token = account_jwt if account_jwt is not None else self.account_jwt()
        await push_account_update(nc_system, token, operator=self.operator_key)
        return token


def _q(value: str | Path) -> str:
    text = str(value)
    if any(ch in text for ch in '"\\\n\r'):
        raise ValueError(f"unsupported character in config value: {text!r}")
    return f'"{text}"'


# -- runtime updates (system account connection) ---------------------------------------------

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"


def _claims_lookup(account: str) -> str:
    return f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP"


async def account_lookup(nc_system: NatsClient, account: str, *, timeout: float = 2.0) -> str:
    """The account JWT the server currently resolves for `account` ("" if none)."""
    msg = await nc_system.request(_claims_lookup(account), b"", timeout=timeout)
    data: bytes = msg.data
    text = data.decode().strip()
    # An unknown account is answered with a JSON error, not a JWT.
    return "" if text.startswith("{") else text


async def push_account_update(
    nc_system: NatsClient,
    account_jwt: str,
    *,
    operator: str | None = None,
    allow_rollback: bool = False,
    timeout: float = 2.0,
) -> None:
    """Push an account JWT to the servers and check that they now resolve exactly it.

    `nc_system` is a connection of a system-account user. The server itself accepts
    any account JWT here, even one signed by a foreign operator or older than the one
    it holds (measured), so we check both before pushing: with `operator`, the JWT must
    verify against that key; and it must not be older than what the server resolves.
    Raises AuthError when a check fails, the server refuses, or the lookup differs.
    `allow_rollback` skips the age check (recovery from a bad push only).
    """
    claims = verify_jwt(account_jwt, operator) if operator is not None else decode_jwt(account_jwt)
    account = str(claims["sub"])
    current = await account_lookup(nc_system, account, timeout=timeout)
    if current and not allow_rollback:
        current_iat = int(decode_jwt(current).get("iat", 0))
        if current_iat > int(claims.get("iat", 0)):
            raise AuthError(
                f"the server holds a newer JWT for {account} (iat {current_iat}); "
                "refusing to roll it back"
            )
    msg = await nc_system.request(CLAIMS_UPDATE, account_jwt.encode(), timeout=timeout)
    try:
        answer = json.loads(msg.data)
    except json.JSONDecodeError:
        raise AuthError(f"unexpected answer to a claims update: {msg.data!r}") from None
    if "error" in answer:
        raise AuthError(f"claims update refused: {answer['error']}")
    if await account_lookup(nc_system, account, timeout=timeout) != account_jwt.strip():
        raise AuthError(f"after the update, {account} still resolves another JWT")
