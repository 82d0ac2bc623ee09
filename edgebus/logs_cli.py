"""`edgebus logs`: the sites' own log records (warning and above, unless configured otherwise)
as the center holds them; a table, or JSON lines with `--json`."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edgebus.logs import (
    CaughtUp,
    LogQuery,
    ShippedLog,
    Unreadable,
    log_json,
    log_line,
    logs_table,
    parse_level,
    parse_since,
    read_logs,
)

logs_app = typer.Typer(
    help="The sites' own log records, as the center holds them.", subcommand_metavar=""
)
console = Console()
err_console = Console(stderr=True)


@logs_app.callback(invoke_without_command=True)
def logs(
    site: Annotated[
        str | None, typer.Option("--site", help="only this site (default: all)")
    ] = None,
    since: Annotated[
        str, typer.Option(help="logged in the last 90s, 10m, 1h, 2d... or since an ISO time")
    ] = "1h",
    level: Annotated[str, typer.Option(help="this level and above (debug...critical)")] = "debug",
    limit: Annotated[int, typer.Option(min=0, help="print at most the latest N (0: all)")] = 1000,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="then print new ones")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    server: Annotated[
        str, typer.Option("--server", "-s", envvar="EDGEBUS_SERVER", help="center NATS URL")
    ] = "nats://127.0.0.1:4222",
    credentials: Annotated[
        Path | None,
        typer.Option(envvar="EDGEBUS_CREDENTIALS", help="NATS credentials file for the center"),
    ] = None,
) -> None:
    """Log records sites shipped to the center, oldest first, with the time each was logged."""
    try:
        query = LogQuery(
            since=parse_since(since, datetime.now(UTC)), site=site, level=parse_level(level)
        )
        query.filters()  # a bad site id fails here, before any connection
    except ValueError as exc:  # LogsCommandError, or a site id that is not one
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    try:
        asyncio.run(_run(query, server, credentials, limit, follow, as_json))
    except ConnectionError as exc:
        err_console.print(f"[red]cannot reach the center:[/red] {exc}")
        raise typer.Exit(2) from None
    except LookupError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass


async def _run(
    query: LogQuery,
    server: str,
    credentials: Path | None,
    limit: int,
    follow: bool,
    as_json: bool,
) -> None:
    from nats.js.errors import NotFoundError

    from edgebus.center import connect_center

    bus = await connect_center(server, name="edgebus-logs", credentials=credentials)
    backlog: deque[ShippedLog] = deque(maxlen=limit or None)
    matched = 0
    caught_up = False
    try:
        async for item in read_logs(bus.js, query, follow=follow):
            if isinstance(item, Unreadable):
                err_console.print(f"[red]unreadable record #{item.seq}:[/red] {item.error}")
            elif isinstance(item, CaughtUp):
                caught_up = True
                _print_backlog(list(backlog), matched, as_json, follow)
                backlog.clear()
            elif caught_up:  # following: print each as it arrives
                _print(item, as_json)
            else:
                matched += 1
                backlog.append(item)
    except NotFoundError:
        raise LookupError("no log stream (UP_LOG) at the center: is this a center?") from None
    finally:
        await bus.close()


def _print(item: ShippedLog, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(log_json(item), sort_keys=True, ensure_ascii=False))
    else:
        console.print(log_line(item), highlight=False, soft_wrap=True)


def _print_backlog(items: list[ShippedLog], matched: int, as_json: bool, follow: bool) -> None:
    if as_json or follow:
        for item in items:
            _print(item, as_json)
        return
    title = f"{len(items)} record(s)"
    if matched > len(items):
        title += f", the latest of {matched} (--limit)"
    console.print(logs_table(items, title))
