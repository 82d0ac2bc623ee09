"""Start a center on this machine: its nats-server (JetStream domain `hub`, leaf listener).

Used by `edgebus center run` and the demo; production runs a NATS cluster instead (compose/).
"""

from __future__ import annotations

from pathlib import Path

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.natsserver import NatsServerProcess, NatsServerSpec
from bus.streams import dead_letter_stream, ensure_stream


def start_center_server(data_dir: Path) -> NatsServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = NatsServerSpec.hub("center", data_dir / "jetstream")
    server = NatsServerProcess(spec, data_dir)
    server.start()
    return server


async def declare_center_streams(bus: Bus) -> None:
    """Streams every center needs before any service starts."""
    await ensure_stream(bus.js, dead_letter_stream(subjects.CENTER))


async def connect_center(url: str, name: str = "edgebus-cli") -> Bus:
    return await Bus.connect(NatsConfig.from_url(url, name=name, connect_timeout_s=5.0))
