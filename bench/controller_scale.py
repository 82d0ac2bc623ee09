"""The controller at fleet scale: onboard N virtual sites, hold their heartbeats, blast, go silent.

    python -m bench.controller_scale [--quick] [--sites N] [--interval-s S] [--hold-s S]

One run, one throwaway hub (`bench.common.nats_server`), the controller as its own process
(`python -m services.controller`), the site simulator (`edge_agent.simulator`) in this one:

0. baseline: a nats-py subscriber in its own process that only counts `up.*.heartbeat`
   messages, fed by the simulator's blast (the same events the controller gets in phase 3);
   run before the controller starts, so it is the only receiver.
1. onboard: `sites.add` in batches + one `OnboardRequest` per site, pipelined; sites/s end
   to end; verified with `sites.query` (every site registered, every site online).
2. hold: every site heartbeats every `interval_s`, spread evenly; the controller's CPU
   (user+sys seconds / wall seconds = cores) and RSS over the window (psutil).
4. (during 2) silence `--silence` sites spread over the fleet: time from each one's last
   heartbeat to its `AvailabilityChanged(current=offline)` event, against the threshold;
   then they come back and must be online again.
3. blast: heartbeats as fast as the simulator sends them, closed loop (at most `window`
   messages ahead of what the controller has processed, read from `ctl.controller.stats`)
   so the controller is saturated without an unbounded queue; processed heartbeats/s from
   its counter and clock.

value = controller heartbeats processed/s (phase 3); baseline = raw count rate (phase 0);
target ratio 0.1: full processing (validation, liveness, scheduling) may cost at most 10x
a bare count. The goal stated by the issue, 100k sites held below one core, is reported as
`hold_target_met` (only meaningful at N = 100,000 and a 30 s interval).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

from bench.common import (
    BenchResult,
    ResourceSampler,
    ResourceUsage,
    bench_args,
    format_table,
    machine_info,
    nats_server,
    safe_ratio,
)
from bus import subjects
from bus.client import Bus, RemoteError
from bus.config import NatsConfig
from bus.log import configure_logging
from edge_agent.heartbeat.sender import HEARTBEAT_KIND
from edge_agent.simulator import SimulatedFleet, SimulatorConfig
from edge_agent.simulator.plan import fleet_selector
from schemas import REGISTRY
from schemas.controller import (
    Availability,
    AvailabilityChanged,
    ControllerStats,
    ControllerStatsQuery,
    SitesList,
    SitesQuery,
)
from schemas.errors import EventDecodeError

BENCH = "controller_scale"
TARGET_RATIO = 0.1
HOLD_TARGET_CORES = 1.0
PREFIX = "sim"
CONTROLLER_READY_S = 60.0
REQUEST_TIMEOUT_S = 60.0
ONLINE_WAIT_S = 120.0
CONTROLLER_WINDOW = 20_000  # heartbeats the blast may be ahead of the controller
RAW_WINDOW = 50_000
WARMUP_S = 1.0  # of each blast, before the rate is taken


@dataclass(frozen=True)
class Params:
    sites: int
    interval_s: float
    degraded_after_s: float
    offline_after_s: float
    hold_s: float
    blast_s: float
    baseline_s: float
    silence: int
    connections: int
    quick: bool


def params_from(args: argparse.Namespace) -> Params:
    quick = bool(args.quick)
    sites = args.sites or (2_000 if quick else 100_000)
    interval = args.interval_s or (2.0 if quick else 30.0)
    offline = args.offline_after_s or 4 * interval  # the controller's own default
    degraded = min(2.5 * interval, (interval + offline) / 2)
    # The hold window must see every silenced site cross the offline threshold.
    hold = args.hold_s or (offline + 2 * interval + 2.0)
    return Params(
        sites=sites,
        interval_s=interval,
        degraded_after_s=degraded,
        offline_after_s=offline,
        hold_s=hold,
        blast_s=args.blast_s or (4.0 if quick else 20.0),
        baseline_s=args.baseline_s or (3.0 if quick else 10.0),
        silence=min(args.silence, sites // 2),
        connections=args.connections,
        quick=quick,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=int, help="virtual sites (default 100,000; quick 2,000)")
    parser.add_argument("--interval-s", type=float, help="heartbeat interval (30; quick 2)")
    parser.add_argument("--offline-after-s", type=float, help="offline threshold (4 x interval)")
    parser.add_argument("--hold-s", type=float, help="hold window (offline + 2 intervals + 2 s)")
    parser.add_argument("--blast-s", type=float, help="controller blast (20; quick 4)")
    parser.add_argument("--baseline-s", type=float, help="raw baseline blast (10; quick 3)")
    parser.add_argument("--silence", type=int, default=100, help="sites made silent")
    parser.add_argument("--connections", type=int, default=2, help="simulator connections")


# -- the raw baseline: a subscriber that only counts -------------------------------------


def _count_heartbeats(url: str, counter: Synchronized[int], ready: MpEvent, stop: MpEvent) -> None:
    """Own process: count every `up.*.heartbeat` message, nothing else."""
    import nats

    async def main() -> None:
        nc = await nats.connect(url, name="bench-raw-counter", pending_size=64 * 1024 * 1024)
        count = 0

        async def on_message(_msg: Any) -> None:
            nonlocal count
            count += 1
            counter.value = count

        await nc.subscribe(subjects.up_each(HEARTBEAT_KIND), cb=on_message)
        await nc.flush()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await nc.close()

    asyncio.run(main())


@contextlib.contextmanager
def raw_counter(url: str) -> Iterator[tuple[Synchronized[int], int]]:
    ctx = mp.get_context("spawn")
    counter: Synchronized[int] = ctx.Value("q", 0, lock=False)
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_count_heartbeats, args=(url, counter, ready, stop), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the raw counter did not subscribe within 60 s")
        assert proc.pid is not None
        yield counter, proc.pid
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- the controller process --------------------------------------------------------------


@dataclass
class ControllerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, url: str, p: Params, workdir: Path) -> ControllerProcess:
        log_path = workdir / "controller.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "services.controller", "--nats", url,
                    "--heartbeat-interval-s", str(p.interval_s),
                    "--degraded-after-s", str(p.degraded_after_s),
                    "--offline-after-s", str(p.offline_after_s),
                    "--log-level", "warning",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return cls(proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


class Operator:
    """The bench's own connection to the center: stats, queries, availability events."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.changes: list[tuple[float, AvailabilityChanged]] = []  # (received at, event)
        self.changed = asyncio.Event()

    async def stats(self, timeout: float = REQUEST_TIMEOUT_S) -> ControllerStats:
        answer = await self.bus.request(
            subjects.control("controller", "stats"),
            ControllerStatsQuery(),
            ControllerStats,
            timeout=timeout,
        )
        return answer.data

    async def wait_ready(self, controller: ControllerProcess) -> ControllerStats:
        deadline = time.monotonic() + CONTROLLER_READY_S
        while True:
            if controller.proc.poll() is not None:
                raise RuntimeError(f"controller exited:\n{controller.log_tail()}")
            try:
                return await self.stats(timeout=1.0)
            except RemoteError as exc:  # it answers, but not with its stats: no use waiting
                raise RuntimeError(f"controller stats refused: {exc}") from None
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"controller not ready:\n{controller.log_tail()}")
            await asyncio.sleep(0.2)

    async def total(self, availability: Availability | None = None) -> int:
        answer = await self.bus.request(
            subjects.control("controller", "sites", "query"),
            SitesQuery(label_selector=fleet_selector(PREFIX), availability=availability, limit=1),
            SitesList,
            timeout=REQUEST_TIMEOUT_S,
        )
        return answer.data.total

    async def watch_availability(self) -> None:
        decode = REGISTRY.decoder_for(AvailabilityChanged)

        async def on_message(msg: Any) -> None:
            with contextlib.suppress(EventDecodeError):
                self.changes.append((time.time(), decode(msg.data).data))
                self.changed.set()

        await self.bus.nc.subscribe(subjects.center_sites_all(), cb=on_message)
        await self.bus.nc.flush()


