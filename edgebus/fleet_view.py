"""The demo's live fleet table: what the center knows about each site, read once per refresh.

`FleetCollector.collect` gathers plain data from the center; `fleet_view` renders it (pure).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.js.errors import NotFoundError
from rich import box
from rich.console import Group, JustifyMethod
from rich.table import Table
from rich.text import Text

from bus import subjects
from bus.client import Bus
from bus.streams import center_alarm_stream, dead_letter_stream, uplink_stream
from edgebus.config_cli import sync_status
from edgebus.sites import ago, list_sites
from schemas.alarms import AlarmRaised
from schemas.controller import Availability, SiteRecord, SitesQuery
from schemas.sync import SyncStatusQuery

READINGS = uplink_stream("reading").name
SITE_ALARMS = uplink_stream("alarm").name
CENTER_ALARMS = center_alarm_stream().name
DEAD_LETTERS = dead_letter_stream(subjects.CENTER).name
# Keeps a fleet of thousands of virtual sites from turning each refresh into thousands of reads.
MAX_ALARM_SUBJECTS = 500


@dataclass(frozen=True)
class FleetSnapshot:
    """One refresh: the controller's registry plus per-site counts from the center's streams."""

    records: tuple[SiteRecord, ...] = ()
    readings: Mapping[str, int] = field(default_factory=dict)  # site -> stored in UP_READING
    active_alarms: Mapping[str, int] = field(default_factory=dict)  # site -> raised, not cleared
    streams: Mapping[str, int] = field(default_factory=dict)  # center stream -> messages
    errors: tuple[str, ...] = ()
    sync: Mapping[str, str] = field(default_factory=dict)  # site -> config sync state
    sync_totals: Mapping[str, int] = field(default_factory=dict)  # state -> sites

    @property
    def dead_letters(self) -> int:
        return self.streams.get(DEAD_LETTERS, 0)

    def record(self, site: str) -> SiteRecord | None:
        return next((r for r in self.records if r.site == site), None)


def _site_of(subject: str) -> str | None:
    """The site token of `up.<site>.…` or `center.alarm.<site>`."""
    parsed = subjects.parse_up(subject)
    if parsed is not None:
        return parsed[0]
    parts = subject.split(".")
    return parts[2] if len(parts) == 3 and parts[:2] == ["center", "alarm"] else None


def per_site(subject_counts: Mapping[str, int]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for subject, count in subject_counts.items():
        site = _site_of(subject)
        if site is not None:
            totals[site] += count
    return dict(totals)


class FleetCollector:
    """Reads the center for the table; remembers each alarm subject's last state, so an
    alarm subject is read again only when new messages arrived on it."""

    def __init__(self, bus: Bus, sites: Sequence[str] = ()) -> None:
        self.bus = bus
        self.sites = list(sites)  # whose config sync state to show one by one
        self._alarm_state: dict[tuple[str, str], tuple[int, bool]] = {}  # -> (count, raised)

    async def collect(self) -> FleetSnapshot:
        errors: list[str] = []
        records: list[SiteRecord] = []
        try:
            records = await list_sites(self.bus, SitesQuery())
        except Exception as exc:  # the controller may be starting or restarting: show it
            errors.append(f"controller: {type(exc).__name__} {exc}".strip())
        streams: dict[str, int] = {}
        try:
            for info in await self.bus.js.streams_info():
                if info.config.name is not None:
                    streams[info.config.name] = info.state.messages
        except Exception as exc:
            errors.append(f"streams: {type(exc).__name__} {exc}".strip())
        readings = per_site(await self._subjects(READINGS, "up.*.reading.>", errors))
        alarms: Counter[str] = Counter()
        for stream, pattern in ((SITE_ALARMS, "up.*.alarm.>"), (CENTER_ALARMS, "center.alarm.>")):
            counts = await self._subjects(stream, pattern, errors)
            for subject in sorted(counts)[:MAX_ALARM_SUBJECTS]:
                site = _site_of(subject)
                if site is not None and await self._raised(stream, subject, counts[subject]):
                    alarms[site] += 1
        sync: dict[str, str] = {}
        sync_totals: dict[str, int] = {}
        try:
            query = SyncStatusQuery(sites=self.sites, limit=max(1, len(self.sites)))
            status = await sync_status(self.bus, query, timeout=1.0)
            sync = {site: state.value for site, state in status.sites.items()}
            sync_totals = dict(status.totals)
        except Exception as exc:
            errors.append(f"sync: {type(exc).__name__} {exc}".strip())
        return FleetSnapshot(
            tuple(records), readings, dict(alarms), streams, tuple(errors), sync, sync_totals
        )

    async def _subjects(self, stream: str, pattern: str, errors: list[str]) -> dict[str, int]:
        try:
            info = await self.bus.js.stream_info(stream, subjects_filter=pattern)
        except NotFoundError:
            return {}
        except Exception as exc:
            errors.append(f"{stream}: {type(exc).__name__} {exc}".strip())
            return {}
        return dict(info.state.subjects or {})

    async def _raised(self, stream: str, subject: str, count: int) -> bool:
        """Whether the newest alarm event on `subject` is a raise (not a clear)."""
        key = (stream, subject)
        cached = self._alarm_state.get(key)
        if cached is not None and cached[0] == count:
            return cached[1]
        try:
            msg = await self.bus.js.get_last_msg(stream, subject)
            raised = bool(json.loads(msg.data or b"{}").get("type") == AlarmRaised.event_type)
        except Exception:
            return cached[1] if cached else False
        self._alarm_state[key] = (count, raised)
        return raised


# -- rendering (pure) --------------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("site", "left"),
    ("availability", "left"),
    ("last\nseen", "right"),
    ("version", "left"),
    ("devices", "right"),
    ("replay\nbacklog", "right"),
    ("sent by\ndevices", "right"),
    ("readings\nat center", "right"),
    ("per\nsecond", "right"),
    ("active\nalarms", "right"),
)
_STYLE = {
    Availability.ONLINE: "green",
    Availability.DEGRADED: "yellow",
    Availability.OFFLINE: "red",
    Availability.PENDING: "dim",
}


@dataclass(frozen=True)
class ViewContext:
    """What the table needs besides the snapshot."""

    real_sites: Sequence[str]
    now: datetime
    elapsed_s: float
    center_url: str
    devices_sent: Mapping[str, int] = field(default_factory=dict)
    reading_rates: Mapping[str, float] = field(default_factory=dict)  # per second
    status_line: str = ""


def _availability(record: SiteRecord | None) -> Text:
    if record is None:
        return Text("not added", style="dim")
    style = _STYLE.get(record.availability, "")
    return Text(record.availability.value, style=style)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _site_row(site: str, snapshot: FleetSnapshot, context: ViewContext) -> list[Any]:
    record = snapshot.record(site)
    inventory = record.inventory if record else None
    readings = snapshot.readings.get(site, 0)
    rate = context.reading_rates.get(site)
    alarms = snapshot.active_alarms.get(site, 0)
    return [
        site,
        _availability(record),
        ago(record.last_seen, context.now).removesuffix(" ago") if record else "-",
        inventory.agent_version if inventory else "-",
        _count(inventory.device_count) if inventory else "-",
        _count(inventory.replay_backlog) if inventory else "-",
        _count(context.devices_sent.get(site)),
        f"{readings:,}",
        "-" if rate is None else f"{rate:.0f}",
        Text(str(alarms), style="red bold") if alarms else "0",
    ]


def _virtual_line(records: Sequence[SiteRecord], snapshot: FleetSnapshot) -> Text:
    """The simulator's virtual sites, summed up in one line (there may be thousands)."""
    states = Counter(r.availability for r in records)
    line = Text(f"{len(records):,} virtual sites (simulator): ")
    order = (Availability.ONLINE, Availability.DEGRADED, Availability.OFFLINE, Availability.PENDING)
    parts = [Text(f"{states[a]:,} {a.value}", style=_STYLE[a]) for a in order if states[a]]
    line.append_text(Text(", ").join(parts))
    alarms = sum(snapshot.active_alarms.get(r.site, 0) for r in records)
    line.append(f"; {alarms:,} active alarms", style="red bold" if alarms else "")
    return line


