"""`edgebus config ...` and `edgebus sync status`: operator requests to the sync service.

Values on the command line are JSON when they parse as JSON (`3`, `true`, `[1]`), else text.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bus import subjects
from bus.client import Bus
from schemas.sync import (
    ConfigGet,
    ConfigHistory,
    ConfigHistoryQuery,
    ConfigSet,
    ConfigSetResult,
    ConfigView,
    Scope,
    SyncState,
    SyncStatus,
    SyncStatusQuery,
    Target,
)

T = TypeVar("T")
SERVICE = "sync"

config_app = typer.Typer(help="Desired config: define once, sync to sites.", no_args_is_help=True)
sync_app = typer.Typer(help="Per-site config sync status.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

ServerOption = Annotated[
    str, typer.Option("--server", "-s", envvar="EDGEBUS_SERVER", help="center NATS URL")
]
CredsOption = Annotated[
    Path | None,
    typer.Option("--credentials", "--creds", envvar="EDGEBUS_CREDENTIALS", help="NATS creds file"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON document")]
GroupOption = Annotated[str | None, typer.Option("--group", "-g", help="target this group")]
SiteOption = Annotated[str | None, typer.Option("--site", help="target this site")]
LabelOption = Annotated[
    list[str] | None, typer.Option("--label", "-l", help="target sites with k=v (repeat)")
]
DEFAULT_SERVER = "nats://127.0.0.1:4222"


class ConfigCommandError(ValueError):
    """Bad command-line input."""


# -- plain functions (tested without servers) ------------------------------------------------


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """`["a=3", "b=warning", "c=[1,2]"]` -> `{"a": 3, "b": "warning", "c": [1, 2]}`."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigCommandError(f"expected KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return values


def target_from(group: str | None, site: str | None, labels: Sequence[str] | None) -> Target:
    chosen = [name for name, given in (("--group", group), ("--site", site)) if given]
    if labels:
        chosen.append("--label")
    if len(chosen) > 1:
        raise ConfigCommandError(f"choose one target, not {' and '.join(chosen)}")
    if group:
        return Target(scope=Scope.GROUP, name=group)
    if site:
        return Target(scope=Scope.SITE, name=site)
    if labels:
        pairs = {}
        for item in labels:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigCommandError(f"labels are k=v, got {item!r}")
            pairs[key] = value
        return Target(scope=Scope.LABELS, labels=pairs)
    return Target(scope=Scope.ALL)


def _show(value: Any) -> str:
    return "-" if value is None else json.dumps(value)


def diff_table(result: ConfigSetResult) -> Table:
    verb = "would change" if result.dry_run else "changed"
    title = (
        f"{result.kind} on {result.target.describe()}: {result.targeted} sites targeted, "
        f"{result.changed} {verb}" + (f" (rev {result.rev})" if result.rev else "")
    )
    table = Table(title=title)
    for column in ("site", "key", "before", "after"):
        table.add_column(column)
    for site_diff in result.diffs:
        for change in site_diff.changes:
            table.add_row(site_diff.site, change.key, _show(change.before), _show(change.after))
    if result.truncated:
        table.caption = f"showing {len(result.diffs)} of {result.changed} sites"
    return table


def view_table(view: ConfigView) -> Table:
    where = f" for site {view.site} (rev {view.rev})" if view.site else ""
    table = Table(title=f"{view.kind} layers{where}")
    for column in ("layer", "rev", "values", "by", "at"):
        table.add_column(column)
    for layer in view.layers:
        at = layer.updated_at.isoformat(timespec="seconds") if layer.updated_at else "-"
        values = json.dumps(layer.values, sort_keys=True)
        table.add_row(layer.target.describe(), str(layer.rev), values, layer.actor, at)
    if view.effective is not None:
        table.caption = "effective: " + json.dumps(view.effective, sort_keys=True)
    return table


