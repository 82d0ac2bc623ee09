"""Config sync fan-out: one global change, N virtual sites, time until all report in-sync.

    python -m bench.sync_fanout [--quick] [--sites N] [--groups G]

One run, one throwaway hub, the sync service as its own process (`python -m services.sync`),
the site simulator (`edge_agent.simulator`, config sync on) in this one:

0. registry: N site records (onboarded, online, dealt to G groups) written straight into the
   SITES bucket, pipelined. Set-up only: how fast sites onboard is `bench.controller_scale`'s
   figure, and the controller is not running here (no heartbeats to compete with).
1. baseline: the same N virtual sites each hold a subscription on one broadcast subject
   (`down.all.<x>`, N subscriptions over the simulator's connections); time from one publish
   until all N have received it.
2. change: `config set ingest max_payload_bytes=... ` for all sites (the CLI's request);
   time from sending it until the sync service's status counts every site in-sync, i.e. it
   validated and stored the change, computed and pushed N effective configs, the simulator
   decoded, validated and answered each, and the service took N reports. The sync service's
   CPU over that window (user+sys / wall) is reported too.

value = seconds until all N in-sync; baseline = broadcast receive seconds; the goal stated by
the issue is N = 100,000 in-sync within 30 s (`goal_met`); `ratio` = baseline / value.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    BenchResult,
    ResourceSampler,
    bench_args,
    machine_info,
    nats_server,
    publish_all,
)
from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.log import configure_logging
from bus.streams import SITES_KV, ensure_kv
from edge_agent.simulator import SimulatedFleet, SimulatorConfig
from edge_agent.simulator.plan import group_of
from edgebus.config_cli import set_config, sync_status
from schemas.controller import Availability, SiteRecord
from schemas.sync import ConfigSet, Scope, SyncStatusQuery, Target

BENCH = "sync_fanout"
GOAL_S = 30.0
GOAL_SITES = 100_000
PUBLISH_WINDOW = 5000


async def write_registry(bus: Bus, ids: list[str], groups: int) -> float:
    """N onboarded, online records in SITES, as the controller would have left them."""
    await ensure_kv(bus.js, SITES_KV)
    now = datetime.now(UTC)

    def records() -> Iterator[tuple[str, bytes, None]]:
        for index, site in enumerate(ids):
            record = SiteRecord(
                site=site,
                group=f"g{group_of(index, groups)}",
                availability=Availability.ONLINE,
                availability_since=now,
                added_at=now,
                onboarded_at=now,
                last_seen=now,
            )
            yield f"$KV.{SITES_KV.bucket}.{site}", record.model_dump_json().encode(), None

    return await publish_all(bus.nc, records(), window=PUBLISH_WINDOW, timeout_s=30)


async def broadcast_baseline(fleet: SimulatedFleet, center: Bus, sites: int) -> float:
    """Seconds from one publish on a broadcast subject until N site subscriptions hold it."""
    subject = subjects.down_all("benchping")
    subs = []
    for index in range(sites):
        bus = fleet.buses[index % len(fleet.buses)]
        subs.append(await bus.nc.subscribe(subject))
    for bus in fleet.buses:  # every SUB is at the server before the publish
        await bus.nc.flush(timeout=30)
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    await center.nc.publish(subject, b'{"ping":1}')
    while sum(sub.pending_msgs for sub in subs) < sites:
        if time.perf_counter() - started > 120:
            raise RuntimeError("broadcast not received by every site within 120 s")
        await asyncio.sleep(0.005)
    seconds = time.perf_counter() - started
    for sub in subs:
        await sub.unsubscribe()
    return seconds


async def wait_sync_sees(center: Bus, sites: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = await sync_status(center, SyncStatusQuery(sites=[], limit=1), timeout=10)
            if sum(status.totals.values()) >= sites:
                return
        except Exception:  # not answering yet
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the sync service never saw {sites} sites")


def start_sync_service(url: str) -> subprocess.Popen[bytes]:
    """The sync service as its own process; its periodic audit off (changes drive pushes)."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.sync", "--nats", url,
         "--audit-interval-s", "3600", "--log-level", "warning"],
    )  # fmt: skip


