"""`ConfigSync`: the agent part that applies desired config from the center and reports it.

Pushes arrive on `down.<site>.config`; the agent also pulls its whole config when it starts,
keeps what it runs on disk (it restarts on it with no center), and reports after each apply
and periodically, which is how the center finds and fixes drift.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import ValidationError

from bus import subjects
from bus.client import Bus, RemoteError
from bus.log import get_logger
from edge_agent.alarms.local import LocalAlarms
from edge_agent.sync.appliers import Applier, ApplyRefused
from edge_agent.sync.store import AppliedStore, Running
from schemas import EventDecodeError
from schemas.alarms import Severity
from schemas.sync import (
    AppliedKind,
    ApplyState,
    ConfigBundle,
    ConfigDesired,
    ConfigPull,
    ConfigReport,
    ReportReason,
)

ALARM_ENTITY = "config"


def apply_failed_cause(kind: str) -> str:
    return f"config_apply_failed_{kind}"


@dataclass(frozen=True)
class SyncTuning:
    report_interval_s: float = 60.0
    pull_timeout_s: float = 5.0


def seed_from_bundle(store: AppliedStore, bundle: ConfigBundle) -> None:
    """Keep a bundle received at onboarding as the config to start on (applied at start)."""
    now = datetime.now(UTC)
    for desired in bundle.configs:
        store.running[desired.kind] = Running(desired.rev, desired.digest, desired.config)
        store.attempts[desired.kind] = AppliedKind(
            kind=desired.kind,
            state=ApplyState.APPLIED,
            rev=desired.rev,
            digest=desired.digest,
            at=now,
        )
    store.save()


class ConfigSync:
    def __init__(
        self,
        bus: Bus,
        site: str,
        store: AppliedStore,
        appliers: Iterable[Applier],
        alarms: LocalAlarms | None = None,
        tuning: SyncTuning | None = None,
    ) -> None:
        self.bus = bus
        self.site = subjects.site_id(site)
        self.store = store
        self.appliers = {applier.kind: applier for applier in appliers}
        self.alarms = alarms
        self.tuning = tuning or SyncTuning()
        self._lock = asyncio.Lock()
        self.stats = {"received": 0, "applied": 0, "failed": 0, "reports": 0}
        self._log = get_logger("edge_agent.sync", site=self.site)

    # -- start-up ---------------------------------------------------------------------------

    async def restore(self) -> None:
        """Apply the config kept on disk (before the other parts start); errors are logged
        and reported, the defaults stay in force for that kind."""
        for kind, running in self.store.running.items():
            applier = self.appliers.get(kind)
            if applier is None:
                continue
            try:
                await applier.apply(applier.model.model_validate(running.config))
            except Exception as exc:
                self._log.error("restore_failed", kind=kind, rev=running.rev, error=repr(exc))
            else:
                self._log.info("config_restored", kind=kind, rev=running.rev)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.bus.nc.subscribe(subjects.config_desired(self.site), cb=self._on_desired)
        try:
            await self.pull()
            await self.report("startup")
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.tuning.report_interval_s)
                if not stop.is_set():
                    await self.report("periodic")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def pull(self) -> bool:
        """Ask the center for the whole config and apply it; False if it did not answer."""
        try:
            reply = await self.bus.request(
                subjects.sync_pull(self.site),
                ConfigPull(),
                ConfigBundle,
                timeout=self.tuning.pull_timeout_s,
            )
        except (NatsTimeoutError, NoRespondersError, RemoteError, EventDecodeError) as exc:
            self._log.info("config_pull_unanswered", error=repr(exc))
            return False
        for desired in reply.data.configs:
            await self.handle(desired)
        return True

    # -- one desired config ----------------------------------------------------------------

    async def _on_desired(self, msg: Msg) -> None:
        try:
            desired = self.bus.registry.decode_as(msg.data, ConfigDesired).data
        except EventDecodeError as exc:
            await self.bus.dead_letters.record(
                component="config-sync",
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
                reason=exc.reason,
                detail=exc.message,
            )
            return
        await self.handle(desired)
        await self.report("apply")

    async def handle(self, desired: ConfigDesired) -> AppliedKind:
        """Apply one desired config unless it is what runs already."""
        async with self._lock:
            self.stats["received"] += 1
            running = self.store.running.get(desired.kind)
            if running is not None and running.digest == desired.digest:
                attempt = self._attempt(desired, ApplyState.APPLIED)
            else:
                # No "older revision" check: a site that changes group may rightly get a
                # lower revision than it runs; the center only ever sends its newest.
                attempt = await self._apply(desired, running)
            self.store.attempts[desired.kind] = attempt
            self.store.save()
            return attempt

    async def _apply(self, desired: ConfigDesired, running: Running | None) -> AppliedKind:
        kind = desired.kind
        applier = self.appliers.get(kind)
        try:
            if applier is None:
                raise ApplyRefused(f"this agent has no config kind {kind!r}")
            try:
                model = applier.model.model_validate(desired.config)
            except ValidationError as exc:
                raise ApplyRefused(f"invalid {kind} config: {exc.errors()[0]['msg']}") from None
            await applier.apply(model)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ApplyRefused) else f"{type(exc).__name__}: {exc}"
            self.stats["failed"] += 1
            self._log.error("config_apply_failed", kind=kind, rev=desired.rev, error=reason)
            if self.alarms is not None:
                await self.alarms.raise_(
                    ALARM_ENTITY,
                    apply_failed_cause(kind),
                    Severity.MAJOR,
                    f"{kind} rev {desired.rev} not applied: {reason}"[:2000],
                )
            return self._attempt(
                desired,
                ApplyState.FAILED,
                error=reason[:2000],
                running_rev=running.rev if running else None,
            )
        self.store.running[kind] = Running(desired.rev, desired.digest, desired.config)
        self.stats["applied"] += 1
        self._log.info("config_applied", kind=kind, rev=desired.rev)
        if self.alarms is not None:
            await self.alarms.clear(ALARM_ENTITY, apply_failed_cause(kind), f"rev {desired.rev}")
        return self._attempt(desired, ApplyState.APPLIED)

    def _attempt(
        self,
        desired: ConfigDesired,
        state: ApplyState,
        *,
        error: str | None = None,
        running_rev: int | None = None,
    ) -> AppliedKind:
        return AppliedKind(
            kind=desired.kind,
            state=state,
            rev=desired.rev,
            digest=desired.digest,
            error=error,
            running_rev=running_rev if state == ApplyState.FAILED else desired.rev,
            at=datetime.now(UTC),
        )

    # -- reports ----------------------------------------------------------------------------

    async def report(self, reason: ReportReason) -> None:
        """Tell the center what runs here (lost while the link is down: the next one counts)."""
        report = ConfigReport(
            site=self.site,
            reason=reason,
            kinds=list(self.store.attempts.values()),
        )
        try:
            await self.bus.emit(subjects.sync_report(self.site), report)
            self.stats["reports"] += 1
        except Exception as exc:  # our own server is down: the next report goes out
            self._log.warning("config_report_failed", error=repr(exc))