def history_table(history: ConfigHistory) -> Table:
    table = Table(title="config changes")
    for column in ("rev", "at", "kind", "target", "set", "unset", "by", "sites changed"):
        table.add_column(column)
    for change in history.changes:
        table.add_row(
            str(change.rev),
            change.at.isoformat(timespec="seconds"),
            change.kind,
            change.target.describe(),
            json.dumps(change.values, sort_keys=True),
            ",".join(change.unset) or "-",
            change.actor,
            f"{change.changed_sites}/{change.targeted}",
        )
    return table


_STATE_STYLE = {
    SyncState.IN_SYNC: "green",
    SyncState.OUT_OF_SYNC: "yellow",
    SyncState.FAILED: "red",
    SyncState.UNKNOWN: "dim",
}


def status_table(status: SyncStatus) -> Table:
    totals = ", ".join(f"{n} {state}" for state, n in status.totals.items() if n)
    table = Table(title=f"config sync: {totals or 'no sites'}")
    for column in ("site", "kind", "state", "desired rev", "applied rev", "error"):
        table.add_column(column)
    for row in status.rows:
        style = _STATE_STYLE[row.state]
        table.add_row(
            row.site,
            row.kind,
            f"[{style}]{row.state}[/{style}]",
            str(row.desired_rev),
            "-" if row.applied_rev is None else str(row.applied_rev),
            row.error or "",
        )
    if status.truncated:
        table.caption = "truncated: narrow with --site or --state"
    return table


# -- requests ---------------------------------------------------------------------------------


async def set_config(bus: Bus, change: ConfigSet, timeout: float = 30.0) -> ConfigSetResult:
    answer = await bus.request(
        subjects.control(SERVICE, "set"), change, ConfigSetResult, timeout=timeout
    )
    return answer.data


async def get_config(bus: Bus, query: ConfigGet) -> ConfigView:
    return (await bus.request(subjects.control(SERVICE, "get"), query, ConfigView)).data


async def config_history(bus: Bus, query: ConfigHistoryQuery) -> ConfigHistory:
    answer = await bus.request(subjects.control(SERVICE, "history"), query, ConfigHistory)
    return answer.data


async def sync_status(bus: Bus, query: SyncStatusQuery, timeout: float = 10.0) -> SyncStatus:
    answer = await bus.request(
        subjects.control(SERVICE, "status"), query, SyncStatus, timeout=timeout
    )
    return answer.data


async def sync_column(bus: Bus, sites: Sequence[str], timeout: float = 2.0) -> dict[str, str]:
    """Each site's sync state for `sites list`; {} if no sync service answers in time."""
    if not sites:
        return {}
    try:
        status = await sync_status(
            bus, SyncStatusQuery(sites=list(sites)[:5000], limit=5000), timeout=timeout
        )
    except Exception:  # no sync service: the column shows "?", the list still works
        return {}
    return {site: state.value for site, state in status.sites.items()}


def _call(server: str, creds: Path | None, work: Callable[[Bus], Awaitable[T]]) -> T:
    """One request to the sync service; failures exit with a clear message."""
    from edgebus.center import call_center

    return call_center(
        server, work, service="sync service", command_error=ConfigCommandError, credentials=creds
    )


def _print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


def _change(
    kind: str,
    assignments: Sequence[str],
    unset: Sequence[str],
    group: str | None,
    site: str | None,
    label: Sequence[str] | None,
    *,
    dry_run: bool,
) -> ConfigSet:
    try:
        return ConfigSet(
            kind=kind,
            target=target_from(group, site, label),
            values=parse_assignments(assignments),
            unset=list(unset),
            dry_run=dry_run,
            actor="cli",
        )
    except ConfigCommandError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


# -- commands ---------------------------------------------------------------------------------


