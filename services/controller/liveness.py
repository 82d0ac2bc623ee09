"""In-memory liveness: the last heartbeat heard from each site, and when to look at it next.

Pure data structures (no I/O): the sweep pops only the sites that are due, never scans all.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from datetime import datetime

from schemas.controller import Inventory


@dataclass(frozen=True)
class Sighting:
    """The last heartbeat this controller replica received from one site."""

    heard: datetime  # the center's clock at receipt: site clocks may be skewed
    inventory: Inventory
    seq: int


class DeadlineWheel:
    """Sites keyed by the time slot in which they next need a look.

    `schedule` moves a site to its new slot in O(1) (plus a heap push when the slot is new),
    `pop_due` returns every site whose slot has started; a site is in at most one slot.
    """

    def __init__(self, resolution_s: float) -> None:
        if resolution_s <= 0:
            raise ValueError("resolution_s must be positive")
        self.resolution_s = resolution_s
        self._slots: dict[int, set[str]] = {}
        self._slot_of: dict[str, int] = {}
        self._heap: list[int] = []  # slot numbers; may hold slots already emptied

    def _slot(self, at: float) -> int:
        return math.floor(at / self.resolution_s)

    def schedule(self, site: str, at: float) -> None:
        """Look at `site` once `at` (a timestamp) has come; replaces any earlier schedule."""
        slot = self._slot(at)
        old = self._slot_of.get(site)
        if old == slot:
            return
        if old is not None:
            self._discard(site, old)
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
            heapq.heappush(self._heap, slot)
        members.add(site)
        self._slot_of[site] = slot

    def schedule_earlier(self, site: str, at: float) -> None:
        """Like `schedule`, but never postpones a look already planned sooner."""
        old = self._slot_of.get(site)
        if old is None or self._slot(at) < old:
            self.schedule(site, at)

    def cancel(self, site: str) -> None:
        slot = self._slot_of.pop(site, None)
        if slot is not None:
            self._remove_from_slot(site, slot)

    def _discard(self, site: str, slot: int) -> None:
        del self._slot_of[site]
        self._remove_from_slot(site, slot)

    def _remove_from_slot(self, site: str, slot: int) -> None:
        members = self._slots.get(slot)
        if members is not None:
            members.discard(site)
            if not members:
                del self._slots[slot]  # its heap entry is skipped when popped

    def pop_due(self, now: float) -> list[str]:
        """Every site whose slot starts at or before `now`, earliest slots first."""
        due: list[str] = []
        current = self._slot(now)
        while self._heap and self._heap[0] <= current:
            slot = heapq.heappop(self._heap)
            members = self._slots.pop(slot, None)
            if not members:
                continue
            for site in sorted(members):
                del self._slot_of[site]
                due.append(site)
        return due

    def next_due(self) -> float | None:
        """Start of the earliest non-empty slot, or None."""
        while self._heap and self._heap[0] not in self._slots:
            heapq.heappop(self._heap)
        return self._heap[0] * self.resolution_s if self._heap else None

    def __contains__(self, site: object) -> bool:
        return site in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)


class LivenessTable:
    """Last sighting per site and the wheel of pending looks; one per controller replica."""

    def __init__(self, resolution_s: float) -> None:
        self.sightings: dict[str, Sighting] = {}
        self.wheel = DeadlineWheel(resolution_s)

    def observe(self, site: str, sighting: Sighting) -> None:
        # Receipt times only grow, so the latest heartbeat received is the latest sighting
        # (a restarted site starts its `seq` again from 0).
        self.sightings[site] = sighting

    def get(self, site: str) -> Sighting | None:
        return self.sightings.get(site)

    def forget(self, site: str) -> None:
        self.sightings.pop(site, None)
        self.wheel.cancel(site)

    def __len__(self) -> int:
        return len(self.sightings)
