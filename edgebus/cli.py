"""The `edgebus` command line: one typer app, one sub-app per concern.

Every read command takes `--json` and then prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bus.log import configure_logging
from edgebus import __version__

app = typer.Typer(help="edgebus: run many edge sites from one center.", no_args_is_help=True)
schemas_app = typer.Typer(help="Versioned event schemas.", no_args_is_help=True)
center_app = typer.Typer(help="Run a center on this machine.", no_args_is_help=True)
site_app = typer.Typer(
    help="Run an edge site on this machine, and read it locally (no center needed).",
    no_args_is_help=True,
)
app.add_typer(schemas_app, name="schemas")
app.add_typer(center_app, name="center")
app.add_typer(site_app, name="site")

console = Console()

ServerOption = Annotated[
    str, typer.Option("--server", "-s", envvar="EDGEBUS_SERVER", help="center NATS URL")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON document")]


def print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgebus {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="show version"),
    ] = False,
    log_level: Annotated[str, typer.Option(envvar="EDGEBUS_LOG_LEVEL")] = "warning",
) -> None:
    configure_logging(log_level)


# -- schemas -------------------------------------------------------------------------


@schemas_app.command("export")
def schemas_export(directory: Path) -> None:
    """Write the JSON Schema of every registered event version into DIRECTORY."""
    from schemas import REGISTRY
    from schemas.export import export_json_schemas

    for path in export_json_schemas(REGISTRY, directory):
        typer.echo(str(path))


@schemas_app.command("list")
def schemas_list(as_json: JsonOption = False) -> None:
    """Every registered event type and version."""
    from schemas import REGISTRY

    rows = [
        {"type": s.event_type, "version": s.version, "dataschema": s.schema_uri}
        for s in sorted(REGISTRY.specs(), key=lambda s: (s.event_type, s.version))
    ]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        typer.echo(f"{row['type']:<40} v{row['version']}  {row['dataschema']}")


# -- status --------------------------------------------------------------------------


@app.command()
def status(server: ServerOption = "nats://127.0.0.1:4222", as_json: JsonOption = False) -> None:
    """The center's server, JetStream usage and streams."""
    from edgebus.center import connect_center
    from edgebus.status import collect_status, status_table

    async def run() -> dict[str, Any]:
        bus = await connect_center(server)
        try:
            return await collect_status(bus)
        finally:
            await bus.close()

    try:
        document = asyncio.run(run())
    except ConnectionError as exc:
        console.print(f"[red]cannot reach the center:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print_json(document)
    else:
        console.print(status_table(document))


# -- center / demo -------------------------------------------------------------------


@center_app.command("run")
def center_run(
    data_dir: Annotated[Path, typer.Option(help="where the center keeps its state")] = Path(
        ".edgebus/center"
    ),
) -> None:
    """Start a center nats-server here and keep it running until Ctrl-C."""
    from edgebus.demo import run_center_until_stopped

    run_center_until_stopped(data_dir, console)


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="where the demo keeps its state")] = Path(
        ".edgebus/demo"
    ),
    duration: Annotated[
        float, typer.Option(help="stop after this many seconds (0: until Ctrl-C)")
    ] = 0.0,
) -> None:
    """The embedded demo on this machine; Ctrl-C stops everything it started."""
    from edgebus.demo import run_demo

    run_demo(data_dir, console, duration_s=duration)


# -- site ----------------------------------------------------------------------------

SiteOption = Annotated[
    str | None,
    typer.Option("--site", envvar="EDGEBUS_SITE", help="site id (data dir .edgebus/sites/<id>)"),
]
SiteDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", "-d", envvar="EDGEBUS_SITE_DIR", help="the site's data dir"),
]


