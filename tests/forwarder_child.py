"""A replay-log forwarder in its own process, for crash tests (the test SIGKILLs it mid-backlog).

Usage: python tests/forwarder_child.py <site nats url> <site id> <batch size>; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from bus.client import open_connection
from bus.config import NatsConfig
from bus.forwarder import Forwarder, ForwarderConfig


async def main(url: str, site: str, batch_size: int) -> None:
    nc = await open_connection(NatsConfig.from_url(url, name=f"forwarder-child-{site}"))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    config = ForwarderConfig(batch_size=batch_size, publish_timeout_s=2.0, backoff_max_s=1.0)
    try:
        await Forwarder(nc, site, config).run(stop)
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
