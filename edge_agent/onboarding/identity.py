"""The site's onboarded identity, kept in `<data_dir>/identity.json`, and pure helpers around it.

File I/O and plain decisions only; the exchange with the center is in `client`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.auth import write_private
from schemas.bootstrap import BootstrapToken
from schemas.controller import SITE_ID, OnboardReply

IDENTITY_FILE = "identity.json"
KEYS_DIR = "identity"  # the site's nkey seed and creds file (bus.auth.SiteIdentity)
IDENTITY_FORMAT = 1


class IdentityError(RuntimeError):
    """identity.json is unreadable, or belongs to another site."""


class SiteIdentityRecord(BaseModel):
    """Everything the site got at onboarding; with it the site never needs its token again.

    `credentials` is absolute in memory and stored relative to the data dir, so the data
    dir can move (a container volume mounted elsewhere) without breaking the site.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")  # a newer agent may add fields

    format: int = IDENTITY_FORMAT
    site: str = Field(pattern=SITE_ID)
    group: str
    labels: dict[str, str] = Field(default_factory=dict)
    leaf_urls: tuple[str, ...] = ()
    heartbeat_interval_s: float = Field(gt=0)
    onboarded_at: datetime
    credentials: Path | None = None  # None: the center runs without auth (development)
    user_public_key: str | None = None
    center_urls: tuple[str, ...] = ()
    token_sha256: str = ""  # which token onboarded the site (same hash the center keeps)
    desired_config: dict[str, Any] = Field(default_factory=dict)


def identity_path(data_dir: Path) -> Path:
    return data_dir / IDENTITY_FILE


def keys_dir(data_dir: Path) -> Path:
    return data_dir / KEYS_DIR


def token_fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def load_identity(data_dir: Path, site: str | None = None) -> SiteIdentityRecord | None:
    """The stored identity, None if the site never onboarded here.

    With `site`, an identity of another site is an error (a data dir is one site's); so is
    an unreadable file: onboarding again would need a fresh token, so never guess.
    """
    path = identity_path(data_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IdentityError(f"unreadable {path}: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != IDENTITY_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise IdentityError(f"{path}: unsupported identity format {got!r}")
    credentials = raw.get("credentials")
    if credentials is not None:
        raw["credentials"] = str(data_dir.resolve() / credentials)
    try:
        record = SiteIdentityRecord.model_validate(raw)
    except ValidationError as exc:
        raise IdentityError(f"invalid {path}: {exc}") from None
    if site is not None and record.site != site:
        raise IdentityError(
            f"{data_dir} holds the identity of site {record.site!r}, not {site!r}; "
            "use another data dir"
        )
    return record


def save_identity(data_dir: Path, record: SiteIdentityRecord) -> Path:
    """Write identity.json atomically (0600: it names the credentials file)."""
    document = record.model_dump(mode="json")
    if record.credentials is not None:
        creds = record.credentials.resolve()
        base = data_dir.resolve()
        document["credentials"] = (
            str(creds.relative_to(base)) if creds.is_relative_to(base) else str(creds)
        )
    return write_private(identity_path(data_dir), json.dumps(document, indent=2) + "\n")


def center_urls_for(token: BootstrapToken, center_url: str | None) -> tuple[str, ...]:
    """Where to send the onboarding request: the flag wins, else the token's URLs."""
    if center_url:
        urls = tuple(u.strip() for u in center_url.split(",") if u.strip())
    else:
        urls = token.center_urls
    if not urls:
        raise ValueError("the token names no center URL: give one (--center nats://HOST:PORT)")
    for url in urls:
        if url.startswith("nats-leaf://"):
            raise ValueError(
                f"{url} is a leaf-node URL; onboarding talks to the center's client port "
                "(nats://HOST:PORT or tls://HOST:PORT)"
            )
    return urls


def record_from_reply(
    reply: OnboardReply,
    *,
    site: str,
    onboarded_at: datetime,
    credentials: Path | None,
    user_public_key: str | None,
    center_urls: tuple[str, ...],
    token_secret: str,
) -> SiteIdentityRecord:
    """The identity to persist from the center's answer to this site's request."""
    if reply.site != site:
        raise IdentityError(f"the center answered for site {reply.site!r}, not {site!r}")
    return SiteIdentityRecord(
        site=site,
        group=reply.group,
        labels=dict(reply.labels),
        leaf_urls=tuple(reply.leaf_urls),
        heartbeat_interval_s=reply.heartbeat_interval_s,
        onboarded_at=onboarded_at,
        credentials=credentials,
        user_public_key=user_public_key if credentials is not None else None,
        center_urls=center_urls,
        token_sha256=token_fingerprint(token_secret),
        desired_config=dict(reply.desired_config),
    )


def retry_delay(attempt: int, minimum_s: float, maximum_s: float) -> float:
    """Wait before retry number `attempt` (1-based): minimum, doubling, capped."""
    if attempt <= 1:
        return minimum_s
    return float(min(maximum_s, minimum_s * 2 ** min(attempt - 1, 30)))
