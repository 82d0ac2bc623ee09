"""`edgebus alarms ...`: the fleet's open alarms, per-site summary, history and acknowledgement.

Requests go to the alarms service (`ctl.alarms.<op>`); rendering is plain functions over replies.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from schemas.alarms import (
    AlarmHistoryEntry,
    AlarmRecord,
    AlarmsStats,
    AlarmsSummary,
    Severity,
    SiteHealth,
)
from schemas.envelope import EventData

if TYPE_CHECKING:
    from bus.client import Bus

T = TypeVar("T")
R = TypeVar("R", bound=EventData)

app = typer.Typer(
    help="Alarms of the whole fleet: open alarms, per-site summary, history, acknowledge.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

ServerOption = Annotated[
    str, typer.Option("--server", "-s", envvar="EDGEBUS_SERVER", help="center NATS URL")
]
CredentialsOption = Annotated[
    Path | None,
    typer.Option("--credentials", envvar="EDGEBUS_CREDENTIALS", help="NATS creds file"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON document")]
TimeoutOption = Annotated[float, typer.Option(help="seconds to wait for the alarms service")]
SiteOption = Annotated[str | None, typer.Option("--site", help="only this site")]
SeverityOption = Annotated[Severity | None, typer.Option("--severity", help="only this severity")]

SEVERITY_STYLE = {
    Severity.CRITICAL: "bold red",
    Severity.MAJOR: "red",
    Severity.MINOR: "yellow",
    Severity.WARNING: "cyan",
}
HEALTH_STYLE = {
    SiteHealth.CRITICAL: "bold red",
    SiteHealth.DEGRADED: "yellow",
    SiteHealth.OK: "green",
}


class AlarmsCommandError(ValueError):
    """Bad command-line input (a time that is neither a duration nor a timestamp...)."""


def parse_since(text: str, now: datetime) -> datetime:
    """`90s`, `15m`, `1h`, `7d` ago, or an ISO 8601 timestamp (UTC if it names no zone)."""
    from edgebus.sites import SitesCommandError, parse_duration

    try:
        return now - timedelta(seconds=parse_duration(text))
    except SitesCommandError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise AlarmsCommandError(
            f"not a duration nor a timestamp: {text!r} (examples: 15m, 1h, 2026-01-31T08:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


def _call(
    server: str, credentials: Path | None, work: Callable[[Bus], Awaitable[T]], timeout: float
) -> T:
    """Run one alarms request against the center; failures exit with a clear message."""
    from edgebus.center import call_center

    return call_center(
        server,
        work,
        service="alarms service",
        command_error=AlarmsCommandError,
        credentials=credentials,
        timeout=timeout,
        name="edgebus-alarms-cli",
    )


async def _request(bus: Bus, op: str, data: EventData, reply: type[R], timeout: float) -> R:
    from bus import subjects

    answer = await bus.request(subjects.alarms_control(op), data, reply, timeout=timeout)
    return answer.data


# -- rendering -------------------------------------------------------------------------------


def _ago(moment: datetime | None, now: datetime) -> str:
    from edgebus.sites import ago

    return ago(moment, now)


def _styled(text: str, style: str) -> str:
    return f"[{style}]{text}[/{style}]" if style else text


def alarms_table(records: Sequence[AlarmRecord], total: int, now: datetime) -> Table:
    shown = f"{len(records)} of {total}" if total > len(records) else str(total)
    table = Table(title=f"{shown} alarm(s)")
    for column in ("severity", "alarm", "state", "raised", "ack", "text"):
        table.add_column(column, no_wrap=column in ("severity", "alarm"))
    for record in records:
        state = record.state.value + (" FLAPPING" if record.flapping else "")
        if record.flapping:
            state += f" ({record.suppressed} changes summarised)"
        ack = record.acknowledged_by or "-"
        table.add_row(
            _styled(record.severity.value, SEVERITY_STYLE[record.severity]),
            record.alarm_id,
            state,
            _ago(record.raised_at, now),
            ack,
            record.text if record.state.value == "active" else record.clear_text or record.text,
        )
    return table


def summary_table(summary: AlarmsSummary) -> Table:
    totals = ", ".join(f"{k} {v}" for k, v in summary.totals.items())
    table = Table(title=f"open alarms: {totals or 'none'}")
    columns = ("site", "health", "critical", "major", "minor", "warning", "flapping", "unack")
    for column in columns:
        table.add_column(column, no_wrap=column in ("site", "health"))
    for site in summary.sites:
        table.add_row(
            site.site,
            _styled(site.health.value, HEALTH_STYLE[site.health]),
            str(site.critical),
            str(site.major),
            str(site.minor),
            str(site.warning),
            str(site.flapping),
            str(site.unacknowledged),
        )
    return table


def replicas_table(replicas: Sequence[AlarmsStats]) -> Table:
    """One row a replica: the partitions it leads and what its leaders did so far."""
    table = Table(title=f"{len(replicas)} alarms replica(s)")
    for column in ("replica", "leads", "records", "consumed", "applied", "kv writes", "terms"):
        table.add_column(column, no_wrap=column == "replica")
    for stats in sorted(replicas, key=lambda s: (s.partitions or [1 << 30], s.replica)):
        counters = stats.counters
        table.add_row(
            stats.replica,
            ", ".join(f"p{p}" for p in stats.partitions) or "-",
            str(stats.records),
            str(counters.get("consumed", 0)),
            str(counters.get("applied", 0)),
            str(counters.get("kv_writes", 0)),
            str(counters.get("leaderships", 0)),
        )
    return table


def history_table(entries: Sequence[AlarmHistoryEntry], truncated: bool) -> Table:
    more = " (more matched: narrow the query or raise --limit)" if truncated else ""
    table = Table(title=f"{len(entries)} history entries{more}")
    for column in ("at", "kind", "severity", "alarm", "text"):
        table.add_column(column, no_wrap=column in ("at", "kind"))
    for entry in entries:
        severity = entry.severity.value if entry.severity else "-"
        style = SEVERITY_STYLE.get(entry.severity, "") if entry.severity else ""
        text = entry.text + (f" (by {entry.by})" if entry.by else "")
        late = ""
        if entry.received_at is not None and (entry.received_at - entry.at).total_seconds() > 60:
            late = f" [dim](arrived {entry.received_at.isoformat(timespec='seconds')})[/dim]"
        table.add_row(
            entry.at.isoformat(timespec="seconds"),
            entry.kind.value,
            _styled(severity, style),
            entry.alarm_id or entry.site,
            text + late,
        )
    return table


# -- commands --------------------------------------------------------------------------------


@app.command("list")
def alarms_list(
    site: SiteOption = None,
    severity: SeverityOption = None,
    include_cleared: Annotated[
        bool, typer.Option("--all", help="also alarms that cleared (kept for a while)")
    ] = False,
    limit: Annotated[int, typer.Option(help="at most this many")] = 200,
    server: ServerOption = "nats://127.0.0.1:4222",
    credentials: CredentialsOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Open alarms of the fleet (active or flapping), worst first."""
    from schemas.alarms import AlarmsList, AlarmsQuery

    def work(bus: Bus) -> Awaitable[AlarmsList]:
        query = AlarmsQuery(
            site=site, severity=severity, include_cleared=include_cleared, limit=limit
        )
        return _request(bus, "list", query, AlarmsList, timeout)

    listed = _call(server, credentials, work, timeout)
    if as_json:
        print_json([record.model_dump(mode="json") for record in listed.alarms])
    else:
        console.print(alarms_table(listed.alarms, listed.total, datetime.now(UTC)))


