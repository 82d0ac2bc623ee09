"""Watches the replay log and its forwarder: applies `policy` each tick, keeps a status snapshot.

The only I/O here is reading the backlog and raising/clearing alarms through `LocalAlarms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

from bus.forwarder import Forwarder
from bus.log import get_logger
from bus.replaylog import ReplayLog
from edge_agent.alarms import LocalAlarms
from edge_agent.config import ReplayConfig
from edge_agent.replay.policy import (
    DEFAULT_QUIET_S,
    Action,
    AlarmChange,
    PolicyState,
    evaluate,
    usage_ratio,
)


class ReplayMonitor:
    """Every `config.monitor_interval_s`: backlog + forwarder stats -> alarms and a snapshot."""

    def __init__(
        self,
        forwarder: Forwarder,
        replay_log: ReplayLog,
        alarms: LocalAlarms,
        config: ReplayConfig,
        *,
        quiet_s: float = DEFAULT_QUIET_S,
    ) -> None:
        self._forwarder = forwarder
        self._replay_log = replay_log
        self._alarms = alarms
        self._config = config
        self._quiet_s = quiet_s
        self._state = PolicyState()
        self._snapshot: dict[str, Any] = {}
        self._log = get_logger("edge_agent.replay", site=forwarder.site)

    def set_config(self, config: ReplayConfig) -> None:
        """New bounds (config sync): judged against from the next check on."""
        self._config = config

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check()
            except Exception:  # keep watching; the next tick may succeed
                self._log.exception("replay_monitor_check_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._config.monitor_interval_s)

    async def check(self) -> None:
        """One tick: read, decide, apply; retry alarm changes the log refused before."""
        try:
            backlog = await self._forwarder.backlog()
        except Exception as exc:  # the site's JetStream is not answering: keep the old view
            self._log.warning("replay_backlog_unreadable", error=repr(exc))
            await self._alarms.flush_pending()
            return
        refused = self._replay_log.refused
        if backlog.dropped > self._state.dropped:
            # The log dropped entries since the last tick: maybe an active alarm's own entry.
            await self._alarms.reassert()
        self._state, changes = evaluate(
            backlog, refused, self._state, self._config, time.monotonic(), quiet_s=self._quiet_s
        )
        for change in changes:
            await self._apply(change)
        await self._alarms.flush_pending()
        stats = self._forwarder.stats()
        self._snapshot = {
            "checked_at": datetime.now(UTC).isoformat(),
            "policy": self._config.policy,
            "depth": backlog.depth,
            "bytes": backlog.bytes,
            "max_bytes": backlog.max_bytes,
            "usage_ratio": round(usage_ratio(backlog), 4),
            "oldest_unsent_age_s": backlog.oldest_unsent_age_s,
            "rate_per_s": round(stats.rate_per_s, 1),
            "forwarded": stats.forwarded,
            "duplicates_at_center": stats.duplicates_at_center,
            "dead_lettered": stats.dead_lettered,
            "dropped": backlog.dropped,
            "refused": refused,
            "link_up": stats.link_up,
            "order_violations": stats.order_violations,
            "failures": stats.failures,
            "last_error": stats.last_error,
            "alarms_pending": self._alarms.pending,
        }

    def snapshot(self) -> dict[str, Any]:
        """Plain data for status replies; empty until the first successful check."""
        return dict(self._snapshot)

    async def _apply(self, change: AlarmChange) -> None:
        if change.action is Action.RAISE and change.severity is not None:
            await self._alarms.raise_(
                change.entity, change.probable_cause, change.severity, change.text
            )
        elif change.action is Action.CLEAR:
            await self._alarms.clear(change.entity, change.probable_cause, change.text)