@site_app.command("run")
def site_run(
    site: Annotated[str, typer.Option("--site", envvar="EDGEBUS_SITE", help="site id")],
    center: Annotated[
        str, typer.Option(envvar="EDGEBUS_CENTER", help="center leaf URL nats-leaf://HOST:PORT")
    ],
    data_dir: SiteDirOption = None,
    host: Annotated[str, typer.Option(help="address every site listener binds")] = "127.0.0.1",
    nats_port: Annotated[int, typer.Option(help="0: persisted or free")] = 0,
    monitor_port: Annotated[int, typer.Option(help="0: persisted or free")] = 0,
    mqtt_port: Annotated[int, typer.Option(help="device MQTT port; 0: persisted or free")] = 0,
    mqtt_broker: Annotated[
        str | None, typer.Option(help="read devices from this broker instead (mqtt://h:p)")
    ] = None,
    replay_max_bytes: Annotated[int | None, typer.Option(help="replay log bound")] = None,
    replay_max_age_s: Annotated[float | None, typer.Option(help="replay log max age")] = None,
    replay_policy: Annotated[
        str | None, typer.Option(help="when full: refuse_new | drop_oldest")
    ] = None,
    leaf_credentials: Annotated[
        Path | None, typer.Option(help="credentials file for the center link")
    ] = None,
    leaf_reconnect_s: Annotated[float, typer.Option(help="center redial interval")] = 1.0,
    agent_log_level: Annotated[str, typer.Option(help="the agent's log level")] = "info",
    restart_backoff_min_s: Annotated[float, typer.Option(help="first restart delay")] = 0.5,
    restart_backoff_max_s: Annotated[float, typer.Option(help="longest restart delay")] = 30.0,
) -> None:
    """Start this site's nats-server (leaf of the center) and its agent; supervise until Ctrl-C."""
    from edge_agent.supervisor import SiteRunConfig
    from edgebus.site import run_site, site_data_dir

    try:
        config = SiteRunConfig(
            site=site,
            center_leaf_url=center,
            data_dir=site_data_dir(site, data_dir),
            host=host,
            nats_port=nats_port,
            monitor_port=monitor_port,
            mqtt_port=mqtt_port,
            mqtt_broker=mqtt_broker,
            replay_max_bytes=replay_max_bytes,
            replay_max_age_s=replay_max_age_s,
            replay_policy=replay_policy,
            leaf_credentials=leaf_credentials,
            leaf_reconnect_s=leaf_reconnect_s,
            agent_log_level=agent_log_level,
            restart_backoff_min_s=restart_backoff_min_s,
            restart_backoff_max_s=restart_backoff_max_s,
        )
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    raise typer.Exit(run_site(config, console))


@site_app.command("status")
def site_status(
    site: SiteOption = None,
    data_dir: SiteDirOption = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the agent")] = 2.0,
    as_json: JsonOption = False,
) -> None:
    """Processes, center link, local streams and the agent's own report; works offline."""
    from edgebus.site import SiteToolError, collect_site_status, render_site_status, site_data_dir

    try:
        document = asyncio.run(
            collect_site_status(site_data_dir(site, data_dir), timeout_s=timeout)
        )
    except SiteToolError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if as_json:
        print_json(document)
    else:
        console.print(render_site_status(document))


@site_app.command("tail")
def site_tail(
    site: SiteOption = None,
    data_dir: SiteDirOption = None,
    last: Annotated[int, typer.Option(help="start with this many past events")] = 20,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="keep printing")] = True,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="one JSON document; with --follow one JSON object per line"),
    ] = False,
) -> None:
    """The site's recent events (readings, alarms) from its local EVENTS stream; works offline."""
    from edgebus.site import SiteToolError, format_entry, site_data_dir, tail_site_events

    collected: list[dict[str, Any]] = []

    def emit(entry: dict[str, Any]) -> None:
        if as_json and not follow:
            collected.append(entry)
        elif as_json:
            typer.echo(json.dumps(entry, sort_keys=True, default=str))
        else:
            typer.echo(format_entry(entry))

    try:
        asyncio.run(tail_site_events(site_data_dir(site, data_dir), emit, last=last, follow=follow))
    except SiteToolError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
    if as_json and not follow:
        print_json(collected)


def main() -> None:
    app()