@app.command("summary")
def alarms_summary(
    limit: Annotated[int, typer.Option(help="sites listed, worst first")] = 100,
    server: ServerOption = "nats://127.0.0.1:4222",
    credentials: CredentialsOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Open alarms per site by severity, and each site's health (critical / degraded / ok)."""
    from schemas.alarms import AlarmsSummaryQuery

    def work(bus: Bus) -> Awaitable[AlarmsSummary]:
        return _request(bus, "summary", AlarmsSummaryQuery(limit=limit), AlarmsSummary, timeout)

    summary = _call(server, credentials, work, timeout)
    if as_json:
        print_json(summary.model_dump(mode="json"))
    else:
        console.print(summary_table(summary))


@app.command("history")
def alarms_history(
    since: Annotated[str, typer.Option(help="how far back: 15m, 1h, 7d, or a timestamp")] = "1h",
    until: Annotated[str | None, typer.Option(help="up to: a duration ago or a timestamp")] = None,
    site: SiteOption = None,
    severity: SeverityOption = None,
    limit: Annotated[int, typer.Option(help="at most this many, oldest first")] = 200,
    server: ServerOption = "nats://127.0.0.1:4222",
    credentials: CredentialsOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Raises, clears, acknowledgements and storm summaries, at their original times."""
    from schemas.alarms import AlarmHistory, AlarmHistoryQuery

    def work(bus: Bus) -> Awaitable[AlarmHistory]:
        now = datetime.now(UTC)
        query = AlarmHistoryQuery(
            site=site,
            severity=severity,
            since=parse_since(since, now),
            until=parse_since(until, now) if until else None,
            limit=limit,
        )
        return _request(bus, "history", query, AlarmHistory, timeout)

    history = _call(server, credentials, work, timeout)
    if as_json:
        print_json(history.model_dump(mode="json"))
    else:
        console.print(history_table(history.entries, history.truncated))


@app.command("ack")
def alarms_ack(
    alarm_id: Annotated[str, typer.Argument(help="the alarm id, e.g. s001/pump-1/overheat")],
    by: Annotated[str, typer.Option(envvar="USER", help="who acknowledges")] = "operator",
    note: Annotated[str, typer.Option(help="why, what is being done")] = "",
    server: ServerOption = "nats://127.0.0.1:4222",
    credentials: CredentialsOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Acknowledge the current occurrence of an alarm (it stays open until it clears)."""
    from schemas.alarms import AlarmAck, AlarmAckReply

    def work(bus: Bus) -> Awaitable[AlarmAckReply]:
        return _request(
            bus, "ack", AlarmAck(alarm_id=alarm_id, by=by, note=note), AlarmAckReply, timeout
        )

    reply = _call(server, credentials, work, timeout)
    if as_json:
        print_json(reply.model_dump(mode="json"))
    elif reply.accepted:
        console.print(f"acknowledged {alarm_id}" + (f" ({reply.reason})" if reply.reason else ""))
    else:
        err_console.print(f"[red]{reply.reason}[/red]")
    if not reply.accepted:
        raise typer.Exit(1)


@app.command("replicas")
def alarms_replicas(
    wait: Annotated[float, typer.Option(help="seconds to gather the replicas' answers")] = 1.0,
    server: ServerOption = "nats://127.0.0.1:4222",
    credentials: CredentialsOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Every alarms-service replica: the partitions it leads, and its leaders' counters."""
    from bus import subjects
    from schemas.alarms import AlarmsStatsQuery

    async def work(bus: Bus) -> list[AlarmsStats]:
        answers = await bus.request_all(
            subjects.alarms_control("stats"), AlarmsStatsQuery(), AlarmsStats, wait_s=wait
        )
        return [answer.data for answer in answers]

    replicas = _call(server, credentials, work, timeout)
    if as_json:
        print_json([r.model_dump(mode="json") for r in replicas])
    else:
        console.print(replicas_table(replicas))
    if not replicas:
        err_console.print("[red]no alarms replica answered[/red]")
        raise typer.Exit(1)
