"""`EdgeAgent`: one site's agent process: ingest, bridge, forwarder, alarms, heartbeat, status.

Every part runs as a supervised task (a crash is logged and restarted with backoff); the agent
talks only to its site's own nats-server, so it keeps working with the center unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from bus import subjects
from bus.client import Bus, BusConnectError
from bus.config import NatsConfig, ReconnectPolicy
from bus.forwarder import Forwarder, ForwarderConfig
from bus.log import bind_process, get_logger
from bus.replaylog import ReplayLog
from bus.streams import (
    dead_letter_stream,
    ensure_stream,
    site_events_stream,
    site_ingest_stream,
    site_replay_stream,
)
from edge_agent.alarms.deadletters import DeadLetterAlarms
from edge_agent.alarms.engine import AlarmRuleEngine
from edge_agent.alarms.local import LocalAlarms
from edge_agent.alarms.store import ActiveAlarmStore, alarms_dir
from edge_agent.config import AgentConfig
from edge_agent.heartbeat import HeartbeatSender, agent_heartbeat
from edge_agent.ingest.bridge import MqttBridge
from edge_agent.ingest.convert import IngestLimits
from edge_agent.ingest.worker import IngestTuning, IngestWorker
from edge_agent.logship import LogShipper
from edge_agent.replay.monitor import ReplayMonitor
from edge_agent.status.responder import StatusResponder, StatusSources
from edge_agent.sync import AppliedStore, Applier, ConfigSync, SyncTuning, store_dir
from schemas.alarms import AlarmRulesConfig
from schemas.devices import IngestConfig
from schemas.logs import LogConfig
from schemas.site import ReplayLogConfig

RunFn = Callable[[asyncio.Event], Awaitable[None]]


def agent_version() -> str:
    try:
        return metadata.version("edgebus")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff between restarts of a crashed part; reset once a part ran `healthy_s`."""

    min_s: float = 0.5
    max_s: float = 30.0
    healthy_s: float = 60.0
    # How long one part may take to stop before it is cancelled.
    stop_timeout_s: float = 10.0


def replay_log_for(config: AgentConfig, bus: Bus) -> ReplayLog:
    """The site's replay log, bounded and paced as `config.replay` says."""
    replay = config.replay
    spec = site_replay_stream(
        config.site, max_bytes=replay.max_bytes, max_age_s=replay.max_age_s, policy=replay.policy
    )
    return ReplayLog(
        bus.nc, config.site, spec, batch_size=replay.batch_size, ack_wait_s=replay.ack_wait_s
    )


def forwarder_config(config: AgentConfig) -> ForwarderConfig:
    replay = config.replay
    return ForwarderConfig(
        batch_size=replay.batch_size,
        publish_timeout_s=replay.publish_timeout_s,
        backoff_min_s=replay.backoff_min_s,
        backoff_max_s=replay.backoff_max_s,
        fetch_timeout_s=2.0,  # a long poll: it answers as soon as anything is logged
    )


def ingest_tuning(config: AgentConfig) -> IngestTuning:
    batch = config.replay.batch_size
    # A crashed agent's in-flight device messages come back after ack_wait: keep it short.
    return IngestTuning(
        batch_size=batch, max_ack_pending=4 * batch, ack_wait_s=config.replay.ack_wait_s
    )


async def _wait(stop: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=timeout)


