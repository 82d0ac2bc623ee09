"""Shared helpers for every bench script: `--quick`, medians, a throwaway nats-server,
process CPU/RSS sampling, a plain-text table, and the one-JSON-object last line."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from nats.aio.client import Client as NatsClient

from bus.jspublish import PipelinedPublisher
from bus.natsserver import NatsServerProcess, NatsServerSpec

__all__ = [
    "BenchResult",
    "ResourceSampler",
    "ResourceUsage",
    "bench_args",
    "cpu_us_per_item",
    "format_table",
    "machine_info",
    "median",
    "nats_server",
    "process_cpu_seconds",
    "publish_all",
    "rate",
    "safe_ratio",
]

# Generous per-connection outbound buffer for throughput runs: a subscriber that falls
# behind a fast publisher must queue in the server, not be cut off as a slow consumer.
BENCH_SERVER_CONFIG = "max_pending: 536870912"


# -- command line -------------------------------------------------------------------


def bench_args(
    description: str,
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse the common flags (`--quick`, `--json-only`) plus any the script adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="smaller run that finishes in under 45 s"
    )
    parser.add_argument(
        "--json-only", action="store_true", help="print only the JSON result line"
    )
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args(argv)


# -- statistics ---------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """Median of the values; NaN for none (so a missing path never crashes the report)."""
    data = [v for v in values if not math.isnan(v)]
    return float(statistics.median(data)) if data else math.nan


def rate(count: int, seconds: float) -> float:
    """Events per second, NaN when the interval is empty."""
    return count / seconds if seconds > 0 else math.nan


def safe_ratio(numerator: float, denominator: float) -> float:
    if denominator == 0 or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def _json_number(value: Any) -> Any:
    """JSON has no NaN: report it as null; round floats to something readable."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, 4) if abs(value) < 100 else round(value, 1)
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_number(v) for v in value]
    return value


# -- result line --------------------------------------------------------------------


@dataclass
class BenchResult:
    """The figure a bench script stands for, against a baseline measured in the same run.

    `emit()` prints it as one JSON object on one line: it must be the script's last line.
    """

    bench: str
    value: float
    unit: str
    baseline: float
    target: float
    ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None:
            self.ratio = safe_ratio(self.value, self.baseline)

    @property
    def met(self) -> bool:
        return self.ratio is not None and not math.isnan(self.ratio) and self.ratio >= self.target

    def as_dict(self) -> dict[str, Any]:
        core = {
            "bench": self.bench,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target,
            "target_met": self.met,
        }
        clashes = core.keys() & self.extra.keys()
        if clashes:
            raise ValueError(f"extra fields shadow core fields: {sorted(clashes)}")
        return _json_number({**core, **self.extra})  # type: ignore[no-any-return]

    def emit(self) -> None:
        sys.stdout.flush()
        print(json.dumps(self.as_dict(), separators=(",", ":")), flush=True)


def machine_info() -> dict[str, Any]:
    """Enough context to compare a figure with another run's."""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width text table; floats get thousands separators."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


# -- nats-server --------------------------------------------------------------------


@contextmanager
def nats_server(
    name: str = "bench", *, extra_config: str = BENCH_SERVER_CONFIG
) -> Iterator[NatsServerProcess]:
    """A throwaway nats-server (JetStream on) in a temp dir, stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix=f"edgebus-{name}-") as tmp:
        workdir = Path(tmp)
        spec = NatsServerSpec.hub(name, workdir / "store", extra_config=extra_config)
        server = NatsServerProcess(spec, workdir)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# A JetStream message to store: subject, payload, headers.
Stored = tuple[str, bytes, dict[str, str] | None]


async def publish_all(
    nc: NatsClient, messages: Iterable[Stored], *, window: int = 5000, timeout_s: float = 60.0
) -> float:
    """Store every message through JetStream, `window` in flight at a time; seconds taken.
    RuntimeError on the first message the server did not store (set-up must be whole)."""
    publisher = PipelinedPublisher(nc)
    await publisher.start()
    started = time.perf_counter()
    pending: list[Any] = []

    async def settle() -> None:
        results = await publisher.wait(pending, timeout_s)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"storing failed: {failed[0]!r}")
        pending.clear()

    try:
        for subject, payload, headers in messages:
            pending.append(await publisher.publish(subject, payload, headers))
            if len(pending) >= window:
                await settle()
        await settle()
    finally:
        await publisher.close()
    return time.perf_counter() - started


# -- process CPU / memory -----------------------------------------------------------


@dataclass(frozen=True)
class ResourceUsage:
    """CPU and memory of one process over a sampled interval."""

    cpu_seconds: float
    wall_seconds: float
    rss_peak_mb: float

    @property
    def cpu_percent(self) -> float:
        """Share of one core (100 = one core fully busy)."""
        return 100.0 * safe_ratio(self.cpu_seconds, self.wall_seconds)


def process_cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds (user + system) the process has used so far."""
    times = proc.cpu_times()
    return float(times.user + times.system)


def cpu_us_per_item(sampler: ResourceSampler, n: int) -> dict[str, float]:
    """Each sampled process's CPU in µs per item, over `n` items."""
    return {name: 1e6 * usage.cpu_seconds / n for name, usage in sampler.usage.items()}


class ResourceSampler:
    """Samples CPU time and RSS of some pids from a background thread.

    `with ResourceSampler({"server": pid}) as s: ...` then `s.usage["server"]`.
    Processes that exit while sampled keep their last reading.
    """

    def __init__(self, pids: dict[str, int], interval_s: float = 0.1) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._cpu0: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._rss: dict[str, int] = {}
        self._t0 = 0.0
        self._t1 = 0.0
        self.usage: dict[str, ResourceUsage] = {}


    def _sample(self) -> None:
        for name, proc in self._procs.items():
            try:
                with proc.oneshot():
                    self._cpu[name] = process_cpu_seconds(proc)
                    self._rss[name] = max(self._rss.get(name, 0), int(proc.memory_info().rss))
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> ResourceSampler:
        for name, proc in self._procs.items():
            try:
                self._cpu0[name] = process_cpu_seconds(proc)
            except psutil.Error:
                self._cpu0[name] = 0.0
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._t1 = time.perf_counter()
        for name in self._procs:
            self.usage[name] = ResourceUsage(
                cpu_seconds=self._cpu.get(name, 0.0) - self._cpu0.get(name, 0.0),
                wall_seconds=self._t1 - self._t0,
                rss_peak_mb=self._rss.get(name, 0) / (1024 * 1024),
            )