# -- closed-loop blasting ------------------------------------------------------------------


@dataclass
class Saturation:
    """Gate of a blast: stay at most `window` messages ahead of the receiver's count, and
    remember (clock, count) readings to take the receiver's rate from."""

    read: Callable[[], Awaitable[tuple[float, int]]]  # -> (clock s, processed count)
    window: int
    base: int = 0
    last: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)

    async def start(self) -> None:
        at, self.base = await self.read()
        self.last = self.base
        self.samples.append((at, self.base))

    async def __call__(self, sent: int) -> None:
        while sent - (self.last - self.base) > self.window:
            at, self.last = await self.read()
            self.samples.append((at, self.last))
            if sent - (self.last - self.base) > self.window:
                await asyncio.sleep(0.02)

    async def finish(self) -> None:
        at, self.last = await self.read()
        self.samples.append((at, self.last))

    def rate(self, warmup_s: float) -> float:
        """Count per second between the first reading after the warm-up and the last."""
        if len(self.samples) < 2:
            return math.nan
        t0 = self.samples[0][0] + warmup_s
        after = [s for s in self.samples if s[0] >= t0] or self.samples
        (ta, ca), (tb, cb) = after[0], self.samples[-1]
        return (cb - ca) / (tb - ta) if tb > ta else math.nan


