"""What every center service's `python -m services.<name>` does around the service itself:
arguments to a config (exit 2 if bad), one center connection, a stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bus.log import configure_logging, get_logger

if TYPE_CHECKING:
    from bus.client import Bus

C = TypeVar("C")

# Young collections after this many net allocations (default 700); a full one after 20 x 100
# of them. A center service keeps a large long-lived table (sites, alarms) beside a stream of
# short-lived messages: with the defaults, full collections rescanned the table again and
# again (controller: up to 3.2 s each at 100k sites; alarms storm: 0.34 s of GC in a 4.5 s
# pass, 0.02-0.03 s with these).
GC_THRESHOLDS = (50_000, 20, 100)


def collect_garbage_less_often() -> None:
    """For a long-running service process, once its modules are loaded: freeze what start-up
    allocated (modules, schemas; never garbage) out of the collector's sight, and collect the
    young generation less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def service_main(
    argv: Sequence[str] | None,
    *,
    parser: argparse.ArgumentParser,
    config_from_args: Callable[[argparse.Namespace], C],
    serve: Callable[[argparse.Namespace, C], Coroutine[Any, Any, None]],
    name: str,
) -> int:
    """Parse, configure logging (`--log-level`), build the config (a ValueError: exit 2),
    serve until stopped (exit 0)."""
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        get_logger(name).error("bad_arguments", error=str(exc))
        return 2
    asyncio.run(serve(args, config))
    return 0


async def serve_until_signalled(
    nats_url: str,
    credentials: Path | None,
    *,
    name: str,
    source: str,
    run: Callable[[Bus, asyncio.Event], Awaitable[None]],
) -> None:
    """Connect as `name`, `run(bus, stop)` until SIGTERM/SIGINT sets `stop`, then close."""
    # Imported here, after the caller configured logging (loggers bind at import in some modules).
    from bus.client import Bus
    from bus.config import NatsConfig

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = NatsConfig.from_url(nats_url, name=name, credentials=credentials)
    bus = await Bus.connect(config, scope="center", source=source)
    collect_garbage_less_often()  # the service's modules are imported by now
    try:
        await run(bus, stop)
    finally:
        await bus.close()
