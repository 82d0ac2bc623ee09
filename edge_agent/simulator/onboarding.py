"""Onboarding a virtual fleet: `sites.add` in batches, then one `OnboardRequest` per site.

Pipelined: add batches and onboarding requests are in flight together, each bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus import subjects
from bus.auth import KeyKind, new_seed, public_key
from bus.client import Bus, RemoteError
from bus.log import get_logger
from edge_agent.simulator import plan
from edge_agent.simulator.config import SimulatorConfig
from edge_agent.simulator.wire import site_source
from schemas import REGISTRY, new_event
from schemas.bootstrap import BootstrapToken
from schemas.common import ErrorReply
from schemas.controller import (
    Inventory,
    OnboardReply,
    OnboardRequest,
    SiteRecord,
    SitesAdd,
    SitesAdded,
    SitesList,
    SitesQuery,
)
from schemas.envelope import Event, EventData
from schemas.errors import EventDecodeError

R = TypeVar("R", bound=EventData)
SERVICE = "controller"
RETRY_DELAY_S = 0.5
# A transport error, not an answer: the request is worth sending again.
_TRANSIENT = (NatsTimeoutError, TimeoutError, NoRespondersError, ConnectionClosedError)


@dataclass
class OnboardSummary:
    """What one onboarding pass did."""

    requested: int = 0  # sites this pass set out to onboard
    adopted: int = 0  # onboarded by an earlier run of this fleet (found in the registry)
    added: int = 0  # tokens the controller minted
    onboarded: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # site -> "code: why"
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Sites onboarded per second (add and onboard, end to end)."""
        return self.onboarded / self.seconds if self.seconds > 0 else 0.0


async def request_as(
    bus: Bus, source: str, subject: str, data: EventData, model: type[R], timeout: float
) -> Event[R]:
    """`Bus.request` with the event's `source` set to the site it speaks for."""
    msg = await bus.nc.request(
        subject, REGISTRY.encode(new_event(data, source=source)), timeout=timeout
    )
    try:
        return REGISTRY.decode_as(msg.data, model)
    except EventDecodeError:
        error = REGISTRY.decode_as(msg.data, ErrorReply)
        raise RemoteError(error.data.code, error.data.message) from None


async def fleet_records(bus: Bus, prefix: str, timeout: float) -> list[SiteRecord]:
    """Every registry record carrying this fleet's labels (from earlier runs)."""
    found: list[SiteRecord] = []
    after: str | None = None
    while True:
        answer = await bus.request(
            subjects.control(SERVICE, "sites", "query"),
            SitesQuery(label_selector=plan.fleet_selector(prefix), after=after),
            SitesList,
            timeout=timeout,
        )
        found += answer.data.sites
        after = answer.data.next_after
        if after is None:
            return found


