"""Zero-touch onboarding, edge half: present the bootstrap token once, keep what the center sends.

The site makes its own nkey (the seed never leaves it) and persists the result, so a restart
never contacts the center again; an unreachable center is retried, a refusal is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus import subjects
from bus.auth import SiteIdentity, write_private
from bus.client import Bus, BusConnectError, RemoteError
from bus.config import NatsConfig, ReconnectPolicy
from bus.log import get_logger
from edge_agent.heartbeat.inventory import build_inventory, package_version
from edge_agent.onboarding.identity import (
    IdentityError,
    SiteIdentityRecord,
    center_urls_for,
    keys_dir,
    load_identity,
    record_from_reply,
    retry_delay,
    save_identity,
    token_fingerprint,
)
from schemas.bootstrap import BootstrapToken
from schemas.controller import Inventory, OnboardReply, OnboardRequest

LOCK_FILE = "onboarding.lock"
_LOCK_POLL_S = 0.1


class OnboardingError(RuntimeError):
    """Onboarding did not happen; the message says why."""


class OnboardingRefused(OnboardingError):
    """The center (or its NATS server) refused this token; retrying will not help.

    `code`: token_unknown | token_wrong | token_expired | token_used from the controller,
    another controller code (site_unknown, public_key_invalid...), or bootstrap_unauthorized
    when the server refused the token's bootstrap credentials.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"onboarding refused ({code}): {message}")
        self.code = code
        self.message = message


class CenterUnreachable(OnboardingError):
    """No answer from the center within the onboarding timeout."""


@dataclass(frozen=True)
class RetryPolicy:
    """Pacing of onboarding attempts while the center cannot be reached."""

    min_s: float = 0.5
    max_s: float = 30.0
    connect_timeout_s: float = 5.0
    # Generous: a reply lost to a short timeout may leave the token consumed at the center.
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.max_s:
            raise ValueError("need 0 < min_s <= max_s")
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("timeouts must be positive")


async def onboard(
    token: BootstrapToken,
    data_dir: Path,
    *,
    center_url: str | None = None,
    timeout_s: float | None = 300.0,
    retry: RetryPolicy | None = None,
    inventory: Inventory | None = None,
) -> SiteIdentityRecord:
    """The site's identity: the stored one, else onboard with `token` and store it.

    `center_url` (comma-separated for several) overrides the token's center URLs. With
    `timeout_s=None` an unreachable center is retried for ever (a zero-touch site may boot
    before its network is up). Raises OnboardingRefused, CenterUnreachable, IdentityError,
    or ValueError for an unusable token/URL.
    """
    site = subjects.site_id(token.site)
    log = get_logger("edge_agent.onboarding", site=site)
    existing = load_identity(data_dir, site)
    if existing is not None:
        _log_already_onboarded(existing, token, data_dir)
        return existing
    urls = center_urls_for(token, center_url)
    retry = retry or RetryPolicy()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    async with _exclusive(data_dir, deadline):
        # Another process may have onboarded while we waited for the lock.
        existing = load_identity(data_dir, site)
        if existing is not None:
            _log_already_onboarded(existing, token, data_dir)
            return existing
        keys = SiteIdentity(keys_dir(data_dir))
        # Created once and kept: every attempt (and a restart mid-way) presents the same key.
        public_key = keys.public_key
        request = OnboardRequest(
            site=site,
            token_secret=token.secret,
            user_public_key=public_key,
            inventory=inventory or build_inventory(package_version(), 0, {}, 0, data_dir),
        )
        started = time.monotonic()
        with _bootstrap_creds(token, keys.directory) as creds:
            reply = await _request(urls, creds, request, deadline, retry)
        creds_path = keys.install(reply.user_jwt) if reply.user_jwt else None
        record = record_from_reply(
            reply,
            site=site,
            onboarded_at=datetime.now(UTC),
            credentials=creds_path,
            user_public_key=public_key,
            center_urls=urls,
            token_secret=token.secret,
        )
        save_identity(data_dir, record)
        log.info(
            "onboarded",
            group=record.group,
            leaf_urls=list(record.leaf_urls),
            credentials=str(creds_path) if creds_path else None,
            heartbeat_interval_s=record.heartbeat_interval_s,
            took_ms=round((time.monotonic() - started) * 1e3, 1),
        )
        return record


