"""The `edgebus` command line: one typer app, one sub-app per concern.

Every read command takes `--json` and then prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from bus.log import configure_logging
from edgebus import __version__, alarms_cli
from edgebus.config_cli import config_app, sync_app
from edgebus.logs_cli import logs_app
from schemas.controller import Availability, SiteChange, SiteRecord, SitesQuery

if TYPE_CHECKING:
    from bus.client import Bus
    from schemas.controller import SiteChanged, SitesAdded

T = TypeVar("T")

app = typer.Typer(help="edgebus: run many edge sites from one center.", no_args_is_help=True)
schemas_app = typer.Typer(help="Versioned event schemas.", no_args_is_help=True)
center_app = typer.Typer(help="Run a center on this machine.", no_args_is_help=True)
site_app = typer.Typer(
    help="Run an edge site on this machine, and read it locally (no center needed).",
    no_args_is_help=True,
)
app.add_typer(schemas_app, name="schemas")
app.add_typer(center_app, name="center")
sites_app = typer.Typer(
    help="The center's registry of sites: add (bootstrap tokens), list, show, manage, delete.",
    no_args_is_help=True,
)
app.add_typer(site_app, name="site")
app.add_typer(sites_app, name="sites")
app.add_typer(alarms_cli.app, name="alarms")
app.add_typer(logs_app, name="logs")
app.add_typer(config_app, name="config")
app.add_typer(sync_app, name="sync")

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


@schemas_app.command("asyncapi")
def schemas_asyncapi(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here, not stdout")] = None,
) -> None:
    """The AsyncAPI 3.0 document: every subject, the events on it, their JSON Schemas."""
    from bus.asyncapi import asyncapi_document
    from schemas import REGISTRY

    text = json.dumps(asyncapi_document(REGISTRY, version=__version__), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(str(out))


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
    data_dir: Annotated[
        Path, typer.Option(help="where the demo keeps its state (emptied at every run)")
    ] = Path(".edgebus/demo"),
    duration: Annotated[
        float, typer.Option(help="stop after this many seconds (0: until Ctrl-C)")
    ] = 0.0,
    sites: Annotated[int, typer.Option(help="real sites (own nats-server and agent each)")] = 2,
    simulate: Annotated[int, typer.Option(help="add this many virtual sites (simulator)")] = 0,
    devices: Annotated[int, typer.Option(help="simulated devices per real site")] = 3,
    device_interval: Annotated[float, typer.Option(help="seconds between readings")] = 1.0,
    summary_json: Annotated[
        Path | None, typer.Option(help="write a JSON summary of the run here at exit")
    ] = None,
) -> None:
    """The embedded demo: center, controller, sites onboarded zero-touch, devices over MQTT
    and a live fleet table; Ctrl-C stops everything it started."""
    from edgebus.demo import DemoOptions, run_demo

    try:
        options = DemoOptions(
            data_dir=data_dir,
            duration_s=duration,
            sites=sites,
            simulate=simulate,
            devices_per_site=devices,
            device_interval_s=device_interval,
            summary_json=summary_json,
        )
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    raise typer.Exit(run_demo(options, console))


@app.command()
def simulate(
    sites: Annotated[int, typer.Option(help="how many virtual sites")],
    prefix: Annotated[str, typer.Option(help="site ids are <prefix>-<n>")] = "sim",
    groups: Annotated[int, typer.Option(help="spread the sites over this many groups")] = 10,
    interval_s: Annotated[float, typer.Option(help="heartbeat interval of every site")] = 30.0,
    server: ServerOption = "nats://127.0.0.1:4222",
    duration: Annotated[
        float, typer.Option(help="run this many seconds after onboarding (0: until Ctrl-C)")
    ] = 0.0,
    silence: Annotated[int, typer.Option(help="this many sites go silent (link cut)")] = 0,
    silence_after: Annotated[float, typer.Option(help="seconds after onboarding")] = 0.0,
    silence_for: Annotated[
        float, typer.Option(help="then they come back after this long (0: never)")
    ] = 0.0,
    connections: Annotated[int, typer.Option(help="NATS connections the fleet shares")] = 2,
    credentials: Annotated[
        Path | None, typer.Option(help="the simulator identity (a service creds file)")
    ] = None,
) -> None:
    """Many virtual sites speaking the site protocol to the center (scale figures, demo).

    They onboard with their own tokens and heartbeat like real sites, but share a few
    connections under one simulator identity allowed to speak for all of them.
    """
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError

    from edge_agent.simulator import SimulatorConfig
    from edge_agent.simulator.runner import SilencePlan
    from edge_agent.simulator.runner import simulate as run_simulation

    try:
        config = SimulatorConfig(
            sites=sites,
            server=server,
            prefix=prefix,
            groups=groups,
            interval_s=interval_s,
            connections=connections,
            credentials=credentials,
        )
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    plan = SilencePlan(silence, silence_after, silence_for or None)
    try:
        result = asyncio.run(
            run_simulation(config, duration_s=duration or None, silence=plan, report=console.print)
        )
    except ConnectionError as exc:
        err_console.print(f"[red]cannot reach the center:[/red] {exc}")
        raise typer.Exit(2) from None
    except (NoRespondersError, NatsTimeoutError):
        err_console.print(f"[red]no controller answered at {server}[/red] (is one running?)")
        raise typer.Exit(2) from None
    stats = result.stats
    console.print(
        f"done after {result.seconds:.0f} s: {stats.onboarded:,}/{stats.sites:,} onboarded, "
        f"{stats.beats_sent:,} heartbeats sent"
    )
    if result.onboarding.refused:
        raise typer.Exit(1)


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
    site: Annotated[
        str | None, typer.Option("--site", envvar="EDGEBUS_SITE", help="site id (token's if given)")
    ] = None,
    center: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEBUS_CENTER",
            help="with a token: the center's nats://HOST:PORT for onboarding (default: the "
            "token's); without: its leaf URL nats-leaf://HOST:PORT (development, no auth)",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="EDGEBUS_TOKEN", help="bootstrap token: onboard on first run"),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="read the bootstrap token from this file")
    ] = None,
    leaf_url: Annotated[
        str | None, typer.Option(help="override the leaf URL the center gave at onboarding")
    ] = None,
    onboard_timeout_s: Annotated[
        float, typer.Option(help="give up onboarding after this long (0: keep trying)")
    ] = 0.0,
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
    """Start this site's nats-server (leaf of the center) and its agent; supervise until Ctrl-C.

    Zero touch: `--token` (or `--token-file`) onboards on the first run and keeps the identity
    in the data dir; later runs need neither the token nor the center's URL.
    """
    from edge_agent.onboarding import OnboardingError
    from edgebus.site import SiteToolError, prepare_site_run, read_token, run_site

    try:
        config = prepare_site_run(
            site=site,
            center=center,
            token=read_token(token, token_file),
            data_dir=data_dir,
            leaf_url=leaf_url,
            onboard_timeout_s=onboard_timeout_s or None,
            console=console,
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
    except (SiteToolError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    except OnboardingError as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(3) from None
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


# -- sites (the controller's registry) -----------------------------------------------------

err_console = Console(stderr=True)
SiteArg = Annotated[str, typer.Argument(help="site id")]
TimeoutOption = Annotated[float, typer.Option(help="seconds to wait for the controller")]


def _sites_call(server: str, work: Callable[[Bus], Awaitable[T]], timeout: float) -> T:
    """Run one controller request against the center; failures exit with a clear message."""
    from edgebus.center import call_center
    from edgebus.sites import SitesCommandError

    return call_center(
        server, work, service="controller", command_error=SitesCommandError, timeout=timeout
    )


def _print_record(record: SiteRecord, as_json: bool) -> None:
    from edgebus.sites import site_detail

    if as_json:
        print_json(record.model_dump(mode="json"))
    else:
        console.print(site_detail(record, datetime.now(UTC)))


@sites_app.command("add")
def sites_add(
    sites: Annotated[list[str], typer.Argument(help="site ids")],
    group: Annotated[str, typer.Option(help="the sites' group")] = "default",
    label: Annotated[list[str] | None, typer.Option(help="k=v (repeat)")] = None,
    ttl: Annotated[str, typer.Option(help="token lifetime: 90s, 15m, 24h, 7d")] = "24h",
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Register sites and print one single-use bootstrap token per site."""
    from edgebus.sites import add_sites, parse_duration, parse_labels

    def work(bus: Bus) -> Awaitable[SitesAdded]:
        return add_sites(
            bus, sites, group=group, labels=parse_labels(label or []), ttl_s=parse_duration(ttl)
        )

    added = _sites_call(server, work, timeout)
    if as_json:
        print_json(added.model_dump(mode="json"))
    else:
        for site, token in added.tokens.items():
            typer.echo(f"{site}\t{token}")
        if added.tokens:
            err_console.print(f"tokens expire at {added.expires_at.isoformat()} (single use)")
        for site, reason in added.refused.items():
            err_console.print(f"[red]{site}: {reason}[/red]")
    if added.refused:
        raise typer.Exit(1)


