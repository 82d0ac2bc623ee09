"""`AlarmRuleEngine`: the site's alarm rules evaluated on its own device readings, swappable live.

Readings come from the local `evt.<site>.reading.*.*` subjects; the decisions of `rules` become
raises and clears through `LocalAlarms` (so they reach the replay log, in order, with their time).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import subjects
from bus.client import Bus
from bus.log import get_logger
from edge_agent.alarms.local import LocalAlarms
from edge_agent.alarms.rules import (
    RateWindow,
    rate_event,
    rate_text,
    rate_tick,
    silence_decision,
    silence_heard,
    silence_text,
    threshold_decision,
    threshold_text,
    value_at,
)
from edge_agent.alarms.waits import wait_any
from schemas import REGISTRY
from schemas.alarms import (
    MAX_RULES,
    AlarmRule,
    AlarmRulesConfig,
    RateRule,
    Severity,
    SilenceRule,
    ThresholdRule,
)
from schemas.devices import DeviceReading
from schemas.errors import EventDecodeError

ANY = "*"
# The engine's own alarm (an "agent" alarm): more rule instances than it will track.
ENGINE_ENTITY = "alarm-rules"
OWNER = "alarm_rules"  # of the alarms the rules raise (LocalAlarms keeps it across restarts)
TOO_MANY_CAUSE = "too_many_instances"
DEFAULT_MAX_INSTANCES = 50_000
_MATCH_CACHE_SIZE = 20_000
_QUEUE_WARN = 10_000
_STOP_DRAIN_S = 5.0


@dataclass(slots=True)
class _Instance:
    """One rule applied to one device (and channel): its alarm and what it remembers."""

    rule: AlarmRule
    device: str
    entity: str
    cause: str
    active: bool = False
    last_seen: float = 0.0  # silence: the last reading (or when watching began)
    window: RateWindow | None = None  # rate: the current window


@dataclass(frozen=True, slots=True)
class _Change:
    """A raise (severity set) or clear owed to LocalAlarms, with the time it was decided."""

    entity: str
    cause: str
    severity: Severity | None
    text: str
    at: datetime


@dataclass
class EngineStats:
    readings: int = 0  # readings that matched at least one rule
    unreadable: int = 0  # threshold rules that found no number at their path
    undecodable: int = 0
    raised: int = 0
    cleared: int = 0
    instances: int = 0
    untracked: int = 0  # instances refused past max_instances
    rules: int = 0


def _instance_key(rule: AlarmRule, device: str, channel: str) -> tuple[str, str, str]:
    """Thresholds watch each channel; silence and rate a device (or its one given channel)."""
    if isinstance(rule, ThresholdRule):
        return rule.id, device, channel
    return rule.id, device, rule.channel


def rule_of(cause: str) -> str:
    """The rule id in an alarm's probable cause (see `_cause`)."""
    return cause.split(":", 1)[0]


def _cause(rule: AlarmRule, channel: str) -> str:
    """The alarm's probable cause: the rule id (`<id>:<channel>` for a threshold on `*`)."""
    if isinstance(rule, ThresholdRule) and rule.channel == ANY:
        return f"{rule.id}:{channel}"
    return rule.id


