"""`edgebus simulate`: run a virtual fleet against a center until a duration or Ctrl-C.

Onboards, heartbeats, optionally silences some sites for a while, and reports progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.simulator.config import SimulatorConfig
from edge_agent.simulator.fleet import FleetStats, SimulatedFleet
from edge_agent.simulator.onboarding import OnboardSummary

REPORT_EVERY_S = 10.0


@dataclass(frozen=True)
class SilencePlan:
    """`count` sites (spread over the fleet) go silent `after_s` after onboarding, and come
    back `for_s` later (None: stay silent until the simulation ends)."""

    count: int = 0
    after_s: float = 0.0
    for_s: float | None = None


@dataclass(frozen=True)
class SimulationResult:
    onboarding: OnboardSummary
    stats: FleetStats
    silenced: tuple[str, ...]
    seconds: float


async def simulate(
    config: SimulatorConfig,
    *,
    duration_s: float | None = None,
    silence: SilencePlan | None = None,
    report: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> SimulationResult:
    """Run the fleet until `duration_s` after onboarding, `stop`, or SIGINT/SIGTERM."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    silence = silence or SilencePlan()
    silenced: list[str] = []
    try:
        async with SimulatedFleet(config) as fleet:
            report(
                f"simulating {config.sites:,} sites ({config.prefix}-*) in {config.groups} "
                f"groups over {config.connections} connection(s) to {config.server}"
            )
            fleet.start_heartbeats()
            await fleet.start_config_sync()
            onboarding = asyncio.create_task(fleet.onboard())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({onboarding, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not onboarding.done():  # Ctrl-C while onboarding: keep what was done
                onboarding.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await onboarding
                summary = fleet.onboarding or OnboardSummary()
                report(f"stopped while onboarding: {summary.onboarded:,} onboarded")
                return SimulationResult(summary, fleet.stats(), (), time.monotonic() - started)
            summary = onboarding.result()
            report(
                f"onboarded {summary.onboarded:,} (adopted {summary.adopted:,} from an earlier "
                f"run) in {summary.seconds:.1f} s = {summary.rate:,.0f} sites/s; "
                f"refused {len(summary.refused):,}"
            )
            for site, reason in list(summary.refused.items())[:5]:
                report(f"  refused {site}: {reason}")
            onboarded_at = time.monotonic()
            end = onboarded_at + duration_s if duration_s is not None else None
            silence_at = onboarded_at + silence.after_s if silence.count else None
            resume_at: float | None = None
            last_report, last_sent = time.monotonic(), fleet.stats().beats_sent
            while not stop.is_set():
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                if silence_at is not None and now >= silence_at:
                    silenced = fleet.silence(fleet.spread(silence.count))
                    report(
                        f"silenced {len(silenced)} sites: {', '.join(silenced[:10])}"
                        + (" ..." if len(silenced) > 10 else "")
                    )
                    silence_at = None
                    if silence.for_s is not None:
                        resume_at = now + silence.for_s
                if resume_at is not None and now >= resume_at:
                    await fleet.resume(silenced)
                    report(f"{len(silenced)} silenced sites heartbeat again")
                    silenced, resume_at = [], None
                if now - last_report >= REPORT_EVERY_S:
                    stats = fleet.stats()
                    rate = (stats.beats_sent - last_sent) / (now - last_report)
                    report(
                        f"heartbeats {rate:,.0f}/s; sent {stats.beats_sent:,}, silent slots "
                        f"{stats.beats_silent:,}, skipped {stats.beats_skipped:,}, failed "
                        f"{stats.beats_failed:,}"
                    )
                    last_report, last_sent = now, stats.beats_sent
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            stats = fleet.stats()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return SimulationResult(summary, stats, tuple(silenced), time.monotonic() - started)