@config_app.command("set")
def config_set(
    kind: Annotated[str, typer.Argument(help="config kind, e.g. ingest, replay, log")],
    assignments: Annotated[list[str], typer.Argument(help="KEY=VALUE ...")],
    group: GroupOption = None,
    site: SiteOption = None,
    label: LabelOption = None,
    server: ServerOption = DEFAULT_SERVER,
    creds: CredsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set keys on one layer (all sites by default) and sync every site it changes."""
    change = _change(kind, assignments, [], group, site, label, dry_run=False)
    result = _call(server, creds, lambda bus: set_config(bus, change))
    _print_json(result.model_dump(mode="json")) if as_json else console.print(diff_table(result))


@config_app.command("unset")
def config_unset(
    kind: Annotated[str, typer.Argument(help="config kind")],
    keys: Annotated[list[str], typer.Argument(help="KEY ...")],
    group: GroupOption = None,
    site: SiteOption = None,
    label: LabelOption = None,
    server: ServerOption = DEFAULT_SERVER,
    creds: CredsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove keys from one layer (the next layer down, or the default, applies again)."""
    change = _change(kind, [], keys, group, site, label, dry_run=False)
    result = _call(server, creds, lambda bus: set_config(bus, change))
    _print_json(result.model_dump(mode="json")) if as_json else console.print(diff_table(result))


@config_app.command("diff")
def config_diff(
    kind: Annotated[str, typer.Argument(help="config kind")],
    assignments: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE ...")] = None,
    unset: Annotated[list[str] | None, typer.Option(help="KEY to remove (repeat)")] = None,
    group: GroupOption = None,
    site: SiteOption = None,
    label: LabelOption = None,
    limit: Annotated[int, typer.Option(help="most sites to detail")] = 100,
    server: ServerOption = DEFAULT_SERVER,
    creds: CredsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Preview a change: which sites it would change and how, key by key; nothing is sent."""
    change = _change(kind, assignments or [], unset or [], group, site, label, dry_run=True)
    change = change.model_copy(update={"max_diffs": limit})
    result = _call(server, creds, lambda bus: set_config(bus, change))
    _print_json(result.model_dump(mode="json")) if as_json else console.print(diff_table(result))


@config_app.command("get")
def config_get(
    kind: Annotated[str, typer.Argument(help="config kind")],
    site: Annotated[str | None, typer.Option(help="the layers that apply to this site")] = None,
    effective: Annotated[
        bool, typer.Option("--effective", help="only the merged config (needs --site)")
    ] = False,
    server: ServerOption = DEFAULT_SERVER,
    creds: CredsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Layers of a kind; with --site, those applying to it and the merged result."""
    if effective and site is None:
        err_console.print("[red]--effective needs --site[/red]")
        raise typer.Exit(2)
    view = _call(server, creds, lambda bus: get_config(bus, ConfigGet(kind=kind, site=site)))
    if effective:
        _print_json(view.effective)
    elif as_json:
        _print_json(view.model_dump(mode="json"))
    else:
        console.print(view_table(view))


@config_app.command("history")
def config_history_cmd(
    kind: Annotated[str | None, typer.Option(help="only this kind")] = None,
    limit: Annotated[int, typer.Option(help="the most recent N changes")] = 50,
    server: ServerOption = DEFAULT_SERVER,
    creds: CredsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Accepted config changes, oldest first, with who made them and how many sites changed."""
    query = ConfigHistoryQuery(kind=kind, limit=limit)
    history = _call(server, creds, lambda bus: config_history(bus, query))
    if as_json:
        _print_json(history.model_dump(mode="json"))
    else:
        console.print(history_table(history))


@sync_app.command("status")
def sync_status_cmd(
    site: Annotated[list[str] | None, typer.Option(help="only these sites (repeat)")] = None,
    state: Annotated[SyncState | None, typer.Option(help="only rows in this state")] = None,
    limit: Annotated[int, typer.Option(help="most rows")] = 1000,
    server: ServerOption = DEFAULT_SERVER,
    creds: CredsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per site and kind: in-sync / out-of-sync / failed / unknown, with revisions."""
    query = SyncStatusQuery(sites=site or None, state=state, limit=limit)
    status = _call(server, creds, lambda bus: sync_status(bus, query))
    if as_json:
        _print_json(status.model_dump(mode="json"))
    else:
        console.print(status_table(status))