class AlarmRuleEngine:
    """Rules from `apply_config` (or the constructor), evaluated until `run`'s stop is set.

    Rules are keyed by id: a rule a new config drops, or changes, has its active alarms
    cleared (a changed rule raises again if its new definition still holds).
    """

    def __init__(
        self,
        bus: Bus,
        site: str,
        alarms: LocalAlarms,
        rules: AlarmRulesConfig | None = None,
        *,
        tick_s: float = 1.0,
        max_rules: int = MAX_RULES,
        max_instances: int = DEFAULT_MAX_INSTANCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tick_s <= 0:
            raise ValueError("tick_s must be positive")
        self.site = subjects.site_id(site)
        self._bus = bus
        self._alarms = alarms
        self._tick_s = tick_s
        self._max_rules = max_rules
        self._max_instances = max_instances
        self._clock = clock
        self._config = AlarmRulesConfig()
        self._rules: dict[str, AlarmRule] = {}
        self._instances: dict[str, dict[tuple[str, str, str], _Instance]] = {}
        self._matches: dict[tuple[str, str], tuple[AlarmRule, ...]] = {}
        self._changes: asyncio.Queue[_Change] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._decode = REGISTRY.decoder_for(DeviceReading)
        self._too_many_raised = alarms.is_active(ENGINE_ENTITY, TOO_MANY_CAUSE)  # restored
        self.stats = EngineStats()
        self._log = get_logger("edge_agent.alarm_rules", site=self.site)
        if rules is not None:
            self.apply_config(rules)

    @property
    def config(self) -> AlarmRulesConfig:
        """The rules applied now."""
        return self._config

    def active(self) -> list[tuple[str, str]]:
        """(entity, probable cause) of every alarm the rules hold raised."""
        return [
            (inst.entity, inst.cause)
            for per_rule in self._instances.values()
            for inst in per_rule.values()
            if inst.active
        ]

    async def handed_over(self) -> None:
        """Return once every change decided so far went to LocalAlarms (tests, shutdown)."""
        await self._changes.join()

    # -- configuration ---------------------------------------------------------------

    def apply_config(self, config: AlarmRulesConfig) -> None:
        """Swap the rules now; ValueError (nothing changed) if this site cannot apply them."""
        if len(config.rules) > self._max_rules:
            raise ValueError(
                f"{len(config.rules)} alarm rules, this site evaluates at most {self._max_rules}"
            )
        explicit = sum(1 for r in config.rules if isinstance(r, SilenceRule) and r.device != ANY)
        if explicit > self._max_instances:
            raise ValueError(
                f"{explicit} watched devices, this site tracks at most {self._max_instances}"
            )
        new = {rule.id: rule for rule in config.rules}
        for rule_id, old in list(self._rules.items()):
            if new.get(rule_id) != old:
                self._retire(rule_id, "rule removed" if rule_id not in new else "rule changed")
        self._retire_restored(new)
        self._rules = new
        self._config = config
        self._matches.clear()
        now = self._clock()
        for rule in new.values():
            if isinstance(rule, SilenceRule) and rule.device != ANY:
                # A named device is watched from now on, even if it never sends anything.
                self._instance(rule, rule.device, rule.channel, now)
        self.stats.rules = len(new)
        self._count_instances()
        if self._too_many_raised and self.stats.instances < self._max_instances:
            self._too_many_raised = False
            self._changes.put_nowait(
                _Change(ENGINE_ENTITY, TOO_MANY_CAUSE, None, "rules changed", datetime.now(UTC))
            )
        self._wake.set()
        self._log.info("alarm_rules_applied", rules=sorted(new))

    def _retire_restored(self, rules: dict[str, AlarmRule]) -> None:
        """Alarms the rules raised before the agent restarted, whose rule is gone now (no
        instance holds them: nothing else would clear them)."""
        now = datetime.now(UTC)
        for alarm in self._alarms.owned_by(OWNER):
            if alarm.entity != ENGINE_ENTITY and rule_of(alarm.probable_cause) not in rules:
                self._changes.put_nowait(
                    _Change(alarm.entity, alarm.probable_cause, None, "rule removed", now)
                )

    def _retire(self, rule_id: str, why: str) -> None:
        for inst in self._instances.pop(rule_id, {}).values():
            if inst.active:
                self._owe(inst, False, why)

    # -- running ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Listen while there are rules, tick silence and rate windows, hand changes over."""
        drain = asyncio.create_task(self._drain(), name="alarm-rules-drain")
        sub: Subscription | None = None
        try:
            while not stop.is_set():
                if self._rules and sub is None:
                    sub = await self._bus.nc.subscribe(
                        subjects.site_readings(self.site), cb=self._on_msg
                    )
                elif not self._rules and sub is not None:
                    await sub.unsubscribe()
                    sub = None
                self.tick()
                self._wake.clear()
                await wait_any(stop, self._wake, timeout=self._tick_s)
                if drain.done():  # it never returns on its own: surface its crash
                    await drain
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changes.join(), timeout=_STOP_DRAIN_S)
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    async def _drain(self) -> None:
        """Raise and clear in decision order (one at a time: LocalAlarms keeps the order)."""
        while True:
            change = await self._changes.get()
            try:
                if change.severity is not None:
                    if await self._alarms.raise_(
                        change.entity,
                        change.cause,
                        change.severity,
                        change.text,
                        at=change.at,
                        owner=OWNER,
                    ):
                        self.stats.raised += 1
                elif await self._alarms.clear(
                    change.entity, change.cause, change.text, at=change.at
                ):
                    self.stats.cleared += 1
            except Exception as exc:  # the local server hiccuped: LocalAlarms keeps pending ones
                self._log.warning("alarm_change_failed", alarm=change.cause, error=repr(exc))
            finally:
                self._changes.task_done()

    # -- readings --------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) != 5:
            return
        self.on_reading(parts[3], parts[4], msg.data)

    def on_reading(self, device: str, channel: str, raw: bytes) -> None:
        """One reading event (encoded) of `device`/`channel`: evaluate every matching rule."""
        rules = self._matching(device, channel)
        if not rules:
            return
        self.stats.readings += 1
        now = self._clock()
        payload: Any = None
        for rule in rules:
            if isinstance(rule, ThresholdRule):
                if payload is None:
                    payload = self._payload(raw)
                    if payload is None:
                        return
                self._on_threshold(rule, device, channel, payload, now)
                continue
            inst = self._instance(rule, device, channel, now)
            if inst is None:
                continue
            if isinstance(rule, SilenceRule):
                inst.last_seen = now
                decision = silence_heard(inst.active)
                if decision is not None:
                    self._owe(inst, decision, silence_text(rule, None))
            else:
                window = inst.window or RateWindow(start=now, active=inst.active)
                inst.window, decision = rate_event(rule, window, now)
                if decision is not None:
                    self._owe(inst, decision, rate_text(rule, decision))

    def _on_threshold(
        self, rule: ThresholdRule, device: str, channel: str, payload: Any, now: float
    ) -> None:
        value = value_at(payload, rule.path)
        if value is None:
            self.stats.unreadable += 1
            return
        inst = self._instance(rule, device, channel, now)
        if inst is None:
            return
        decision = threshold_decision(rule, inst.active, value)
        if decision is not None:
            self._owe(inst, decision, threshold_text(rule, value, decision))

    def _payload(self, raw: bytes) -> Any:
        try:
            return self._decode(raw).data.payload
        except EventDecodeError as exc:
            self.stats.undecodable += 1
            if self.stats.undecodable == 1 or self.stats.undecodable % 1000 == 0:
                self._log.warning(
                    "reading_undecodable",
                    reason=exc.reason,
                    detail=exc.message,
                    count=self.stats.undecodable,
                )
            return None

    def _matching(self, device: str, channel: str) -> tuple[AlarmRule, ...]:
        key = (device, channel)
        found = self._matches.get(key)
        if found is None:
            if len(self._matches) >= _MATCH_CACHE_SIZE:
                self._matches.clear()
            found = tuple(
                rule
                for rule in self._rules.values()
                if rule.device in (ANY, device) and rule.channel in (ANY, channel)
            )
            self._matches[key] = found
        return found

    # -- time ------------------------------------------------------------------------

    def tick(self) -> None:
        """Silence limits and rate windows move on with time, readings or not."""
        now = self._clock()
        for rule_id, per_rule in self._instances.items():
            rule = self._rules.get(rule_id)
            if isinstance(rule, SilenceRule):
                for inst in per_rule.values():
                    decision = silence_decision(rule, inst.active, inst.last_seen, now)
                    if decision is not None:
                        self._owe(inst, decision, silence_text(rule, now - inst.last_seen))
            elif isinstance(rule, RateRule):
                for inst in per_rule.values():
                    if inst.window is None:
                        continue
                    inst.window, decision = rate_tick(rule, inst.window, now)
                    if decision is not None:
                        self._owe(inst, decision, rate_text(rule, decision))

    # -- instances and changes -------------------------------------------------------

    def _instance(self, rule: AlarmRule, device: str, channel: str, now: float) -> _Instance | None:
        per_rule = self._instances.setdefault(rule.id, {})
        key = _instance_key(rule, device, channel)
        inst = per_rule.get(key)
        if inst is not None:
            return inst
        if self.stats.instances >= self._max_instances:
            self.stats.untracked += 1
            self._too_many()
            return None
        cause = _cause(rule, channel)
        # Raised before this agent restarted: its clear is still owed.
        active = self._alarms.is_active(device, cause)
        inst = _Instance(rule, device, entity=device, cause=cause, active=active, last_seen=now)
        per_rule[key] = inst
        self.stats.instances += 1
        return inst

    def _count_instances(self) -> None:
        self.stats.instances = sum(len(per_rule) for per_rule in self._instances.values())

    def _too_many(self) -> None:
        if self._too_many_raised:
            return
        self._too_many_raised = True
        self._log.error("alarm_rule_instances_capped", max_instances=self._max_instances)
        self._changes.put_nowait(
            _Change(
                ENGINE_ENTITY,
                TOO_MANY_CAUSE,
                Severity.WARNING,
                f"more than {self._max_instances} rule instances: new devices are not evaluated",
                datetime.now(UTC),
            )
        )

    def _owe(self, inst: _Instance, raise_: bool, text: str) -> None:
        inst.active = raise_
        severity = inst.rule.severity if raise_ else None
        self._changes.put_nowait(
            _Change(inst.entity, inst.cause, severity, text[:2000], datetime.now(UTC))
        )
        if self._changes.qsize() == _QUEUE_WARN:
            self._log.warning("alarm_changes_backlog", queued=_QUEUE_WARN)