# -- phases ---------------------------------------------------------------------------------


_quiet = False


def say(text: str) -> None:
    if not _quiet:
        print(text, flush=True)


async def phase_baseline(fleet: SimulatedFleet, url: str, p: Params) -> dict[str, Any]:
    with raw_counter(url) as (counter, _pid):

        async def read() -> tuple[float, int]:
            return time.time(), int(counter.value)

        gate = Saturation(read, RAW_WINDOW)
        await gate.start()
        blast = await fleet.blast(duration_s=p.baseline_s, sites=fleet.ids, gate=gate)
        await asyncio.sleep(0.5)  # what is still in flight
        await gate.finish()
    rate = gate.rate(WARMUP_S)
    say(f"  baseline: raw counter {rate:,.0f} msg/s (simulator sent {blast.sent:,} at "
        f"{blast.rate:,.0f}/s; counted {gate.last - gate.base:,})")
    return {"rate": rate, "sent": blast.sent, "counted": gate.last - gate.base,
            "publish_rate": blast.rate}


async def phase_onboard(fleet: SimulatedFleet, op: Operator, p: Params) -> dict[str, Any]:
    summary = await fleet.onboard(adopt=False)
    registered = await op.total()
    say(f"  onboard: {summary.onboarded:,} sites in {summary.seconds:.1f} s = "
        f"{summary.rate:,.0f} sites/s; refused {len(summary.refused)}; registry {registered:,}")
    started = time.monotonic()
    online = 0
    while time.monotonic() - started < ONLINE_WAIT_S:
        online = await op.total(Availability.ONLINE)
        if online >= p.sites:
            break
        await asyncio.sleep(0.5)
    waited = time.monotonic() - started
    say(f"  online: {online:,}/{p.sites:,} ({waited:.1f} s after the last onboarding reply)")
    return {
        "onboarded": summary.onboarded,
        "seconds": summary.seconds,
        "rate": summary.rate,
        "refused": len(summary.refused),
        "refused_sample": dict(list(summary.refused.items())[:3]),
        "registered": registered,
        "online": online,
        "online_wait_s": waited,
    }


