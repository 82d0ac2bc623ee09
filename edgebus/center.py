"""Start a center on this machine: its nats-server (JetStream domain `hub`, leaf listener).

Used by `edgebus center run` and the demo; production runs a NATS cluster instead (compose/).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")


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


def call_center(
    server: str,
    work: Callable[[Bus], Awaitable[T]],
    *,
    service: str,
    command_error: type[Exception],
    credentials: Path | None = None,
    timeout: float | None = None,
    name: str = "edgebus-cli",
) -> T:
    """Run one operator request against the center for the CLI; every failure exits with a
    clear message: code 2 for bad input, no center or no `service` answering, 1 if refused."""
    import typer
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError
    from pydantic import ValidationError
    from rich.console import Console

    from bus.client import RemoteError

    err = Console(stderr=True)

    async def run() -> T:
        bus = await connect_center(server, name=name, credentials=credentials)
        try:
            return await asyncio.wait_for(work(bus), timeout)
        finally:
            await bus.close()

    try:
        return asyncio.run(run())
    except command_error as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        err.print(f"[red]invalid input:[/red] {problems}")
        raise typer.Exit(2) from None
    except RemoteError as exc:
        err.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(1) from None
    except ConnectionError as exc:
        err.print(f"[red]cannot reach the center:[/red] {exc}")
        raise typer.Exit(2) from None
    except (NoRespondersError, NatsTimeoutError, TimeoutError):
        err.print(f"[red]no {service} answered at {server}[/red] (is one running?)")
        raise typer.Exit(2) from None
