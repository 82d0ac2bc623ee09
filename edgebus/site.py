"""`edgebus site run|status|tail`: run one edge site on this machine and read it locally.

Status and tail find the site through its site.json and talk only to its own nats-server,
so they work with the center unreachable.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from rich.console import Console, Group
from rich.table import Table

from bus import subjects
from bus.client import Bus, BusConnectError, RemoteError, open_connection
from bus.config import NatsConfig, ReconnectPolicy
from bus.log import get_logger
from bus.streams import site_events_stream
from edge_agent.onboarding import SiteIdentityRecord, load_identity, onboard
from edge_agent.onboarding.identity import IdentityError
from edge_agent.supervisor import (
    SiteAlreadyRunning,
    SiteRunConfig,
    SiteState,
    SiteStateError,
    SiteSupervisor,
    agent_data_dir,
    process_alive,
    read_site_state,
)
from edge_agent.sync.agent import seed_from_bundle
from edge_agent.sync.store import AppliedStore, store_dir
from schemas import REGISTRY, EventDecodeError
from schemas.bootstrap import BootstrapToken
from schemas.sync import ConfigBundle

DEFAULT_SITES_DIR = Path(".edgebus/sites")
_HTTP_TIMEOUT_S = 1.0


class SiteToolError(RuntimeError):
    """A local site tool cannot do its job (no site.json, server down, no EVENTS stream)."""


def site_data_dir(site: str | None, data_dir: Path | None) -> Path:
    """--data-dir wins; else `.edgebus/sites/<site>`."""
    if data_dir is not None:
        return data_dir
    if site is None:
        raise SiteToolError("give --data-dir or --site")
    return DEFAULT_SITES_DIR / subjects.site_id(site)


# -- onboarding ---------------------------------------------------------------------------


def read_token(token: str | None, token_file: Path | None) -> BootstrapToken | None:
    """The bootstrap token from --token or --token-file (a file keeps it out of `ps`)."""
    if token and token_file:
        raise SiteToolError("give --token or --token-file, not both")
    text = token
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise SiteToolError(f"cannot read the token file: {exc}") from None
    if not text:
        return None
    try:
        return BootstrapToken.decode(text)
    except ValueError as exc:
        raise SiteToolError(str(exc)) from None


def run_config_from_identity(
    identity: SiteIdentityRecord, data_dir: Path, *, leaf_url: str | None = None, **options: Any
) -> SiteRunConfig:
    """Run the onboarded site: its leaf dials the center's leaf URL with the site's own creds,
    its agent heartbeats at the interval the center chose. `options`: other SiteRunConfig fields."""
    url = leaf_url or (identity.leaf_urls[0] if identity.leaf_urls else None)
    if url is None:
        raise SiteToolError(
            "the center sent no leaf URL at onboarding: give --leaf-url nats-leaf://HOST:PORT"
        )
    if options.get("leaf_credentials") is None:  # an explicit file wins over the installed one
        options["leaf_credentials"] = identity.credentials
    return SiteRunConfig(
        site=identity.site,
        center_leaf_url=url,
        data_dir=data_dir,
        heartbeat_interval_s=identity.heartbeat_interval_s,
        **options,
    )


def prepare_site_run(
    *,
    site: str | None,
    center: str | None,
    token: BootstrapToken | None,
    data_dir: Path | None,
    leaf_url: str | None = None,
    onboard_timeout_s: float | None = None,
    console: Console | None = None,
    **options: Any,
) -> SiteRunConfig:
    """What `edgebus site run` starts: onboarded (token, or identity.json from an earlier
    onboarding: the token is never needed again), else the development path (--site and a
    --center leaf URL, no auth). Raises SiteToolError, OnboardingError, ValueError."""
    if token is not None:
        if site is not None and site != token.site:
            raise SiteToolError(f"--site {site} does not match the token's site {token.site}")
        directory = site_data_dir(token.site, data_dir)
        if console is not None and load_identity(directory, token.site) is None:
            console.print(f"onboarding site [bold]{token.site}[/bold]...", soft_wrap=True)
        try:
            identity: SiteIdentityRecord | None = asyncio.run(
                onboard(token, directory, center_url=center, timeout_s=onboard_timeout_s)
            )
        except (IdentityError, ValueError) as exc:  # another site's data dir, no center URL
            raise SiteToolError(str(exc)) from None
    else:
        directory = site_data_dir(site, data_dir)
        try:
            identity = load_identity(directory, site)
        except IdentityError as exc:
            raise SiteToolError(str(exc)) from None
    if identity is not None:
        seed_config(identity, directory)
        return run_config_from_identity(identity, directory, leaf_url=leaf_url, **options)
    if site is None or center is None:
        raise SiteToolError(
            "not onboarded yet: give --token (zero touch) or, for development without auth, "
            "--site and --center nats-leaf://HOST:PORT"
        )
    return SiteRunConfig(site=site, center_leaf_url=center, data_dir=directory, **options)


def seed_config(identity: SiteIdentityRecord, directory: Path) -> bool:
    """The config received at onboarding becomes what the agent starts on, unless the agent
    already keeps one of its own (it is newer). True if it was seeded."""
    store = AppliedStore(store_dir(agent_data_dir(directory)))
    if store.path.exists() or not identity.desired_config:
        return False
    try:
        bundle = ConfigBundle.model_validate(identity.desired_config)
    except ValidationError as exc:  # an older center's placeholder: the agent pulls instead
        get_logger("edgebus.site").warning("onboarding_config_unusable", error=str(exc)[:300])
        return False
    seed_from_bundle(store, bundle)
    return True


# -- run ----------------------------------------------------------------------------------


def run_site(config: SiteRunConfig, console: Console) -> int:
    """Supervise the site until SIGTERM/Ctrl-C; the process exit code."""
    supervisor = SiteSupervisor(config)

    def announce(state: SiteState) -> None:
        console.print(
            f"site [bold]{state.site}[/bold] running: nats {state.nats_url}, "
            f"MQTT {state.mqtt_url}, center {state.center_leaf_url} "
            f"(data {state.data_dir}); Ctrl-C stops it",
            soft_wrap=True,
        )

    try:
        code = supervisor.run(on_started=announce)
    except (SiteAlreadyRunning, SiteStateError) as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    console.print(f"site {config.site} stopped; every process it started has exited")
    return code


# -- status -------------------------------------------------------------------------------


def _monitor(state: SiteState, endpoint: str) -> dict[str, Any] | None:
    """A monitoring endpoint of the site server as JSON; None when nothing answers."""
    try:
        url = f"{state.monitor_url}/{endpoint}"
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _server_part(state: SiteState) -> dict[str, Any]:
    varz = _monitor(state, "varz")
    if varz is None:
        return {"reachable": False, "monitor_url": state.monitor_url}
    return {
        "reachable": True,
        "name": varz.get("server_name"),
        "version": varz.get("version"),
        "uptime": varz.get("uptime"),
        "connections": varz.get("connections"),
        "url": state.nats_url,
        "mqtt_url": state.mqtt_url,
        "monitor_url": state.monitor_url,
    }


def _link_part(state: SiteState) -> dict[str, Any]:
    leafz = _monitor(state, "leafz")
    if leafz is None:
        return {"up": None, "center": state.center_leaf_url}
    leafs = [
        {
            "name": leaf.get("name"),
            "address": f"{leaf.get('ip')}:{leaf.get('port')}",
            "rtt": leaf.get("rtt"),
        }
        for leaf in leafz.get("leafs") or []
    ]
    return {"up": bool(leafs), "center": state.center_leaf_url, "leafs": leafs}


def _streams_part(state: SiteState) -> list[dict[str, Any]] | None:
    jsz = _monitor(state, "jsz?streams=true")
    if jsz is None:
        return None
    streams = []
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            stream_state = stream.get("state") or {}
            streams.append(
                {
                    "name": stream.get("name"),
                    "messages": stream_state.get("messages", 0),
                    "bytes": stream_state.get("bytes", 0),
                    "first_seq": stream_state.get("first_seq", 0),
                    "last_seq": stream_state.get("last_seq", 0),
                    "consumers": stream_state.get("consumer_count", 0),
                }
            )
    return sorted(streams, key=lambda s: str(s["name"]))


def _local_config(state: SiteState, name: str, timeout_s: float) -> NatsConfig:
    # One bounded attempt: a local tool must answer quickly when the server is down.
    return NatsConfig.from_url(
        state.nats_url,
        name=name,
        connect_timeout_s=timeout_s,
        reconnect=ReconnectPolicy(max_attempts=0),
    )


async def _agent_part(state: SiteState, timeout_s: float) -> dict[str, Any]:
    from schemas.site import SiteStatusQuery, SiteStatusReport

    try:
        bus = await Bus.connect(
            _local_config(state, "edgebus-site-status", timeout_s), scope=state.site
        )
    except BusConnectError as exc:
        return {"answering": False, "error": f"site server unreachable: {exc}"}
    try:
        reply = await bus.request(
            subjects.local_control(state.site, "status"),
            SiteStatusQuery(),
            SiteStatusReport,
            timeout=timeout_s,
        )
    except NoRespondersError:
        return {"answering": False, "error": "no agent is listening"}
    except (NatsTimeoutError, TimeoutError):
        return {"answering": False, "error": f"no answer within {timeout_s:g}s"}
    except (RemoteError, EventDecodeError) as exc:
        return {"answering": False, "error": str(exc)}
    finally:
        await bus.close()
    return {"answering": True, "report": reply.data.model_dump(mode="json")}


def _process_part(state: SiteState) -> dict[str, Any]:
    children = {
        name: {**asdict(child), "alive": process_alive(child.pid, child.create_time)}
        for name, child in state.children.items()
    }
    supervisor = state.supervisor
    return {
        "supervisor": {
            "pid": supervisor.pid,
            "state": supervisor.state,
            "started_at": supervisor.started_at,
            "alive": process_alive(supervisor.pid, supervisor.create_time),
        },
        "children": children,
    }


async def collect_site_status(data_dir: Path, *, timeout_s: float = 2.0) -> dict[str, Any]:
    """Everything a local operator can learn about the site, center or no center."""
    try:
        state = read_site_state(data_dir)
    except SiteStateError as exc:
        raise SiteToolError(str(exc)) from None
    server = await asyncio.to_thread(_server_part, state)
    link = await asyncio.to_thread(_link_part, state)
    streams = await asyncio.to_thread(_streams_part, state)
    agent = (
        await _agent_part(state, timeout_s)
        if server["reachable"]
        else {"answering": False, "error": "site server unreachable"}
    )
    return {
        "site": state.site,
        "data_dir": state.data_dir,
        "ok": bool(server["reachable"] and agent["answering"]),
        **_process_part(state),
        "server": server,
        "center_link": link,
        "streams": streams,
        "agent": agent,
        "site_json_updated_at": state.updated_at,
    }


def _yes_no(value: bool | None, yes: str, no: str) -> str:
    if value is None:
        return "[yellow]unknown[/yellow]"
    return f"[green]{yes}[/green]" if value else f"[red]{no}[/red]"


def render_site_status(status: dict[str, Any]) -> Group:
    supervisor, server, link, agent = (
        status["supervisor"],
        status["server"],
        status["center_link"],
        status["agent"],
    )
    header = (
        f"[bold]site {status['site']}[/bold]  supervisor "
        f"{_yes_no(supervisor['alive'], 'running', 'not running')} (pid {supervisor['pid']})  "
        f"server {_yes_no(server['reachable'], 'up', 'down')}  "
        f"center link {_yes_no(link['up'], 'UP', 'DOWN')} ({link['center']})"
    )
    processes = Table(title="processes")
    for column in ("process", "state", "pid", "alive", "restarts", "last exit", "started"):
        processes.add_column(column)
    for name, child in status["children"].items():
        last_exit = "" if child["last_exit_code"] is None else str(child["last_exit_code"])
        processes.add_row(
            name,
            child["state"],
            str(child["pid"] or ""),
            _yes_no(child["alive"], "yes", "no"),
            str(child["restarts"]),
            last_exit,
            child["started_at"] or "",
        )
    parts: list[Any] = [header, processes]
    if status["streams"] is not None:
        streams = Table(title="local streams")
        for column in ("stream", "messages", "bytes", "first seq", "last seq", "consumers"):
            streams.add_column(column)
        for s in status["streams"]:
            streams.add_row(
                s["name"],
                str(s["messages"]),
                str(s["bytes"]),
                str(s["first_seq"]),
                str(s["last_seq"]),
                str(s["consumers"]),
            )
        parts.append(streams)
    if agent["answering"]:
        parts.append(_agent_summary(agent["report"]))
    else:
        parts.append(f"[red]agent not answering:[/red] {agent['error']}")
    return Group(*parts)


def _agent_summary(report: dict[str, Any]) -> str:
    ingest = report.get("ingest") or {}
    replay = report.get("replay") or {}
    rejected = sum((ingest.get("rejected") or {}).values())
    lines = [
        f"agent {report.get('agent_version')} up {report.get('uptime_s', 0):.0f}s: "
        f"ingested {ingest.get('ingested', 0)}, rejected {rejected}, "
        f"refused {ingest.get('refused', 0)}",
    ]
    if replay:
        lines.append(
            "replay log: " + ", ".join(f"{key} {value}" for key, value in sorted(replay.items()))
        )
    alarms = report.get("active_alarms") or []
    lines.append(f"active alarms ({len(alarms)}): " + (", ".join(alarms) if alarms else "none"))
    return "\n".join(lines)


# -- tail ---------------------------------------------------------------------------------


def _entry(msg: Msg) -> dict[str, Any]:
    """One stored event as plain data; an undecodable one keeps its reason, never crashes."""
    metadata = msg.metadata
    entry: dict[str, Any] = {
        "seq": metadata.sequence.stream,
        "subject": msg.subject,
        "stored_at": metadata.timestamp.isoformat() if metadata.timestamp else None,
    }
    try:
        entry["event"] = REGISTRY.decode(msg.data).model_dump(mode="json")
    except EventDecodeError as exc:
        entry["error"] = f"{exc.reason}: {exc.message}"
    return entry


def format_entry(entry: dict[str, Any]) -> str:
    """One line per event for a terminal."""
    prefix = f"{entry['seq']:>7} {entry['stored_at'] or '-'} {entry['subject']}"
    if "error" in entry:
        return f"{prefix} UNDECODABLE {entry['error']}"
    event = entry["event"]
    data = json.dumps(event.get("data"), separators=(",", ":"), sort_keys=True)
    if len(data) > 160:
        data = data[:157] + "..."
    return f"{prefix} {event.get('type')} {data}"


async def tail_site_events(
    data_dir: Path,
    emit: Callable[[dict[str, Any]], None],
    *,
    last: int = 20,
    follow: bool = True,
    idle_timeout_s: float = 2.0,
) -> int:
    """Emit the last `last` events of the site's EVENTS stream, then new ones if `follow`.

    Returns how many were emitted; without `follow` it stops at the stream's end as of the call.
    """
    try:
        state = read_site_state(data_dir)
    except SiteStateError as exc:
        raise SiteToolError(str(exc)) from None
    try:
        nc = await open_connection(_local_config(state, "edgebus-site-tail", idle_timeout_s))
    except BusConnectError as exc:
        raise SiteToolError(f"site server unreachable: {exc}") from None
    try:
        return await _tail(nc, state.site, emit, last, follow, idle_timeout_s)
    finally:
        await nc.close()


async def _tail(
    nc: Any,
    site: str,
    emit: Callable[[dict[str, Any]], None],
    last: int,
    follow: bool,
    idle_timeout_s: float,
) -> int:
    js = nc.jetstream()  # the site's own domain: we are connected to its server
    stream = site_events_stream(site).name
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        raise SiteToolError(
            f"site {site} has no {stream} stream yet (has its agent run?)"
        ) from None
    end = info.state.last_seq
    start = max(info.state.first_seq, end - last + 1) if last > 0 else end + 1
    if not follow and (last <= 0 or info.state.messages == 0):
        return 0
    sub = await js.subscribe(
        subjects.site_events_all(site),
        stream=stream,
        ordered_consumer=True,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start, 1)
        ),
    )
    emitted = 0
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout_s if not follow else 3600.0)
            except (NatsTimeoutError, TimeoutError):
                if follow:
                    continue
                break  # what was there has expired meanwhile: nothing more to show
            emit(_entry(msg))
            emitted += 1
            if not follow and (
                msg.metadata.sequence.stream >= end or msg.metadata.num_pending == 0
            ):
                break
    finally:
        await sub.unsubscribe()
    return emitted
