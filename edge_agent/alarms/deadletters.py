"""Dead letters as alarms: the first dead letter of a reason raises an alarm at the site, cleared
once none of that reason came for a quiet while (an event this agent cannot read must be seen).

Unreadable versions and types are major (the fleet runs versions that do not interoperate);
other reasons (malformed device input, say) are warnings. The dead letters themselves stay in
the site's DEADLETTER stream; the alarm says how many and what the first one was.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bus.deadletter import DeadLetterNotice
from edge_agent.alarms.local import LocalAlarms
from edge_agent.alarms.waits import wait_any
from schemas.alarms import Severity

ENTITY = "dead-letters"
OWNER = "dead_letters"  # of the alarms raised here (LocalAlarms keeps it across restarts)
QUIET_S = 600.0
VERSION_REASONS = frozenset({"unsupported_version", "unknown_type"})
_TEXT_CHARS = 500


def severity_for(reason: str) -> Severity:
    return Severity.MAJOR if reason in VERSION_REASONS else Severity.WARNING


def raise_text(notice: DeadLetterNotice) -> str:
    return f"{notice.component} dead-lettered {notice.subject}: {notice.detail}"[:_TEXT_CHARS]


@dataclass
class Episode:
    """Dead letters of one reason since its alarm was raised."""

    count: int
    last_at: float  # monotonic


def quiet_reasons(episodes: Mapping[str, Episode], now: float, quiet_s: float) -> list[str]:
    """The reasons none of which came for `quiet_s`: their alarms clear."""
    return [reason for reason, ep in episodes.items() if now - ep.last_at >= quiet_s]


class DeadLetterAlarms:
    """Told of each dead letter (`on_dead_letter`, a `DeadLetterSink` listener); `run` raises
    and clears the alarms."""

    def __init__(
        self,
        alarms: LocalAlarms,
        *,
        quiet_s: float = QUIET_S,
        tick_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._alarms = alarms
        self._quiet_s = quiet_s
        self._tick_s = tick_s
        self._clock = clock
        self._episodes: dict[str, Episode] = {}
        self._owed: list[DeadLetterNotice] = []  # first of each new episode, to raise
        self._wake = asyncio.Event()
        now = clock()
        for alarm in alarms.owned_by(OWNER):  # raised before a restart: cleared when quiet
            self._episodes[alarm.probable_cause] = Episode(count=0, last_at=now)

    def on_dead_letter(self, notice: DeadLetterNotice) -> None:
        episode = self._episodes.get(notice.reason)
        if episode is None:
            self._episodes[notice.reason] = Episode(count=1, last_at=self._clock())
            self._owed.append(notice)
            self._wake.set()
        else:
            episode.count += 1
            episode.last_at = self._clock()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()  # before: a dead letter told during `settle` wakes the next wait
            await self.settle()
            await wait_any(stop, self._wake, timeout=self._tick_s)
        await self.settle()

    async def settle(self) -> None:
        """Raise what new episodes owe, clear the quiet ones."""
        owed, self._owed = self._owed, []
        for notice in owed:
            reason = notice.reason
            text = raise_text(notice)
            await self._alarms.raise_(
                ENTITY, reason, severity_for(reason), text, at=notice.at, owner=OWNER
            )
        for reason in quiet_reasons(self._episodes, self._clock(), self._quiet_s):
            episode = self._episodes.pop(reason)
            text = f"{episode.count} dead letter(s) ({reason}), none for {self._quiet_s:g}s"
            await self._alarms.clear(ENTITY, reason, text)
