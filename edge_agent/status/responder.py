"""Answers `local.<site>.status` with a `SiteStatusReport` built from the agent's live parts.

The parts are read through plain callables, so the responder knows nothing of how they work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.subscription import Subscription

from bus import subjects
from bus.client import Bus
from schemas import Event
from schemas.site import IngestCounters, SiteStatusQuery, SiteStatusReport

COMPONENT = "status"


def _nothing() -> Mapping[str, Any]:
    return {}


def _no_alarms() -> list[str]:
    return []


@dataclass(frozen=True)
class StatusSources:
    """Where each part of the report comes from; each callable is cheap and never blocks."""

    ingest: Callable[[], Mapping[str, Any]] = _nothing
    replay: Callable[[], Mapping[str, Any]] = _nothing
    active_alarms: Callable[[], list[str]] = _no_alarms
    dead_letters: Callable[[], Mapping[str, int]] = _nothing
    bridge: Callable[[], Mapping[str, int]] = _nothing


def build_report(
    site: str,
    agent_version: str,
    started_at: datetime,
    sources: StatusSources,
    now: datetime | None = None,
) -> SiteStatusReport:
    """The report as of `now`; a source that fails leaves its part empty rather than no answer."""
    now = now or datetime.now(UTC)
    ingest = _safe(sources.ingest, {})
    counters = IngestCounters(
        **{k: v for k, v in ingest.items() if k in IngestCounters.model_fields}
    )
    return SiteStatusReport(
        site=site,
        agent_version=agent_version,
        started_at=started_at,
        uptime_s=max(0.0, (now - started_at).total_seconds()),
        ingest=counters,
        dead_letters=dict(_safe(sources.dead_letters, {})),
        replay=dict(_safe(sources.replay, {})),
        active_alarms=sorted(_safe(sources.active_alarms, [])),
        bridge=dict(_safe(sources.bridge, {})),
    )


def _safe(source: Callable[[], Any], default: Any) -> Any:
    try:
        return source()
    except Exception:  # a broken part must not make the whole status unanswerable
        return default


class StatusResponder:
    """Serves the site's status request on the site's own server (works offline)."""

    def __init__(
        self,
        bus: Bus,
        site: str,
        sources: StatusSources,
        *,
        agent_version: str,
        started_at: datetime | None = None,
    ) -> None:
        self.bus = bus
        self.site = subjects.site_id(site)
        self.sources = sources
        self.agent_version = agent_version
        self.started_at = started_at or datetime.now(UTC)
        self.answered = 0
        self._sub: Subscription | None = None

    @property
    def subject(self) -> str:
        return subjects.local_control(self.site, "status")

    async def run(self, stop: asyncio.Event) -> None:
        """Answer until `stop` is set."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self.bus.serve(
                self.subject, SiteStatusQuery, self._answer, component=COMPONENT
            )

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def _answer(self, request: Event[SiteStatusQuery]) -> SiteStatusReport:
        self.answered += 1
        return build_report(self.site, self.agent_version, self.started_at, self.sources)
