"""AlarmRuleEngine on a real site server: readings on `evt.<site>.reading...` in, raises and
clears through LocalAlarms (replay log, local publish) out; rules swapped live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.replaylog import STREAM, ReplayLog
from bus.streams import ReplayFullPolicy, site_replay_stream
from bus.testing import EdgeTopology
from edge_agent.alarms import AlarmRuleEngine, LocalAlarms
from edge_agent.alarms.engine import OWNER
from schemas import REGISTRY
from schemas.alarms import (
    AlarmCleared,
    AlarmRaised,
    AlarmRulesConfig,
    RateRule,
    Severity,
    SilenceRule,
    ThresholdRule,
)
from schemas.devices import DeviceReading
from tests.siterig import wait_until

pytestmark = pytest.mark.timeout(60)
SITE = "s1"


@dataclass
class Rig:
    bus: Bus
    alarms: LocalAlarms
    engine: AlarmRuleEngine

    async def reading(self, device: str, channel: str, **payload: Any) -> None:
        data = DeviceReading(site=SITE, device=device, channel=channel, payload=payload)
        await self.bus.publish(subjects.site_readings(SITE, device, channel), self.bus.event(data))

    def active(self) -> set[str]:
        return {a.alarm_id for a in self.alarms.active()}

    async def logged(self) -> list[AlarmRaised | AlarmCleared]:
        js = self.bus.js
        state = (await js.stream_info(STREAM)).state
        out: list[AlarmRaised | AlarmCleared] = []
        for seq in range(state.first_seq, state.last_seq + 1):
            raw = (await js.get_msg(STREAM, seq=seq)).data or b""
            event = REGISTRY.decode(raw)
            out.append(event.data)
        return out


@pytest.fixture
async def rig(edge_topology: EdgeTopology) -> AsyncIterator[Rig]:
    await asyncio.to_thread(edge_topology.add_site, SITE, mqtt=False)
    bus = await Bus.connect(
        NatsConfig.from_url(edge_topology.site(SITE).url, name="engine"),
        scope=SITE,
        source=f"/sites/{SITE}",
    )
    spec = site_replay_stream(
        SITE, max_bytes=1024**2, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
    )
    log = ReplayLog(bus.nc, SITE, spec, batch_size=100, ack_wait_s=5)
    await log.declare()
    alarms = LocalAlarms(bus, log, SITE)
    engine = AlarmRuleEngine(bus, SITE, alarms, tick_s=0.05, max_rules=3)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        yield Rig(bus, alarms, engine)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await bus.close()


HOT = ThresholdRule(id="hot", device="d1", channel="temp", path="t", raise_at=80, clear_at=70)


async def settled(rig: Rig) -> None:
    """Everything published so far has been evaluated and handed to LocalAlarms."""
    await rig.bus.nc.flush()
    await asyncio.sleep(0.1)
    await asyncio.wait_for(rig.engine.handed_over(), 5)


async def test_threshold_with_hysteresis_raises_and_clears_into_the_replay_log(rig: Rig) -> None:
    rig.engine.apply_config(AlarmRulesConfig(rules=[HOT]))
    await asyncio.sleep(0.2)  # the engine subscribes on its next loop
    for value in (60, 85, 90, 75, 72, 69, 71, 95):
        await rig.reading("d1", "temp", t=value)
    await rig.reading("d2", "temp", t=99)  # another device: the rule names d1 only
    await rig.reading("d1", "humidity", t=99)  # another channel
    await rig.reading("d1", "temp", other=1)  # no number at the path: nothing happens
    await settled(rig)

    changes = await rig.logged()
    kinds = [type(c).__name__ for c in changes]
    assert kinds == ["AlarmRaised", "AlarmCleared", "AlarmRaised"], kinds
    assert all(c.alarm_id == "s1/d1/hot" for c in changes)
    first = changes[0]
    assert isinstance(first, AlarmRaised) and first.severity is Severity.MAJOR
    assert first.text == "t=85 >= 80"
    times = [c.raised_at if isinstance(c, AlarmRaised) else c.cleared_at for c in changes]
    assert times == sorted(times)  # decided in order, kept in order
    assert rig.active() == {"s1/d1/hot"}
    assert rig.engine.stats.unreadable == 1


async def test_silence_of_a_named_device_and_its_return(rig: Rig) -> None:
    quiet = SilenceRule(id="quiet", device="d7", after_s=0.4, severity=Severity.MINOR)
    rig.engine.apply_config(AlarmRulesConfig(rules=[quiet]))
    await wait_until(lambda: "s1/d7/quiet" in rig.active(), 5, "silence raised")
    await rig.reading("d7", "temp", t=1)
    await wait_until(lambda: not rig.active(), 5, "silence cleared by a reading")
    await wait_until(lambda: "s1/d7/quiet" in rig.active(), 5, "silent again")


async def test_rate_above_limit_raises_then_a_calm_window_clears(rig: Rig) -> None:
    chatty = RateRule(id="chatty", max_events=5, window_s=0.5)
    rig.engine.apply_config(AlarmRulesConfig(rules=[chatty]))
    await asyncio.sleep(0.2)
    for n in range(20):
        await rig.reading("d3", "temp", n=n)
    await settled(rig)
    assert rig.active() == {"s1/d3/chatty"}
    await wait_until(lambda: not rig.active(), 5, "a calm window clears it")


async def test_alarms_raised_before_a_restart_are_adopted_and_cleared_by_every_rule_kind(
    rig: Rig,
) -> None:
    """LocalAlarms restored them (an earlier agent raised them): the rules owe their clears."""
    for device, cause in (("d1", "hot"), ("d3", "chatty"), ("d7", "quiet")):
        await rig.alarms.raise_(device, cause, Severity.MAJOR, "before the restart")
    chatty = RateRule(id="chatty", max_events=5, window_s=0.3)
    quiet = SilenceRule(id="quiet", device="d7", after_s=30)
    rig.engine.apply_config(AlarmRulesConfig(rules=[HOT, chatty, quiet]))
    await asyncio.sleep(0.2)
    await rig.reading("d1", "temp", t=60)  # below clear_at: the threshold clears
    await rig.reading("d3", "temp", n=1)  # one reading in a window: calm
    await rig.reading("d7", "temp", n=1)  # the silent device is heard
    await settled(rig)
    await wait_until(lambda: not rig.active(), 5, lambda: f"still active: {rig.active()}")


async def test_restored_alarms_of_a_rule_removed_meanwhile_are_cleared(rig: Rig) -> None:
    """Raised by the rules before a restart, their rule gone from the config applied after
    it: no device needs to send anything for them to clear. Others' alarms are left alone."""
    await rig.alarms.raise_("d5", "gone", Severity.MAJOR, "before", owner=OWNER)
    await rig.alarms.raise_("d5", "hot:temp", Severity.MAJOR, "before", owner=OWNER)
    await rig.alarms.raise_("d6", "gone", Severity.MAJOR, "not the rules'", owner="monitor")
    any_channel = ThresholdRule(id="hot", path="t", raise_at=80, clear_at=70)
    rig.engine.apply_config(AlarmRulesConfig(rules=[any_channel]))
    await settled(rig)
    # The rule "hot" still exists: its alarm waits for its device (adopted, see above).
    assert rig.active() == {"s1/d5/hot:temp", "s1/d6/gone"}


async def test_a_removed_rule_clears_its_alarms_and_a_bad_config_changes_nothing(rig: Rig) -> None:
    any_channel = ThresholdRule(id="hot", path="t", raise_at=80, clear_at=70)  # every device
    rig.engine.apply_config(AlarmRulesConfig(rules=[any_channel]))
    await asyncio.sleep(0.2)
    await rig.reading("d1", "temp", t=90)
    await rig.reading("d2", "inlet", t=90)
    await settled(rig)
    assert rig.active() == {"s1/d1/hot:temp", "s1/d2/hot:inlet"}

    too_many = AlarmRulesConfig(rules=[SilenceRule(id=f"q{i}", after_s=9) for i in range(4)])
    with pytest.raises(ValueError, match="at most 3"):
        rig.engine.apply_config(too_many)
    assert rig.engine.config.rules == [any_channel]  # unchanged

    rig.engine.apply_config(AlarmRulesConfig())
    await settled(rig)
    assert rig.active() == set()
    changes = await rig.logged()
    assert [type(c).__name__ for c in changes[-2:]] == ["AlarmCleared", "AlarmCleared"]
    assert all(c.text == "rule removed" for c in changes[-2:])