def _log_already_onboarded(
    record: SiteIdentityRecord, token: BootstrapToken, data_dir: Path
) -> None:
    same = record.token_sha256 == token_fingerprint(token.secret)
    get_logger("edge_agent.onboarding", site=record.site).info(
        "already_onboarded_token_ignored",
        onboarded_at=record.onboarded_at.isoformat(),
        same_token=same,
        hint=None
        if same
        else f"a different token was given; to onboard again remove {data_dir}/identity.json",
    )


async def _request(
    urls: tuple[str, ...],
    creds: Path | None,
    request: OnboardRequest,
    deadline: float | None,
    retry: RetryPolicy,
) -> OnboardReply:
    """Send the request until answered; transport failures are retried with backoff."""
    log = get_logger("edge_agent.onboarding", site=request.site)
    attempt = 0
    request_may_have_arrived = False
    while True:
        attempt += 1
        try:
            return await _attempt(urls, creds, request, deadline, retry)
        except RemoteError as exc:
            raise _refusal(exc, request_may_have_arrived) from None
        except BusConnectError as exc:
            if "authorization violation" in str(exc).lower():
                raise OnboardingRefused(
                    "bootstrap_unauthorized",
                    f"the center's server refused the token's bootstrap credentials: {exc}",
                ) from None
            error = str(exc)
        except NatsTimeoutError:
            request_may_have_arrived = True
            error = "no answer to the onboarding request"
        except NoRespondersError:
            error = "the center's server is up but no controller answers onboarding"
        except (ConnectionClosedError, OSError) as exc:
            error = repr(exc)
        delay = retry_delay(attempt, retry.min_s, retry.max_s) * random.uniform(0.8, 1.0)
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise CenterUnreachable(
                f"could not onboard through {', '.join(urls)} within the timeout "
                f"({attempt} attempts); last error: {error}"
            )
        log.warning("onboarding_retry", attempt=attempt, error=error, retry_in_s=delay)
        await asyncio.sleep(delay)


async def _attempt(
    urls: tuple[str, ...],
    creds: Path | None,
    request: OnboardRequest,
    deadline: float | None,
    retry: RetryPolicy,
) -> OnboardReply:
    def bounded(limit: float) -> float:
        if deadline is None:
            return limit
        return max(0.1, min(limit, deadline - time.monotonic()))

    config = NatsConfig.from_url(
        ",".join(urls),
        name=f"edgebus-onboard-{request.site}",
        credentials=creds,
        # The bootstrap user may read only `_INBOX_bootstrap.>`; a random token per
        # connection keeps concurrent onboardings' replies apart.
        inbox_prefix=subjects.bootstrap_inbox_prefix(secrets.token_hex(8)),
        connect_timeout_s=bounded(retry.connect_timeout_s),
        reconnect=ReconnectPolicy(max_attempts=0),
    )
    bus = await Bus.connect(config, scope=request.site, source=f"/sites/{request.site}")
    try:
        reply = await bus.request(
            subjects.onboard(), request, OnboardReply, timeout=bounded(retry.request_timeout_s)
        )
    finally:
        await bus.close()
    return reply.data


def _refusal(exc: RemoteError, request_may_have_arrived: bool) -> OnboardingRefused:
    message = str(exc).removeprefix(f"{exc.code}: ")
    if exc.code == "token_used" and request_may_have_arrived:
        message += (
            " (an earlier attempt of this site got no answer: the center may have onboarded"
            " it and the reply was lost)"
        )
    return OnboardingRefused(exc.code, message)


@contextlib.contextmanager
def _bootstrap_creds(token: BootstrapToken, directory: Path) -> Iterator[Path | None]:
    """The token's bootstrap creds as a private file for the connection, removed after."""
    if not token.bootstrap_creds:
        yield None
        return
    path = write_private(directory / f".bootstrap-{os.getpid()}.creds", token.bootstrap_creds)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _open_lock(data_dir: Path) -> IO[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return (data_dir / LOCK_FILE).open("a+")


@contextlib.asynccontextmanager
async def _exclusive(data_dir: Path, deadline: float | None) -> AsyncIterator[None]:
    """One onboarding per data dir at a time (two processes would make two keypairs)."""
    with _open_lock(data_dir) as lock:
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise CenterUnreachable(
                        f"another process is onboarding {data_dir} and did not finish in time"
                    ) from None
                await asyncio.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


__all__ = [
    "CenterUnreachable",
    "IdentityError",
    "OnboardingError",
    "OnboardingRefused",
    "RetryPolicy",
    "load_identity",
    "onboard",
]
