"""Config sync for virtual sites: the agent's protocol, without the components behind it.

Each `ConfigDesired` on `down.<site>.config` is decoded and validated against its kind's
model exactly as a real agent does, kept as applied, and answered with a `ConfigReport`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from bus import subjects
from bus.client import Bus
from schemas import REGISTRY, EventDecodeError
from schemas.sync import AppliedKind, ApplyState, ConfigDesired, ConfigReport, config_kinds

QUEUE = "simulator-config"
DESIRED_ANY = "down.*.config"


class SimulatedConfigSync:
    """Answers config pushes for the virtual sites `is_ours(site)` says belong to the fleet.

    One queue subscription per connection: each push reaches one connection, once.
    """

    def __init__(self, buses: Sequence[Bus], is_ours: Callable[[str], bool]) -> None:
        self._buses = list(buses)
        self._is_ours = is_ours
        self._kinds: dict[str, type[BaseModel]] = config_kinds()
        self._decode = REGISTRY.decoder_for(ConfigDesired)
        self._subs: list[Subscription] = []
        self.applied: dict[str, dict[str, AppliedKind]] = {}
        self.stats = {"received": 0, "applied": 0, "failed": 0, "foreign": 0, "invalid": 0}

    async def start(self) -> None:
        for bus in self._buses:
            self._subs.append(
                await bus.nc.subscribe(DESIRED_ANY, queue=QUEUE, cb=self._handler(bus))
            )

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()

    def _handler(self, bus: Bus) -> Callable[[Msg], Awaitable[None]]:
        async def on_desired(msg: Msg) -> None:
            await self._on_desired(bus, msg)

        return on_desired

    async def _on_desired(self, bus: Bus, msg: Msg) -> None:
        self.stats["received"] += 1
        site = msg.subject.split(".")[1]
        if not self._is_ours(site):
            self.stats["foreign"] += 1
            return
        try:
            desired = self._decode(msg.data).data
        except EventDecodeError:
            self.stats["invalid"] += 1
            return
        applied = self._apply(desired)
        kinds = self.applied.setdefault(site, {})
        kinds[desired.kind] = applied
        report = ConfigReport(site=site, reason="apply", kinds=list(kinds.values()))
        await bus.emit(subjects.sync_report(site), report)

    def _apply(self, desired: ConfigDesired) -> AppliedKind:
        model = self._kinds.get(desired.kind)
        error = None
        if model is None:
            error = f"this agent has no config kind {desired.kind!r}"
        else:
            try:
                model.model_validate(desired.config)
            except ValidationError as exc:
                error = f"invalid {desired.kind} config: {exc.errors()[0]['msg']}"
        state = ApplyState.APPLIED if error is None else ApplyState.FAILED
        self.stats["applied" if error is None else "failed"] += 1
        return AppliedKind(
            kind=desired.kind,
            state=state,
            rev=desired.rev,
            digest=desired.digest,
            error=error,
            running_rev=desired.rev if error is None else None,
            at=datetime.now(UTC),
        )