async def phase_hold(
    fleet: SimulatedFleet, op: Operator, controller_pid: int, p: Params
) -> dict[str, Any]:
    silent = fleet.silence(fleet.spread(p.silence))
    silent_set = set(silent)
    silenced_at = time.time()
    first = len(op.changes)
    before = await op.stats()
    with ResourceSampler({"controller": controller_pid}, interval_s=0.5) as sampler:
        await asyncio.sleep(p.hold_s)
    after = await op.stats()
    usage = sampler.usage["controller"]
    # Late stragglers: give them one more threshold before calling them missed.
    deadline = time.monotonic() + p.offline_after_s
    while time.monotonic() < deadline and len(_offline(op, first, silent_set)) < len(silent):
        op.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(op.changed.wait(), deadline - time.monotonic())
    offline = _offline(op, first, silent_set)
    detection = []
    for site, event in offline.items():
        last = fleet.last_beat_at(site)
        if last is not None:
            detection.append(event.at.timestamp() - last)
    others = [e for _, e in op.changes[first:] if e.site not in silent_set]
    beats = after.counters["heartbeats"] - before.counters["heartbeats"]
    held_s = (after.at - before.at).total_seconds()

    await fleet.resume(silent, beat_now=True)
    back = time.monotonic()
    mark = len(op.changes)
    while time.monotonic() - back < max(10.0, 3 * p.interval_s):
        returned = {e.site for _, e in op.changes[mark:] if e.current == Availability.ONLINE}
        if silent_set <= returned:
            break
        await asyncio.sleep(0.1)
    back_s = time.monotonic() - back
    returned = {e.site for _, e in op.changes[mark:] if e.current == Availability.ONLINE}

    result = {
        "cpu_cores": usage.cpu_seconds / usage.wall_seconds,
        "rss_mb": usage.rss_peak_mb,
        "window_s": usage.wall_seconds,
        "heartbeats_per_s": beats / held_s if held_s > 0 else math.nan,
        "expected_per_s": (p.sites - len(silent)) / p.interval_s,
        "persisted": after.counters["persisted"] - before.counters["persisted"],
        "silenced": len(silent),
        "offline_seen": len(offline),
        "detection_p50_s": statistics.median(detection) if detection else math.nan,
        "detection_max_s": max(detection) if detection else math.nan,
        "detection_min_s": min(detection) if detection else math.nan,
        "silenced_to_offline_max_s": (
            max(e.at.timestamp() for e in offline.values()) - silenced_at if offline else math.nan
        ),
        "other_transitions": len(others),
        "other_transitions_sample": [f"{e.site}:{e.previous}->{e.current}" for e in others[:5]],
        "back_online": len(returned & silent_set),
        "back_online_s": back_s,
    }
    say(f"  hold: controller {result['cpu_cores']:.3f} cores, RSS {usage.rss_peak_mb:,.0f} MB over "
        f"{usage.wall_seconds:.0f} s; heartbeats {result['heartbeats_per_s']:,.0f}/s (expected "
        f"{result['expected_per_s']:,.0f}/s); registry writes of sightings "
        f"{result['persisted']:,}")
    say(f"  silence: {len(offline)}/{len(silent)} offline; last beat -> offline p50 "
        f"{result['detection_p50_s']:.2f} s, max {result['detection_max_s']:.2f} s (threshold "
        f"{p.offline_after_s:g} s); other sites' transitions {len(others)}; back online "
        f"{result['back_online']}/{len(silent)} in {back_s:.1f} s")
    return result


def _offline(op: Operator, first: int, sites: set[str]) -> dict[str, AvailabilityChanged]:
    found: dict[str, AvailabilityChanged] = {}
    for _, event in op.changes[first:]:
        if event.site in sites and event.current == Availability.OFFLINE:
            found.setdefault(event.site, event)
    return found


async def phase_blast(
    fleet: SimulatedFleet, op: Operator, controller_pid: int, p: Params
) -> dict[str, Any]:
    async def read() -> tuple[float, int]:
        stats = await op.stats()
        return stats.at.timestamp(), stats.counters["heartbeats"] - stats.counters["rejected"]

    gate = Saturation(read, CONTROLLER_WINDOW)
    before = await op.stats()
    await gate.start()
    with ResourceSampler({"controller": controller_pid}, interval_s=0.5) as sampler:
        blast = await fleet.blast(duration_s=p.blast_s, gate=gate)
        await gate.finish()
    after = await op.stats()
    usage = sampler.usage["controller"]
    rate = gate.rate(WARMUP_S)
    rejected = after.counters["rejected"] - before.counters["rejected"]
    say(f"  blast: controller processed {rate:,.0f} heartbeats/s at "
        f"{usage.cpu_seconds / usage.wall_seconds:.2f} cores (simulator sent {blast.sent:,} at "
        f"{blast.rate:,.0f}/s, rejected {rejected})")
    return {
        "rate": rate,
        "sent": blast.sent,
        "publish_rate": blast.rate,
        "cpu_cores": usage.cpu_seconds / usage.wall_seconds,
        "rss_mb": usage.rss_peak_mb,
        "rejected": rejected,
        "leader": after.leader,
    }


# -- the run -----------------------------------------------------------------------------


