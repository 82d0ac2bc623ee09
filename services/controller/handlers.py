"""Request handlers: operator commands on the registry, and site onboarding with a token.

Each handler reads, decides with the pure modules, writes with compare-and-set, audits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from bus.log import get_logger
from schemas.common import ErrorReply
from schemas.controller import (
    Availability,
    OnboardReply,
    OnboardRequest,
    SiteChange,
    SiteChanged,
    SiteRecord,
    SitesAdd,
    SitesAdded,
    SitesList,
    SitesQuery,
)
from schemas.envelope import Event, EventData
from services.controller import records, tokens
from services.controller.availability import (
    AlarmAction,
    alarm_on_managed_change,
)
from services.controller.config import ControllerConfig
from services.controller.credentials import SiteAuthority
from services.controller.emitter import Emitter
from services.controller.liveness import Sighting
from services.controller.records import Refusal
from services.controller.registry import Registry
from services.controller.selection import page, select
from services.controller.tokens import BootstrapToken, TokenRecord, TokenVerdict

SightingLookup = Callable[[str], Sighting | None]
_ONBOARDS = (TokenVerdict.VALID, TokenVerdict.REPEAT)


class TokenStore:
    """BOOTSTRAP_TOKENS bucket: one token record per site, consumed by compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, site: str) -> tuple[TokenRecord | None, int]:
        try:
            entry = await self._kv.get(site)
        except KeyNotFoundError:
            return None, 0
        revision = entry.revision or 0
        try:
            return TokenRecord.model_validate_json(entry.value or b""), revision
        except ValidationError:
            return None, revision

    async def put(self, record: TokenRecord) -> None:
        await self._kv.put(record.site, record.model_dump_json().encode())

    async def consume(
        self, record: TokenRecord, revision: int, now: datetime, public_key: str | None
    ) -> bool:
        """Mark the token used (by `public_key`) iff nobody did since `revision` was read."""
        used = records.mark_token_used(record, now, public_key)
        try:
            await self._kv.update(record.site, used.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def delete(self, site: str) -> None:
        await self._kv.delete(site)


# The site's whole effective config at onboarding (`{}` when config sync does not answer).
DesiredConfigLookup = Callable[[str], Awaitable[dict[str, Any]]]


class SiteRequests:
    """The controller's request handlers; any replica may serve any request."""

    def __init__(
        self,
        *,
        registry: Registry,
        tokens: TokenStore,
        emitter: Emitter,
        config: ControllerConfig,
        authority: SiteAuthority | None,
        sightings: SightingLookup,
        clock: Callable[[], datetime],
        desired_config: DesiredConfigLookup | None = None,
    ) -> None:
        self._registry = registry
        self._tokens = tokens
        self._emitter = emitter
        self._config = config
        self._authority = authority
        self._sightings = sightings
        self._clock = clock
        self._desired_config = desired_config
        self.served: dict[str, int] = {"add": 0, "query": 0, "change": 0, "onboard": 0}
        self._log = get_logger("controller.requests", replica=config.replica_id)

    # -- sites add -----------------------------------------------------------------------

    async def add(self, request: Event[SitesAdd]) -> EventData:
        self.served["add"] += 1
        data, now = request.data, self._clock()
        issued: dict[str, str] = {}
        refused: dict[str, str] = {}
        limit = asyncio.Semaphore(self._config.write_concurrency)
        # Without them a new site could not even reach us on a center with auth.
        creds = self._authority.bootstrap_credentials() if self._authority else None

        async def add_one(site: str) -> None:
            async with limit:
                try:
                    issued[site] = await self._add_site(site, data, now, creds)
                except Refusal as refusal:
                    refused[site] = refusal.message
                    allowed, reason = False, f"{refusal.code}: {refusal.message}"
                except Exception as exc:  # one site's store failure must not fail the batch
                    self._log.error("add_failed", site=site, error=repr(exc))
                    refused[site] = f"internal error: {exc!r}"
                    allowed, reason = False, f"internal_error: {exc!r}"
                else:
                    allowed = True
                    reason = f"group={data.group} labels={data.labels} ttl={data.token_ttl_s:g}s"
                await self._emitter.audit(
                    "add",
                    site=site,
                    allowed=allowed,
                    reason=reason,
                    actor=request.source,
                    at=now,
                    correlation_id=request.id,
                )

        await asyncio.gather(*(add_one(site) for site in dict.fromkeys(data.sites)))
        return SitesAdded(
            tokens=dict(sorted(issued.items())),
            expires_at=now + timedelta(seconds=data.token_ttl_s),
            refused=dict(sorted(refused.items())),
        )

    async def _add_site(
        self, site: str, data: SitesAdd, now: datetime, bootstrap_creds: str | None
    ) -> str:
        await self._registry.mutate(
            site, lambda r: records.plan_add(r, site, data.group, data.labels, now)
        )
        # A new token replaces any earlier one: only the newest secret onboards.
        secret, token_record = tokens.mint(site, now, data.token_ttl_s)
        await self._tokens.put(token_record)
        return BootstrapToken(site, secret, self._config.public_urls, bootstrap_creds).encode()

    # -- sites query -----------------------------------------------------------------------

    async def query(self, request: Event[SitesQuery]) -> EventData:
        self.served["query"] += 1
        q = request.data
        # Read-your-writes across replicas: a change served by another replica a moment
        # ago must show up here.
        await self._registry.barrier(self._config.read_barrier_timeout_s)
        one = self._registry.get(q.site) if q.site is not None else None
        candidates = ([one] if one else []) if q.site is not None else self._registry.records()
        chosen = select(candidates, q)
        items, next_after = page(chosen, q.after, q.limit)
        return SitesList(
            sites=[self._overlay(r) for r in items], total=len(chosen), next_after=next_after
        )

    def _overlay(self, record: SiteRecord) -> SiteRecord:
        """The record with this replica's freshest heartbeat (persisted only now and then)."""
        sighting = self._sightings(record.site)
        return records.with_sighting(record, sighting) if sighting is not None else record

    # -- sites change / delete -------------------------------------------------------------

    async def change(self, request: Event[SiteChange]) -> EventData:
        self.served["change"] += 1
        change, now = request.data, self._clock()
        action = "delete" if change.delete else "change"
        try:
            if self._registry.get(change.site) is None:  # maybe just added via another replica
                await self._registry.read(change.site)
            if change.delete:
                reply = await self._delete(change.site, now)
            else:
                reply = await self._change(change, now)
        except Refusal as refusal:
            return await self._refuse(action, change.site, refusal, request, now)
        await self._emitter.audit(
            action,
            site=change.site,
            allowed=True,
            reason=records.describe_change(change),
            actor=request.source,
            at=now,
            correlation_id=request.id,
        )
        return reply

    async def _change(self, change: SiteChange, now: datetime) -> SiteChanged:
        def update(record: SiteRecord | None) -> SiteRecord:
            if record is None:
                raise _unknown(change.site)
            return records.apply_change(record, change)

        done = await self._registry.mutate(change.site, update)
        before, after = done.before, done.after
        assert before is not None and after is not None
        alarm = alarm_on_managed_change(after.availability, before.managed, after.managed)
        text = "site managed again while offline" if after.managed else "site unmanaged"
        await self._emitter.site_alarm(alarm, change.site, text, now)
        return SiteChanged(record=self._overlay(after))

    async def _delete(self, site: str, now: datetime) -> SiteChanged:
        current = self._registry.get(site)
        if current is None:
            raise _unknown(site)
        # Credentials first: if revocation fails the site stays registered, so the
        # operator can retry instead of leaving live credentials for a forgotten site.
        if current.user_public_key and self._authority is not None:
            try:
                await self._authority.revoke(current.user_public_key)
            except Exception as exc:
                raise Refusal("revoke_failed", f"could not revoke credentials: {exc}") from exc

        def remove(record: SiteRecord | None) -> None:
            if record is None:
                raise _unknown(site)
            return None

        done = await self._registry.mutate(site, remove)
        await self._tokens.delete(site)
        before = done.before
        assert before is not None
        if before.managed and before.availability == Availability.OFFLINE:
            await self._emitter.site_alarm(AlarmAction.CLEAR, site, "site deleted", now)
        return SiteChanged(record=before, deleted=True)

    # -- onboarding ------------------------------------------------------------------------

    async def onboard(self, request: Event[OnboardRequest]) -> EventData:
        self.served["onboard"] += 1
        now = self._clock()
        try:
            reply, repeat = await self._onboard(request.data, now)
        except Refusal as refusal:
            return await self._refuse("onboard", request.data.site, refusal, request, now)
        if self._desired_config is not None:
            # The site starts on its full config; if sync does not answer it pulls it later.
            desired = await self._desired_config(reply.site)
            reply = reply.model_copy(update={"desired_config": desired})
        credentials = "issued" if reply.user_jwt else "none (no auth)"
        reason = f"onboarded, credentials {credentials}"
        if repeat:
            reason = f"repeated for the same key (an earlier reply was lost?), {credentials}"
        await self._emitter.audit(
            "onboard",
            site=request.data.site,
            allowed=True,
            reason=reason,
            actor=request.source,
            at=now,
            correlation_id=request.id,
        )
        return reply

    async def _onboard(self, req: OnboardRequest, now: datetime) -> tuple[OnboardReply, bool]:
        """The reply, and whether it repeats an onboarding already granted to this key."""
        site, key = req.site, req.user_public_key
        record = self._registry.get(site)
        if record is None:
            record, _ = await self._registry.read(site)
        token, token_revision = await self._tokens.get(site)
        verdict = records.onboard_verdict(record, token, req.token_secret, now, key)
        if record is None or token is None or verdict not in _ONBOARDS:
            raise Refusal(verdict.value, records.refusal_message(verdict, site, token))
        user_jwt = self._issue(site, record.group, key)
        if verdict == TokenVerdict.REPEAT:
            return self._reply(record, user_jwt), True
        # The commit point: of two onboardings with the same token, one consumes it.
        if not await self._tokens.consume(token, token_revision, now, key):
            latest, _ = await self._tokens.get(site)
            verdict = records.onboard_verdict(record, latest, req.token_secret, now)
            if verdict in _ONBOARDS:  # it changed under us: never a second winner
                verdict = TokenVerdict.USED
            raise Refusal(verdict.value, records.refusal_message(verdict, site, latest))

        def onboarded(current: SiteRecord | None) -> SiteRecord:
            if current is None:
                raise _unknown(site)
            return records.mark_onboarded(current, now, key, req.inventory)

        done = await self._registry.mutate(site, onboarded)
        assert done.after is not None
        return self._reply(done.after, user_jwt), False

    def _reply(self, record: SiteRecord, user_jwt: str | None) -> OnboardReply:
        return OnboardReply(
            site=record.site,
            group=record.group,
            labels=record.labels,
            user_jwt=user_jwt,
            leaf_urls=list(self._config.leaf_urls),
            heartbeat_interval_s=self._config.policy.heartbeat_interval_s,
            desired_config={},
        )

    def _issue(self, site: str, group: str, public_key: str | None) -> str | None:
        """The site's user JWT, before the token is consumed: a bad key costs no token."""
        if self._authority is None:
            return None
        if not public_key:
            raise Refusal(
                "public_key_required",
                "this center issues per-site credentials: send the public key of the "
                "site's own nkey (user_public_key)",
            )
        try:
            return self._authority.issue_site_credentials(site, group, public_key)
        except ValueError as exc:  # bus.auth.AuthError: malformed or revoked key
            raise Refusal("public_key_invalid", str(exc)) from None

    # -- refusals --------------------------------------------------------------------------

    async def _refuse(
        self, action: str, site: str, refusal: Refusal, request: Event[Any], now: datetime
    ) -> ErrorReply:
        self._log.warning(
            "refused",
            action=action,
            site=site,
            code=refusal.code,
            reason=refusal.message,
            event_id=request.id,
        )
        await self._emitter.audit(
            action,
            site=site,
            allowed=False,
            reason=f"{refusal.code}: {refusal.message}",
            actor=request.source,
            at=now,
            correlation_id=request.id,
        )
        return ErrorReply(code=refusal.code, message=refusal.message)


def _unknown(site: str) -> Refusal:
    return Refusal("site_unknown", f"no site {site} in the registry")
