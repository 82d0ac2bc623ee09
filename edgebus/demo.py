"""The embedded demo: a center (and, as issues land, sites, devices, dashboard) on one machine.

Everything it starts is stopped on Ctrl-C, on `--duration` expiry, or on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from rich.console import Console

from edgebus.center import connect_center, declare_center_streams, start_center_server
from edgebus.status import collect_status, status_table


async def _wait_for_stop(duration_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if duration_s > 0:
        loop.call_later(duration_s, stop.set)
    await stop.wait()


async def _center_session(url: str, console: Console, duration_s: float) -> None:
    bus = await connect_center(url, name="edgebus-demo")
    try:
        await declare_center_streams(bus)
        console.print(status_table(await collect_status(bus)))
        console.print(f"center running at [bold]{url}[/bold]; Ctrl-C stops it")
        await _wait_for_stop(duration_s)
    finally:
        await bus.close()


def run_demo(data_dir: Path, console: Console, *, duration_s: float = 0.0) -> None:
    server = start_center_server(data_dir / "center")
    try:
        asyncio.run(_center_session(server.url, console, duration_s))
    finally:
        server.stop()
        console.print("demo stopped; every process it started has exited")


def run_center_until_stopped(data_dir: Path, console: Console) -> None:
    run_demo(data_dir, console)
