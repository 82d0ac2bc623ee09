"""What every center service's `python -m services.<name>` does around the service itself:
one center connection, and a stop on SIGTERM/SIGINT, then the connection drained and closed.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bus.client import Bus


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
    try:
        await run(bus, stop)
    finally:
        await bus.close()