@sites_app.command("list")
def sites_list(
    group: Annotated[str | None, typer.Option(help="only this group")] = None,
    state: Annotated[
        Availability | None, typer.Option(help="only this availability")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="k=v every site must have")] = None,
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Every site with its availability, last seen, version, devices and backlog."""
    from edgebus.config_cli import sync_column
    from edgebus.sites import list_sites, parse_labels, site_health, sites_table

    async def work(bus: Bus) -> tuple[list[SiteRecord], dict[str, str], dict[str, str]]:
        query = SitesQuery(
            group=group, availability=state, label_selector=parse_labels(label or [])
        )
        records = await list_sites(bus, query)
        sites = [r.site for r in records]
        return records, await sync_column(bus, sites), await site_health(bus, sites)

    records, sync, health = _sites_call(server, work, timeout)
    if as_json:
        print_json(
            [
                {
                    **r.model_dump(mode="json"),
                    "sync": sync.get(r.site),
                    "health": health.get(r.site),
                }
                for r in records
            ]
        )
    else:
        console.print(sites_table(records, datetime.now(UTC), {"sync": sync, "health": health}))


@sites_app.command("show")
def sites_show(
    site: SiteArg,
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """One site in full: availability and why, inventory, credentials."""
    from edgebus.sites import show_site

    record = _sites_call(server, lambda bus: show_site(bus, site), timeout)
    if record is None:
        err_console.print(f"[red]no site {site}[/red]")
        raise typer.Exit(1)
    _print_record(record, as_json)


def _change(server: str, as_json: bool, timeout: float, **fields: Any) -> None:
    from edgebus.sites import change_site, parse_labels

    def work(bus: Bus) -> Awaitable[SiteChanged]:
        if "set_labels" in fields:  # parsed here so bad input gets the same clean exit
            fields["set_labels"] = parse_labels(fields["set_labels"])
        return change_site(bus, SiteChange(**fields))

    changed = _sites_call(server, work, timeout)
    if changed.deleted:
        if as_json:
            print_json({"deleted": changed.record.site})
        else:
            console.print(f"deleted site {changed.record.site}")
        return
    _print_record(changed.record, as_json)


@sites_app.command("manage")
def sites_manage(
    site: SiteArg,
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Watch the site again: its offline alarm is raised (if it is offline)."""
    _change(server, as_json, timeout, site=site, managed=True)


@sites_app.command("unmanage")
def sites_unmanage(
    site: SiteArg,
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Stop alarming about the site (maintenance); availability is still tracked."""
    _change(server, as_json, timeout, site=site, managed=False)


@sites_app.command("delete")
def sites_delete(
    site: SiteArg,
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Remove the site and its token, and revoke its credentials."""
    _change(server, as_json, timeout, site=site, delete=True)


@sites_app.command("group")
def sites_group(
    site: SiteArg,
    group: Annotated[str, typer.Argument(help="the new group")],
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Move the site to another group."""
    _change(server, as_json, timeout, site=site, group=group)


@sites_app.command("label")
def sites_label(
    site: SiteArg,
    labels: Annotated[list[str] | None, typer.Argument(help="k=v to set")] = None,
    remove: Annotated[list[str] | None, typer.Option(help="label key to remove")] = None,
    server: ServerOption = "nats://127.0.0.1:4222",
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Set (k=v) and remove (--remove k) labels of a site."""
    _change(
        server, as_json, timeout, site=site, set_labels=labels or [], remove_labels=remove or []
    )


def main() -> None:
    app()