class FleetOnboarding:
    """One onboarding pass over the given site indices of a fleet."""

    def __init__(
        self,
        config: SimulatorConfig,
        ids: Sequence[str],
        buses: Sequence[Bus],
        *,
        inventory: Callable[[int], Inventory],
        on_onboarded: Callable[[int], Awaitable[None]],
    ) -> None:
        self._config = config
        self._ids = ids
        self._buses = buses
        self._inventory = inventory
        self._on_onboarded = on_onboarded
        self._groups = plan.group_names(config.prefix, config.groups)
        self.summary = OnboardSummary()
        self._log = get_logger("edge_agent.simulator", fleet=config.prefix)

    async def run(self, indices: Sequence[int], adopted: int = 0) -> OnboardSummary:
        started = time.monotonic()
        self.summary.requested, self.summary.adopted = len(indices), adopted
        c = self._config
        queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(maxsize=4 * c.add_batch)
        batches = self._batches(indices)
        adders = [
            asyncio.create_task(self._adder(batches, queue)) for _ in range(c.add_concurrency)
        ]
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(c.onboard_concurrency)]
        try:
            await asyncio.gather(*adders)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for task in (*adders, *workers):
                task.cancel()
        self.summary.seconds = time.monotonic() - started
        return self.summary

    def _batches(self, indices: Sequence[int]) -> Iterator[tuple[int, list[int]]]:
        """(group, up to MAX_BATCH site indices of that group): a request has one group."""
        by_group: dict[int, list[int]] = {}
        for index in indices:
            by_group.setdefault(plan.group_of(index, self._config.groups), []).append(index)
        size = self._config.add_batch
        for group, members in sorted(by_group.items()):
            for start in range(0, len(members), size):
                yield group, members[start : start + size]

    async def _adder(
        self,
        batches: Iterator[tuple[int, list[int]]],
        queue: asyncio.Queue[tuple[int, str] | None],
    ) -> None:
        # Shared iterator: each adder takes the next batch (no await between check and use).
        for group, members in batches:
            answer = await self._add(group, members)
            if answer is None:
                continue
            self.summary.added += len(answer.tokens)
            self.summary.refused.update(answer.refused)
            for site, token in answer.tokens.items():
                index = plan.site_index(self._config.prefix, len(self._ids), site)
                if index is not None:
                    await queue.put((index, token))

    async def _add(self, group: int, members: list[int]) -> SitesAdded | None:
        request = SitesAdd(
            sites=[self._ids[i] for i in members],
            group=self._groups[group],
            labels=plan.group_labels(self._config.prefix, group),
            token_ttl_s=self._config.token_ttl_s,
        )
        reason = ""
        for attempt in range(self._config.onboard_attempts):
            try:
                answer = await self._buses[0].request(
                    subjects.control(SERVICE, "sites", "add"),
                    request,
                    SitesAdded,
                    timeout=self._config.request_timeout_s,
                )
                return answer.data
            except RemoteError as exc:
                reason = f"{exc.code}: {exc}"
                break
            except _TRANSIENT as exc:
                reason = f"no answer to sites.add: {exc!r}"
                await asyncio.sleep(RETRY_DELAY_S * (attempt + 1))
        for i in members:
            self.summary.refused[self._ids[i]] = reason
        self._log.warning("add_failed", sites=len(members), reason=reason)
        return None

    async def _worker(self, queue: asyncio.Queue[tuple[int, str] | None]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            index, token = item
            try:
                await self._onboard_one(index, token)
            except Exception as exc:  # one site's trouble must not stop the pass
                self.summary.refused[self._ids[index]] = f"error: {exc!r}"

    async def _onboard_one(self, index: int, token_text: str) -> None:
        site = self._ids[index]
        token = BootstrapToken.decode(token_text)
        # The center only ever sees the public key; the seed is not needed to play the site
        # (the simulator identity publishes for it), so it is dropped at once.
        key = public_key(new_seed(KeyKind.USER)) if self._config.makes_site_keys else None
        request = OnboardRequest(
            site=site,
            token_secret=token.secret,
            user_public_key=key,
            inventory=self._inventory(index),
        )
        bus = self._buses[index % len(self._buses)]
        reason = ""
        for attempt in range(self._config.onboard_attempts):
            try:
                await request_as(
                    bus,
                    site_source(site),
                    subjects.onboard(),
                    request,
                    OnboardReply,
                    self._config.request_timeout_s,
                )
            except RemoteError as exc:
                # A retry of a request whose reply was lost: without a key the center
                # cannot tell it is us again, so look at the record.
                if attempt > 0 and exc.code == "token_used" and await self._is_onboarded(site):
                    break
                self.summary.refused[site] = f"{exc.code}: {exc}"
                return
            except _TRANSIENT as exc:
                reason = repr(exc)
                await asyncio.sleep(RETRY_DELAY_S * (attempt + 1))
                continue
            break
        else:
            self.summary.refused[site] = f"no answer to onboarding: {reason}"
            return
        self.summary.onboarded += 1
        await self._on_onboarded(index)

    async def _is_onboarded(self, site: str) -> bool:
        answer = await self._buses[0].request(
            subjects.control(SERVICE, "sites", "query"),
            SitesQuery(site=site, limit=1),
            SitesList,
            timeout=self._config.request_timeout_s,
        )
        return any(r.site == site and r.onboarded_at is not None for r in answer.data.sites)
