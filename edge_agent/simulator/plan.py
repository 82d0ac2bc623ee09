"""The fleet plan, pure: site ids, groups and labels, synthetic inventories, the beat schedule.

No I/O and no clock of its own: every function takes the moment it is asked about.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from edge_agent.heartbeat.inventory import inventory_from
from schemas.controller import Capacity, Inventory, Load

GIB = 1024**3
REGIONS = ("north", "south", "east", "west", "central")
# Labels every virtual site carries: how a later run (and an operator) finds the fleet.
SIMULATED_LABEL = "simulated"
FLEET_LABEL = "fleet"


def id_width(sites: int) -> int:
    return len(str(max(sites - 1, 0)))


def site_ids(prefix: str, sites: int) -> list[str]:
    """`<prefix>-<n>` for n in 0..sites-1, zero-padded so they sort in index order."""
    width = id_width(sites)
    return [f"{prefix}-{n:0{width}d}" for n in range(sites)]


def site_index(prefix: str, sites: int, site: str) -> int | None:
    """The index of a virtual site id of this fleet, or None if it is not one."""
    head, sep, number = site.rpartition("-")
    if head != prefix or not sep or len(number) != id_width(sites) or not number.isdigit():
        return None
    index = int(number)
    return index if index < sites else None


def group_names(prefix: str, groups: int) -> list[str]:
    width = len(str(max(groups - 1, 0)))
    return [f"{prefix}-g{k:0{width}d}" for k in range(groups)]


def group_of(index: int, groups: int) -> int:
    """Sites are dealt to groups round-robin, so every group spans the whole id range."""
    return index % groups


def group_labels(prefix: str, group: int) -> dict[str, str]:
    return {
        SIMULATED_LABEL: "true",
        FLEET_LABEL: prefix,
        "region": REGIONS[group % len(REGIONS)],
    }


def fleet_selector(prefix: str) -> dict[str, str]:
    """The label selector of every site of one simulated fleet."""
    return {SIMULATED_LABEL: "true", FLEET_LABEL: prefix}


def spread(sites: int, count: int) -> list[int]:
    """`count` indices spread evenly over the id range, one per equal block, shifted by one
    more within each block so that round-robin groups are all represented too."""
    count = max(0, min(count, sites))
    if not count:
        return []
    block = sites // count
    return [(k * sites) // count + k % block for k in range(count)]


# -- synthetic inventory ---------------------------------------------------------------


def _mix(index: int, salt: int) -> int:
    """A cheap, stable hash of (index, salt): per-site traits without storing them."""
    x = (index * 0x9E3779B1 + salt * 0x85EBCA77) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 12)


def capacity_of(index: int) -> Capacity:
    """What the site's box has: 2, 4 or 8 cores, 2 GiB per core, a 64-512 GiB disk."""
    cores = (2, 4, 8)[_mix(index, 1) % 3]
    return Capacity(
        cores=cores, memory_bytes=cores * 2 * GIB, disk_bytes=(64 << (_mix(index, 2) % 4)) * GIB
    )


def load_of(index: int, capacity: Capacity, now_s: float, rng: random.Random) -> Load:
    """A slow daily-ish wave per site (its own phase), plus a little noise."""
    phase = (_mix(index, 3) % 1000) / 1000.0
    wave = 0.5 + 0.5 * math.sin(2 * math.pi * (now_s / 3600.0 + phase))
    cpu = min(100.0, 5.0 + 60.0 * wave + rng.uniform(0.0, 5.0))
    memory_share = 0.3 + 0.4 * wave
    disk_share = 0.2 + 0.1 * ((_mix(index, 4) % 100) / 100.0)
    return Load(
        cpu_percent=round(cpu, 1),
        load1=round(capacity.cores * cpu / 100.0, 2),
        memory_used_bytes=int(capacity.memory_bytes * memory_share),
        disk_used_bytes=int(capacity.disk_bytes * disk_share),
    )


def inventory_of(index: int, agent_version: str, now_s: float, rng: random.Random) -> Inventory:
    """The site's heartbeat inventory at `now_s` (unix seconds), through the agent's builder."""
    capacity = capacity_of(index)
    # Now and then a site owes the center a few events (a short link hiccup).
    backlog = rng.randrange(1, 50) if rng.random() < 0.02 else 0
    snapshot = {"depth": backlog, "oldest_unsent_age_s": rng.uniform(0.5, 5.0) if backlog else None}
    return inventory_from(
        agent_version,
        5 + _mix(index, 5) % 40,
        snapshot,
        _mix(index, 6) % 4,
        capacity,
        load_of(index, capacity, now_s, rng),
    )


# -- the beat schedule -------------------------------------------------------------------


@dataclass(frozen=True)
class BeatSchedule:
    """Every site beats once per `interval_s`, the fleet's beats spread evenly over it.

    Beat number b (from 0) is due `b * interval_s / sites` after the start and belongs to
    site `b % sites`: site i beats at `i * interval_s / sites + k * interval_s`. The fleet
    therefore sends a steady `sites / interval_s` beats per second, never a burst.
    """

    sites: int
    interval_s: float

    def due(self, elapsed_s: float) -> int:
        """How many beats are due by `elapsed_s` after the start (the one at 0 included)."""
        if elapsed_s < 0:
            return 0
        return math.floor(elapsed_s * self.sites / self.interval_s) + 1

    def site_of(self, beat: int) -> int:
        return beat % self.sites

    def catch_up(self, sent: int, due: int) -> int:
        """Where to resume after falling behind: no site beats twice for one slot, so a
        lag over one whole interval skips the oldest slots (as a real site's sender does)."""
        return max(sent, due - self.sites)

    @property
    def rate(self) -> float:
        return self.sites / self.interval_s