async def run(p: Params, url: str, hub_pid: int, workdir: Path) -> dict[str, Any]:
    config = SimulatorConfig(
        sites=p.sites, server=url, prefix=PREFIX, interval_s=p.interval_s,
        connections=p.connections,
    )  # fmt: skip
    out: dict[str, Any] = {}
    async with SimulatedFleet(config) as fleet:
        say("phase 0: raw baseline (no controller yet)")
        out["baseline"] = await phase_baseline(fleet, url, p)

        controller = ControllerProcess.start(url, p, workdir)
        bus = await Bus.connect(NatsConfig.from_url(url, name="bench-operator"), source="/bench")
        op = Operator(bus)
        try:
            ready = await op.wait_ready(controller)
            await op.watch_availability()
            say(f"controller up (pid {controller.pid}, leader {ready.leader})")
            say("phase 1: onboard")
            fleet.start_heartbeats()
            with ResourceSampler(
                {"controller": controller.pid, "nats-server": hub_pid, "simulator": os.getpid()},
                interval_s=0.5,
            ) as sampler:
                out["onboard"] = await phase_onboard(fleet, op, p)
            out["onboard_usage"] = _usage(sampler.usage)
            say("phase 2+4: hold heartbeats, silence some sites")
            out["hold"] = await phase_hold(fleet, op, controller.pid, p)
            say("phase 3: blast")
            out["blast"] = await phase_blast(fleet, op, controller.pid, p)
            final = await op.stats()
            out["controller_counters"] = final.counters
            out["fleet"] = fleet.stats().__dict__
        finally:
            await bus.close()
            await fleet.stop_heartbeats()
            controller.stop()
        out["controller_exit"] = controller.proc.returncode
    return out


def _usage(usage: dict[str, ResourceUsage]) -> dict[str, Any]:
    return {
        name: {"cores": u.cpu_seconds / u.wall_seconds, "rss_mb": u.rss_peak_mb}
        for name, u in usage.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__.splitlines()[0] if __doc__ else BENCH, argv, _add_arguments)
    configure_logging("warning")
    p = params_from(args)
    global _quiet
    _quiet = bool(args.json_only)
    load_before = os.getloadavg()
    started = time.perf_counter()
    say(f"{BENCH}: {p.sites:,} virtual sites, heartbeat every {p.interval_s:g} s, offline "
        f"after {p.offline_after_s:g} s, hold {p.hold_s:g} s, blast {p.blast_s:g} s, silence "
        f"{p.silence}; load average {load_before[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="edgebus-ctlscale-") as tmp, nats_server(
        "controller-scale"
    ) as hub:
        assert hub.pid is not None
        out = asyncio.run(run(p, hub.url, hub.pid, Path(tmp)))
    seconds = time.perf_counter() - started
    base, onboard, hold, blast = out["baseline"], out["onboard"], out["hold"], out["blast"]

    say("")
    say(format_table(
        ["measure", "value", "note"],
        [
            ["sites", float(p.sites), f"{p.silence} silenced in the hold"],
            ["onboard sites/s", onboard["rate"], f"{onboard['onboarded']:,} in "
             f"{onboard['seconds']:.1f} s, refused {onboard['refused']}"],
            ["controller cores (onboard)", out["onboard_usage"]["controller"]["cores"], ""],
            ["hold heartbeats/s", hold["heartbeats_per_s"], f"every {p.interval_s:g} s"],
            ["hold controller cores", hold["cpu_cores"], f"over {hold['window_s']:.0f} s"],
            ["hold controller RSS MB", hold["rss_mb"], "peak"],
            ["blast heartbeats/s", blast["rate"], "controller, saturated"],
            ["raw count msg/s", base["rate"], "nats-py subscriber, counts only"],
            ["ratio", safe_ratio(blast["rate"], base["rate"]), f"target >= {TARGET_RATIO}"],
            ["offline detection p50 s", hold["detection_p50_s"], "last beat -> offline event"],
            ["offline detection max s", hold["detection_max_s"],
             f"threshold {p.offline_after_s:g} s"],
        ],
    ))

    hold_met = hold["cpu_cores"] < HOLD_TARGET_CORES
    BenchResult(
        bench=BENCH,
        value=blast["rate"],
        unit="msg/s",
        baseline=base["rate"],
        target=TARGET_RATIO,
        extra={
            "sites": p.sites,
            "onboard_per_s": onboard["rate"],
            "hold_cpu_cores": hold["cpu_cores"],
            "hold_rss_mb": hold["rss_mb"],
            "offline_detection_s": {
                "p50": hold["detection_p50_s"], "max": hold["detection_max_s"],
                "min": hold["detection_min_s"],
            },
            "offline_threshold_s": p.offline_after_s,
            "hold_target_met": hold_met,
            "hold_target_cores": HOLD_TARGET_CORES,
            "interval_s": p.interval_s,
            "quick": p.quick,
            "phases": out,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "seconds": seconds,
            **machine_info(),
        },
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
