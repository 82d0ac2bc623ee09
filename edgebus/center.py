"""Start a center on this machine: its nats-server (JetStream domain `hub`, leaf listener).

Used by `edgebus center run` and the demo; production runs a NATS cluster instead (compose/).
"""

from __future__ import annotations

import os
from pathlib import Path

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from bus.natsserver import NatsServerProcess, NatsServerSpec
from bus.streams import (
    UPLINK_KINDS,
    audit_stream,
    center_alarm_stream,
    dead_letter_stream,
    ensure_stream,
    site_events_center_stream,
    uplink_stream,
)


def start_center_server(data_dir: Path, *, extra_config: str = "") -> NatsServerProcess:
    """`extra_config`: more server config lines (e.g. operator mode from bus.auth)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = NatsServerSpec.hub("center", data_dir / "jetstream", extra_config=extra_config)
    server = NatsServerProcess(spec, data_dir)
    server.start()
    return server


async def declare_center_streams(bus: Bus) -> None:
    """Streams every center needs before any service starts: dead letters, what sites
    forward (`UP_<KIND>`), and the controller's history streams."""
    specs = [
        dead_letter_stream(subjects.CENTER),
        *(uplink_stream(kind) for kind in UPLINK_KINDS),
        site_events_center_stream(),
        audit_stream(),
        center_alarm_stream(),
    ]
    for spec in specs:
        await ensure_stream(bus.js, spec)


CREDENTIALS_ENV = "EDGEBUS_CREDENTIALS"


async def connect_center(
    url: str, name: str = "edgebus-cli", *, credentials: Path | None = None
) -> Bus:
    """A connection to the center; without `credentials`, the creds file named by
    `$EDGEBUS_CREDENTIALS` if set (so every command works against an operator-mode center)."""
    if credentials is None and os.environ.get(CREDENTIALS_ENV):
        credentials = Path(os.environ[CREDENTIALS_ENV])
    return await Bus.connect(
        NatsConfig.from_url(url, name=name, connect_timeout_s=5.0, credentials=credentials)
    )