async def run(sites: int, groups: int, quick: bool) -> BenchResult:
    with nats_server(BENCH) as server:
        center = await Bus.connect(NatsConfig.from_url(server.url, name="bench-center"))
        sync_proc = start_sync_service(server.url)
        try:
            config = SimulatorConfig(sites=sites, server=server.url, connections=2, groups=groups)
            async with SimulatedFleet(config) as fleet:
                registry_s = await write_registry(center, fleet.ids, groups)
                print(f"registry: {sites:,} records in {registry_s:.1f} s")
                fleet.mark_onboarded(fleet.ids)
                simulated = await fleet.start_config_sync()
                await wait_sync_sees(center, sites, 120)

                baseline_s = await broadcast_baseline(fleet, center, sites)
                print(f"baseline: one broadcast received by {sites:,} sites in {baseline_s:.3f} s")

                change = ConfigSet(
                    kind="ingest",
                    target=Target(scope=Scope.ALL),
                    values={"max_payload_bytes": 4096},
                )
                with ResourceSampler({"sync": sync_proc.pid, "nats": server.pid or 0}) as usage:
                    started = time.perf_counter()
                    result = await set_config(center, change, timeout=120)
                    accepted_s = time.perf_counter() - started
                    in_sync_s = await wait_all_in_sync(center, sites, started, 300)
                sync_cpu = usage.usage["sync"]
                print(
                    f"change rev {result.rev}: accepted (validated, stored, "
                    f"{result.changed:,} pushed) after {accepted_s:.2f} s; "
                    f"all {sites:,} in-sync after {in_sync_s:.2f} s"
                )
                print(
                    f"sync service CPU {sync_cpu.cpu_seconds:.1f} s over "
                    f"{sync_cpu.wall_seconds:.1f} s ({sync_cpu.cpu_percent:.0f}% of a core), "
                    f"peak RSS {sync_cpu.rss_peak_mb:.0f} MB; simulator applied "
                    f"{simulated.stats['applied']:,}, failed {simulated.stats['failed']}"
                )
        finally:
            sync_proc.terminate()
            sync_proc.wait(30)
            await center.close()
    extra: dict[str, Any] = {
        "sites": sites,
        "groups": groups,
        "quick": quick,
        "accepted_s": accepted_s,
        "changed": result.changed,
        "sync_cpu_s": sync_cpu.cpu_seconds,
        "sync_cpu_cores": sync_cpu.cpu_percent / 100,
        "sync_rss_peak_mb": sync_cpu.rss_peak_mb,
        "simulator_applied": simulated.stats["applied"],
        "goal_s": GOAL_S,
        "goal_met": in_sync_s <= GOAL_S if sites >= GOAL_SITES else None,
        **machine_info(),
    }
    return BenchResult(
        bench=BENCH,
        value=in_sync_s,
        unit="s until all sites in-sync",
        baseline=baseline_s,
        target=baseline_s / GOAL_S,
        ratio=baseline_s / in_sync_s if in_sync_s > 0 else None,
        extra=extra,
    )


async def wait_all_in_sync(center: Bus, sites: int, started: float, timeout_s: float) -> float:
    while True:
        status = await sync_status(center, SyncStatusQuery(sites=[], limit=1), timeout=30)
        if status.totals.get("in-sync", 0) >= sites:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"not all in-sync after {timeout_s} s: {status.totals}")
        await asyncio.sleep(0.2)


def main() -> None:
    def more(parser: Any) -> None:
        parser.add_argument("--sites", type=int, default=None)
        parser.add_argument("--groups", type=int, default=10)

    args = bench_args(__doc__ or BENCH, add_arguments=more)
    configure_logging("warning")
    sites = args.sites or (5_000 if args.quick else GOAL_SITES)
    result = asyncio.run(run(sites, args.groups, args.quick))
    result.emit()


if __name__ == "__main__":
    main()