class EdgeAgent:
    """The edge agent of one site. `await EdgeAgent(config).run(stop)` until `stop` is set."""

    def __init__(self, config: AgentConfig, restart: RestartPolicy | None = None) -> None:
        self.config = config
        self.site = subjects.site_id(config.site)
        self.restart = restart or RestartPolicy()
        self.version = agent_version()
        self.started_at = datetime.now(UTC)
        self.restarts: Counter[str] = Counter()
        # Set once every part has been started (tests and the supervisor wait on it).
        self.ready = asyncio.Event()
        self.bus: Bus | None = None
        self.ingest: IngestWorker | None = None
        self.bridge: MqttBridge | None = None
        self.forwarder: Forwarder | None = None
        self.monitor: ReplayMonitor | None = None
        self.alarms: LocalAlarms | None = None
        self.rule_engine: AlarmRuleEngine | None = None
        self.dead_letter_alarms: DeadLetterAlarms | None = None
        self.status: StatusResponder | None = None
        self.heartbeat: HeartbeatSender | None = None
        self.log_shipper: LogShipper | None = None
        self.sync: ConfigSync | None = None
        self._replay_log: ReplayLog | None = None
        self._log = get_logger("edge_agent", site=self.site)

    # -- the whole run ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        bind_process(site=self.site)
        self.started_at = datetime.now(UTC)
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        bus = await self._connect(stop)
        if bus is None:
            return
        self.bus = bus
        try:
            replay_log = replay_log_for(self.config, bus)
            if not await self._declare(bus, replay_log, stop):
                return
            groups = self._build(bus, replay_log)
            assert self.sync is not None
            await self.sync.restore()  # the last-known config, before any part runs
            await self._run_groups(groups, stop)
        finally:
            await bus.close()
            self._log.info("agent_stopped", restarts=dict(self.restarts))

    async def _connect(self, stop: asyncio.Event) -> Bus | None:
        """Connect to the site's server, retrying while it is down; None if stopped first."""
        nats_config = NatsConfig.from_url(
            self.config.nats_url,
            name=f"edge-agent-{self.site}",
            credentials=self.config.credentials,
            # Per-site inboxes: replies crossing the leaf link stay within this site's
            # permissions (see the auth notes).
            inbox_prefix=f"_INBOX.{self.site}",
            connect_timeout_s=5.0,
            reconnect=ReconnectPolicy(max_attempts=-1, wait_s=0.25),
        )
        delay = self.restart.min_s
        while not stop.is_set():
            try:
                return await Bus.connect(nats_config, scope=self.site, source=f"/sites/{self.site}")
            except BusConnectError as exc:
                self._log.warning("site_server_unreachable", error=str(exc), retry_in_s=delay)
            await _wait(stop, delay)
            delay = min(delay * 2, self.restart.max_s)
        return None

    async def _declare(self, bus: Bus, replay_log: ReplayLog, stop: asyncio.Event) -> bool:
        """Create the site's streams (idempotent); retried while JetStream is not ready."""
        delay = self.restart.min_s
        while not stop.is_set():
            try:
                for spec in (
                    site_ingest_stream(),
                    site_events_stream(self.site),
                    dead_letter_stream(self.site),
                ):
                    await ensure_stream(bus.js, spec)
                await replay_log.declare()
                return True
            except Exception as exc:
                self._log.warning("declare_failed", error=repr(exc), retry_in_s=delay)
            await _wait(stop, delay)
            delay = min(delay * 2, self.restart.max_s)
        return False

    def _build(self, bus: Bus, replay_log: ReplayLog) -> list[list[tuple[str, RunFn]]]:
        """Every part, in groups stopped in this order: heartbeat and inputs first, status last."""
        config = self.config
        self.ingest = IngestWorker(bus, replay_log, config, ingest_tuning(config))
        self.alarms = LocalAlarms(
            bus, replay_log, self.site, store=ActiveAlarmStore(alarms_dir(config.data_dir))
        )
        self.rule_engine = AlarmRuleEngine(bus, self.site, self.alarms, config.alarm_rules)
        self.dead_letter_alarms = DeadLetterAlarms(self.alarms, quiet_s=config.dead_letter_quiet_s)
        bus.dead_letters.add_listener(self.dead_letter_alarms.on_dead_letter)
        self.log_shipper = LogShipper(bus, replay_log, self.site, ship_level=config.log_ship_level)
        self.forwarder = Forwarder(
            bus.nc, self.site, forwarder_config(config), dead_letters=bus.dead_letters
        )
        self.monitor = ReplayMonitor(self.forwarder, replay_log, self.alarms, config.replay)
        self.status = StatusResponder(
            bus,
            self.site,
            self._status_sources(),
            agent_version=self.version,
            started_at=self.started_at,
        )
        self.heartbeat = agent_heartbeat(
            bus,
            self.site,
            interval_s=config.heartbeat_interval_s,
            data_dir=config.data_dir,
            agent_version=self.version,
            device_count=self._device_count,
            replay_snapshot=self._replay_snapshot,
        )
        self._replay_log = replay_log
        self.sync = ConfigSync(
            bus,
            self.site,
            AppliedStore(store_dir(config.data_dir)).load(),
            self.config_appliers(),
            self.alarms,
            SyncTuning(report_interval_s=config.sync_report_interval_s),
        )
        inputs: list[tuple[str, RunFn]] = []
        if config.external_broker is not None:
            self.bridge = MqttBridge(bus, config)
            inputs.append(("bridge", self.bridge.run))
        return [
            # First to stop: the center should stop hearing "alive" from a site shutting down.
            [("heartbeat", self.heartbeat.run), ("sync", self.sync.run)],
            inputs,
            [("ingest", self.ingest.run)],
            [("alarm_rules", self.rule_engine.run)],
            [("forwarder", self.forwarder.run)],
            # After the parts that dead-letter: what they record until they stop is alarmed.
            [("dead_letter_alarms", self.dead_letter_alarms.run)],
            [("monitor", self.monitor.run)],
            # Late: records logged while the other parts stop still reach the replay log.
            [("logship", self.log_shipper.run)],
            [("status", self.status.run)],
        ]

    def config_appliers(self) -> list[Applier]:
        """How each config kind from the center takes effect in this agent."""

        async def ingest(config: IngestConfig) -> None:
            assert self.ingest is not None
            self.ingest.set_limits(
                IngestLimits(
                    max_payload_bytes=config.max_payload_bytes,
                    message_id_field=config.message_id_field,
                )
            )

        async def replay(config: ReplayLogConfig) -> None:
            assert self._replay_log is not None and self.monitor is not None
            spec = site_replay_stream(
                self.site,
                max_bytes=config.max_bytes,
                max_age_s=config.max_age_s,
                policy=config.policy,
            )
            await self._replay_log.reshape(spec)  # the site's storage may refuse the bytes
            self.monitor.set_config(
                replace(
                    self.config.replay,
                    max_bytes=config.max_bytes,
                    max_age_s=config.max_age_s,
                    policy=config.policy,
                    near_full_ratio=config.near_full_ratio,
                )
            )

        async def alarm_rules(config: AlarmRulesConfig) -> None:
            assert self.rule_engine is not None
            self.rule_engine.apply_config(config)

        async def log(config: LogConfig) -> None:
            assert self.log_shipper is not None
            self.log_shipper.apply_config(config)

        return [
            Applier("ingest", IngestConfig, ingest),
            Applier("replay", ReplayLogConfig, replay),
            Applier("alarm_rules", AlarmRulesConfig, alarm_rules),
            Applier("log", LogConfig, log),
        ]

    def _device_count(self) -> int:
        return self.ingest.device_count() if self.ingest else 0

    def _replay_snapshot(self) -> dict[str, Any]:
        return self.monitor.snapshot() if self.monitor else {}

    def _status_sources(self) -> StatusSources:
        def ingest() -> dict[str, Any]:
            return self.ingest.stats().as_dict() if self.ingest else {}

        def alarms() -> list[str]:
            return [alarm.alarm_id for alarm in self.alarms.active()] if self.alarms else []

        def dead_letters() -> dict[str, int]:
            return dict(self.bus.dead_letters.counts) if self.bus else {}

        def bridge() -> dict[str, int]:
            return asdict(self.bridge.stats()) if self.bridge else {}

        return StatusSources(
            ingest=ingest,
            replay=self._replay_snapshot,
            active_alarms=alarms,
            dead_letters=dead_letters,
            bridge=bridge,
        )

    async def _run_groups(self, groups: list[list[tuple[str, RunFn]]], stop: asyncio.Event) -> None:
        running: list[tuple[asyncio.Event, list[asyncio.Task[None]]]] = []
        for group in groups:
            group_stop = asyncio.Event()
            tasks = [
                asyncio.create_task(self._supervise(name, fn, group_stop), name=name)
                for name, fn in group
            ]
            running.append((group_stop, tasks))
        self.ready.set()
        self._log.info(
            "agent_started",
            version=self.version,
            parts=[name for group in groups for name, _ in group],
            external_broker=self.config.external_broker is not None,
        )
        try:
            await stop.wait()
        finally:
            for group_stop, tasks in running:
                group_stop.set()
                await self._finish(tasks)

    async def _finish(self, tasks: list[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self.restart.stop_timeout_s)
        for task in late:
            self._log.warning("part_stop_timeout", part=task.get_name())
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self, name: str, run: RunFn, stop: asyncio.Event) -> None:
        """Run one part until `stop`; a crash or an early return is logged and restarted."""
        delay = self.restart.min_s
        while not stop.is_set():
            started = time.monotonic()
            try:
                await run(stop)
                if stop.is_set():
                    return
                self._log.error("part_exited", part=name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.exception("part_crashed", part=name, error=repr(exc))
            self.restarts[name] += 1
            if time.monotonic() - started >= self.restart.healthy_s:
                delay = self.restart.min_s
            await _wait(stop, delay)
            delay = min(delay * 2, self.restart.max_s)