_SYNC_STYLE = {"in-sync": "green", "out-of-sync": "yellow", "failed": "red bold", "unknown": "dim"}


def _sync_line(snapshot: FleetSnapshot) -> Text:
    """Config sync over the whole fleet, by state."""
    line = Text("config sync: ")
    parts = [
        Text(f"{count:,} {state}", style=_SYNC_STYLE.get(state, ""))
        for state, count in snapshot.sync_totals.items()
        if count
    ]
    line.append_text(Text(", ").join(parts) if parts else Text("no sites", style="dim"))
    return line


def fleet_view(snapshot: FleetSnapshot, context: ViewContext) -> Group:
    """Header (center streams, dead letters) and one row per real site, one for virtual ones."""
    header = Text.assemble(
        ("edgebus demo", "bold"),
        f"  center {context.center_url}  up {context.elapsed_s:.0f}s  ",
        ("Ctrl-C stops everything", "dim"),
    )
    shown = ("UP_READING", "UP_ALARM", "UP_STATUS", "UP_LOG", "SITE_EVENTS", "AUDIT",
             "CENTER_ALARMS")
    streams = Text("center streams: ")
    streams.append("  ".join(f"{name} {snapshot.streams.get(name, 0):,}" for name in shown))
    dead = snapshot.dead_letters
    streams.append("  dead letters ")
    streams.append(f"{dead:,}", style="red bold" if dead else "green")
    # The box's blank divider is the only gap between columns, so the table fits 80 columns.
    table = Table(box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    for title, justify in _COLUMNS:
        table.add_column(title, justify=justify, no_wrap=True)
    for site in context.real_sites:
        table.add_row(*_site_row(site, snapshot, context))
    real = set(context.real_sites)
    virtual = [r for r in snapshot.records if r.site not in real]
    parts: list[Any] = [header, streams, table]
    if virtual:
        parts.append(_virtual_line(virtual, snapshot))
    if snapshot.sync_totals:
        parts.append(_sync_line(snapshot))
    if context.status_line:
        parts.append(Text(context.status_line, style="dim"))
    parts += [Text(error, style="yellow") for error in snapshot.errors]
    return Group(*parts)


def site_summary(
    site: str, snapshot: FleetSnapshot, devices_sent: Mapping[str, int]
) -> dict[str, Any]:
    """One site in the demo's JSON summary."""
    record = snapshot.record(site)
    inventory = record.inventory if record else None
    return {
        "availability": record.availability.value if record else None,
        "onboarded": bool(record and record.onboarded_at),
        "last_seen": record.last_seen.isoformat() if record and record.last_seen else None,
        "version": inventory.agent_version if inventory else None,
        "devices": inventory.device_count if inventory else None,
        "replay_backlog": inventory.replay_backlog if inventory else None,
        "devices_sent": devices_sent.get(site, 0),
        "readings_at_center": snapshot.readings.get(site, 0),
        "active_alarms": snapshot.active_alarms.get(site, 0),
        "config_sync": snapshot.sync.get(site),
    }
