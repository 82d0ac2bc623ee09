"""What log shipping costs the code that logs: calls per second of one logger call, in process.

    python -m bench.log_overhead [--quick]

Baseline (same run, same processors and JSON renderer, output to /dev/null): structlog as
edgebus configured it before live levels and taps (`make_filtering_bound_logger(INFO)`).
Ours: `bus.log` now (every level passes the wrapper; a first processor drops what is neither
printed nor tapped), alone and with the log shipper's tap (`ShipQueue`, ship level warning).

- suppressed debug: a `debug` call at printed level info (the hot-path case: dropped);
- printed warning: a `warning` call printed as JSON, no tap;
- queued warning: the same call, also copied into the shipper's queue (ship level warning);
- conversion: per record, the shipper turning a queued copy into a `LogRecord` (off the
  logging call, on the shipper's task).

Headline: queued warning vs the baseline's printed warning (target: at least half as fast).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from bench.common import BenchResult, bench_args, format_table, machine_info, median
from bus import log as buslog
from edge_agent.logship.queue import ShipQueue

BENCH = "log_overhead"
TARGET = 0.5


@contextlib.contextmanager
def stderr_to_devnull() -> Iterator[None]:
    saved = sys.stderr
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        try:
            yield
        finally:
            sys.stderr = saved


def baseline_logger() -> Any:
    """structlog exactly as `bus.log` configured it before this change."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=buslog._stderr_logger,
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("bench").bind(component="bench", site="s1")


def ours_logger() -> Any:
    buslog.configure_logging("info", json=True)
    return buslog.get_logger("bench", site="s1")


def calls_per_s(method: Callable[..., Any], n: int) -> float:
    """Rate of `method("tick", n=1)`, one logger call each."""
    started = time.perf_counter()
    for _ in range(n):
        method("tick", n=1)
    return n / (time.perf_counter() - started)


def main() -> None:
    args = bench_args(__doc__ or "")
    n = 20_000 if args.quick else 100_000
    rounds = 3 if args.quick else 7
    names = ("base_debug", "base_warning", "ours_debug", "ours_warning", "shipped", "convert")
    results: dict[str, list[float]] = {k: [] for k in names}
    queue = ShipQueue("s1", capacity=n + 1)
    with stderr_to_devnull():
        for _ in range(rounds):  # alternate, so machine drift hits every path alike
            base = baseline_logger()
            results["base_debug"].append(calls_per_s(base.debug, n))
            results["base_warning"].append(calls_per_s(base.warning, n))
            ours = ours_logger()
            results["ours_debug"].append(calls_per_s(ours.debug, n))
            results["ours_warning"].append(calls_per_s(ours.warning, n))
            buslog.add_tap(queue.tap)
            try:
                results["shipped"].append(calls_per_s(ours.warning, n))
            finally:
                buslog.remove_tap(queue.tap)
            # The shipper's side: turning the queued copies into LogRecords.
            started = time.perf_counter()
            taken = len(queue.take(n + 1))
            results["convert"].append(taken / (time.perf_counter() - started))
            assert taken == n and queue.dropped_total == 0, (taken, queue.dropped_total)
    med = {k: median(v) for k, v in results.items()}
    if not args.json_only:
        print(f"{n} calls per path, {rounds} rounds, medians (calls/s):")
        rows = [
            ("suppressed debug", med["base_debug"], med["ours_debug"]),
            ("printed warning", med["base_warning"], med["ours_warning"]),
            ("printed + queued warning", med["base_warning"], med["shipped"]),
        ]
        print(f"conversion to LogRecord (shipper side): {1e6 / med['convert']:.1f} us per record")
        print(
            format_table(
                ("call", "baseline", "ours", "ours/baseline"),
                [(name, f"{b:,.0f}", f"{o:,.0f}", f"{o / b:.2f}") for name, b, o in rows],
            )
        )
    BenchResult(
        bench=BENCH,
        value=med["shipped"],
        unit="calls/s",
        baseline=med["base_warning"],
        target=TARGET,
        extra={
            "printed_warning": med["ours_warning"],
            "suppressed_debug": med["ours_debug"],
            "suppressed_debug_baseline": med["base_debug"],
            "suppressed_debug_us": 1e6 / med["ours_debug"],
            "suppressed_debug_baseline_us": 1e6 / med["base_debug"],
            "queued_warning_us": 1e6 / med["shipped"],
            "conversion_us": 1e6 / med["convert"],
            "n": n,
            "rounds": rounds,
            "machine": machine_info(),
        },
    ).emit()


if __name__ == "__main__":
    main()
