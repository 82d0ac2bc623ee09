"""`edgebus sites ...`: operator requests to the controller, and how their answers print.

Requests go through `Bus.request`; rendering is plain functions over `SiteRecord`s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.table import Table

from bus import subjects
from bus.client import Bus
from schemas.controller import (
    MAX_BATCH,
    Availability,
    SiteChange,
    SiteChanged,
    SiteRecord,
    SitesAdd,
    SitesAdded,
    SitesList,
    SitesQuery,
)

SERVICE = "controller"
ADD_CHUNK = MAX_BATCH  # sites per request (the reply carries one ~2 KB token per site)
REQUEST_TIMEOUT_S = 30.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class SitesCommandError(ValueError):
    """Bad command-line input (label syntax, duration...)."""


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `7d`, `2w` -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise SitesCommandError(f"not a duration: {text!r} (examples: 90s, 15m, 24h, 7d)")
    return float(match[1]) * _UNIT_S[match[2]]


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """`["k=v", ...]` -> `{"k": "v"}`; a value may contain `=`."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SitesCommandError(f"labels are key=value, got {item!r}")
        labels[key.strip()] = value.strip()
    return labels


# -- requests ------------------------------------------------------------------------------


def _subject(*op: str) -> str:
    return subjects.control(SERVICE, *op)


async def add_sites(
    bus: Bus, sites: Sequence[str], *, group: str, labels: dict[str, str], ttl_s: float
) -> SitesAdded:
    """Register sites and mint their tokens, in chunks; one merged answer."""
    tokens: dict[str, str] = {}
    refused: dict[str, str] = {}
    expires_at: datetime | None = None
    unique = list(dict.fromkeys(sites))
    for start in range(0, len(unique), ADD_CHUNK):
        chunk = unique[start : start + ADD_CHUNK]
        answer = await bus.request(
            _subject("sites", "add"),
            SitesAdd(sites=chunk, group=group, labels=labels, token_ttl_s=ttl_s),
            SitesAdded,
            timeout=REQUEST_TIMEOUT_S,
        )
        tokens.update(answer.data.tokens)
        refused.update(answer.data.refused)
        expires_at = answer.data.expires_at
    assert expires_at is not None
    return SitesAdded(tokens=tokens, expires_at=expires_at, refused=refused)


async def list_sites(bus: Bus, query: SitesQuery) -> list[SiteRecord]:
    """Every record the query selects, page after page."""
    found: list[SiteRecord] = []
    after: str | None = None
    while True:
        answer = await bus.request(
            _subject("sites", "query"),
            query.model_copy(update={"after": after}),
            SitesList,
            timeout=REQUEST_TIMEOUT_S,
        )
        found += answer.data.sites
        after = answer.data.next_after
        if after is None:
            return found


async def show_site(bus: Bus, site: str) -> SiteRecord | None:
    records = await list_sites(bus, SitesQuery(site=site, limit=1))
    return records[0] if records else None


async def change_site(bus: Bus, change: SiteChange) -> SiteChanged:
    answer = await bus.request(
        _subject("sites", "change"), change, SiteChanged, timeout=REQUEST_TIMEOUT_S
    )
    return answer.data


async def site_health(bus: Bus, sites: Sequence[str], timeout: float = 1.0) -> dict[str, str]:
    """Each site's alarm health (critical / degraded / ok) for `sites list`, from the alarms
    service; {} (the column shows "?") if it does not answer within `timeout`."""
    from schemas.alarms import AlarmsSummary, AlarmsSummaryQuery

    if not sites:
        return {}
    try:
        answer = await bus.request(
            subjects.alarms_control("summary"),
            AlarmsSummaryQuery(limit=0),  # every site that is not ok, nothing else
            AlarmsSummary,
            timeout=timeout,
        )
    except Exception:  # no alarms service: the list still works
        return {}
    unhealthy = answer.data.health
    return {site: unhealthy[site].value if site in unhealthy else "ok" for site in sites}


# -- rendering -------------------------------------------------------------------------------


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, (now - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def site_row(record: SiteRecord, now: datetime) -> dict[str, Any]:
    """One line of `sites list`; columns for sync, alarms and updates land with their issues."""
    inventory = record.inventory
    return {
        "site": record.site,
        "group": record.group,
        "availability": record.availability.value,
        "managed": record.managed,
        "last_seen": ago(record.last_seen, now),
        "version": inventory.agent_version if inventory else "-",
        "devices": inventory.device_count if inventory else "-",
        "backlog": inventory.replay_backlog if inventory else "-",
        "labels": ",".join(f"{k}={v}" for k, v in sorted(record.labels.items())),
    }


_STATE_STYLE = {
    Availability.ONLINE: "green",
    Availability.DEGRADED: "yellow",
    Availability.OFFLINE: "red",
    Availability.PENDING: "dim",
}


def sites_table(
    records: Sequence[SiteRecord],
    now: datetime,
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> Table:
    """One row per site; `extra` adds columns other services answer for (name -> site ->
    text, e.g. config sync state), "?" where a site has no value."""
    extra = extra or {}
    table = Table(title=f"{len(records)} site(s)")
    columns = ("site", "group", "availability", "managed", "last seen", "version", "devices")
    for column in (*columns, "backlog", *extra, "labels"):
        table.add_column(column, no_wrap=column in ("site", "availability"))
    for record in records:
        row = site_row(record, now)
        style = _STATE_STYLE.get(record.availability, "")
        table.add_row(
            row["site"],
            row["group"],
            f"[{style}]{row['availability']}[/{style}]" if style else row["availability"],
            "yes" if row["managed"] else "no",
            row["last_seen"],
            str(row["version"]),
            str(row["devices"]),
            str(row["backlog"]),
            *(values.get(record.site, "?") for values in extra.values()),
            row["labels"],
        )
    return table


def site_detail(record: SiteRecord, now: datetime) -> Table:
    table = Table(title=f"site {record.site}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    since = record.availability_since
    table.add_row(
        "availability",
        f"{record.availability.value} (since {ago(since, now)}: {record.availability_reason})"
        if since
        else record.availability.value,
    )
    table.add_row("managed", "yes" if record.managed else "no")
    table.add_row("group", record.group)
    table.add_row("labels", ", ".join(f"{k}={v}" for k, v in sorted(record.labels.items())))
    table.add_row("added", record.added_at.isoformat())
    table.add_row("onboarded", record.onboarded_at.isoformat() if record.onboarded_at else "no")
    table.add_row("last seen", ago(record.last_seen, now))
    table.add_row("credentials", record.user_public_key or "-")
    inventory = record.inventory
    if inventory is not None:
        cap, load = inventory.capacity, inventory.load
        table.add_row("version", inventory.agent_version)
        table.add_row(
            "capacity",
            f"{cap.cores} cores, {cap.memory_bytes / 2**30:.1f} GiB memory, "
            f"{cap.disk_bytes / 2**30:.1f} GiB disk",
        )
        table.add_row("load", f"cpu {load.cpu_percent:.0f}%, load1 {load.load1:.2f}")
        table.add_row("devices", str(inventory.device_count))
        oldest_s = inventory.replay_oldest_unsent_age_s
        table.add_row(
            "replay backlog", f"{inventory.replay_backlog} events (oldest {oldest_s:.0f}s)"
        )
        table.add_row("functions", str(inventory.function_count))
    return table
