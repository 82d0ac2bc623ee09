"""What a site reports about itself: capacity and load read with psutil, the rest from the agent.

`inventory_from` is pure over its inputs; `build_inventory` adds the psutil readings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from schemas.controller import Capacity, Inventory, Load

_VERSION_MAX = 64  # Inventory.agent_version's bound


def package_version() -> str:
    """The installed edgebus version (what the agent reports as its software version)."""
    try:
        return metadata.version("edgebus")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def _usable_cores() -> int:
    # The CPUs this process may run on (container/cpuset limits), not every CPU of the host.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return int(psutil.cpu_count(logical=True) or 1)


def _disk_path(data_dir: Path) -> Path:
    """The data dir, or its nearest existing parent: the disk the site's data lives on."""
    path = data_dir.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def collect_capacity(data_dir: Path) -> Capacity:
    """Cores, memory and the size of the disk holding `data_dir`."""
    return Capacity(
        cores=_usable_cores(),
        memory_bytes=int(psutil.virtual_memory().total),
        disk_bytes=int(psutil.disk_usage(str(_disk_path(data_dir))).total),
    )


def collect_load(data_dir: Path) -> Load:
    """CPU since the previous call (0.0 on the very first), load average, memory and disk used.

    Never blocks: psutil compares with its previous reading instead of sampling now.
    """
    return Load(
        cpu_percent=max(0.0, float(psutil.cpu_percent(interval=None))),
        load1=max(0.0, float(os.getloadavg()[0])) if hasattr(os, "getloadavg") else 0.0,
        memory_used_bytes=int(psutil.virtual_memory().used),
        disk_used_bytes=int(psutil.disk_usage(str(_disk_path(data_dir))).used),
    )


def _count(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(0, number)


def _age(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) and number > 0 else 0.0


def inventory_from(
    agent_version: str,
    device_count: int,
    replay_snapshot: Mapping[str, Any],
    function_count: int,
    capacity: Capacity,
    load: Load,
) -> Inventory:
    """The heartbeat inventory from plain inputs.

    `replay_snapshot` is `ReplayMonitor.snapshot()`: empty before its first check, and
    `oldest_unsent_age_s` is None when nothing is owed; both read as "no backlog". A bad
    value never costs the heartbeat: it reads as 0 (liveness matters more than one field).
    """
    return Inventory(
        agent_version=agent_version[:_VERSION_MAX],
        capacity=capacity,
        load=load,
        device_count=_count(device_count),
        replay_backlog=_count(replay_snapshot.get("depth")),
        replay_oldest_unsent_age_s=_age(replay_snapshot.get("oldest_unsent_age_s")),
        function_count=_count(function_count),
    )


def build_inventory(
    agent_version: str,
    device_count: int,
    replay_snapshot: Mapping[str, Any],
    function_count: int,
    data_dir: Path,
) -> Inventory:
    """`inventory_from` with capacity and load read now (fast: no sampling, no sleep)."""
    return inventory_from(
        agent_version,
        device_count,
        replay_snapshot,
        function_count,
        collect_capacity(data_dir),
        collect_load(data_dir),
    )
