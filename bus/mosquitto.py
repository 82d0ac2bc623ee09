"""Run real mosquitto brokers (optionally bridged) as child processes from a typed spec.
Used by tests, benchmarks and the "external broker" mode; stdlib only, no MQTT library."""

from __future__ import annotations

import os
import shutil
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from bus.childprocess import ChildServer
from bus.ports import free_port

__all__ = [
    "MosquittoBridge",
    "MosquittoError",
    "MosquittoProcess",
    "MosquittoSpec",
    "mosquitto_binary",
    "render_config",
]

LOOPBACK = "127.0.0.1"
_FALLBACK_BINARY = Path("/usr/sbin/mosquitto")
_PROBE_TIMEOUT = 1.0


class MosquittoError(RuntimeError):
    """A mosquitto process could not be found or started."""


def mosquitto_binary() -> str:
    """Path of the mosquitto executable: PATH first, then the Debian location."""
    on_path = shutil.which("mosquitto")
    if on_path:
        return on_path
    if _FALLBACK_BINARY.is_file() and os.access(_FALLBACK_BINARY, os.X_OK):
        return str(_FALLBACK_BINARY)
    raise MosquittoError(
        f"mosquitto not found on PATH nor at {_FALLBACK_BINARY}; "
        "install it with `apt-get install -y mosquitto mosquitto-clients`"
    )


@dataclass(frozen=True, kw_only=True)
class MosquittoBridge:
    """A bridge from this broker to a remote one (e.g. edge -> center).

    Each topic line is mosquitto's `topic` syntax: "<pattern> <in|out|both> <qos>".
    """

    remote_host: str
    remote_port: int
    topics: tuple[str, ...] = ("dev/# out 1",)
    name: str = "center"
    # Stable id, so the remote keeps the bridge's session across reconnects.
    remote_client_id: str = "edgebus-bridge"
    # False: both ends keep the bridge's session, so QoS 1 messages published while the
    # link is down are queued locally and forwarded once it is back.
    cleansession: bool = False
    # Reconnect backoff while the remote is down, as "restart_timeout <base> <cap>".
    # Measured on mosquitto 2.0.11: a single value is ignored and the default jitter
    # backoff (5 s .. 30 s) applies, so always render both.
    restart_base_seconds: int = 1
    restart_cap_seconds: int = 2
    keepalive_seconds: int = 10

    def __post_init__(self) -> None:
        if not self.topics:
            raise ValueError("a bridge needs at least one topic line")
        for line in self.topics:
            if len(line.split()) < 2:
                raise ValueError(f"bridge topic {line!r} must read '<pattern> <direction> [qos]'")


@dataclass(frozen=True, kw_only=True)
class MosquittoSpec:
    """Everything needed to render one broker's config; the port is fixed at construction."""

    port: int = field(default_factory=free_port)
    host: str = LOOPBACK
    allow_anonymous: bool = True
    # mosquitto persistence is a snapshot: written on SIGTERM and every
    # `autosave_interval` seconds, so a SIGKILL loses what changed since the last save.
    persistence: bool = False
    persistence_dir: Path | None = None
    autosave_interval: int = 1
    # Per client, beyond those in flight; 0 = unbounded. mosquitto's default of 1000
    # silently drops QoS 1 messages for an offline persistent client or bridge.
    max_queued_messages: int = 0
    # Un-acked QoS 1/2 messages in flight to each MQTT 3.1.1 client (mosquitto default
    # 20); MQTT 5 clients set their own limit with Receive Maximum.
    max_inflight_messages: int = 20
    # Nagle off (mosquitto default: on): with several PUBACKs in flight, Nagle plus the
    # client's delayed ACK stalls each batch by ~40 ms.
    tcp_nodelay: bool = True
    bridge: MosquittoBridge | None = None
    extra_config: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.persistence and self.persistence_dir is None:
            raise ValueError("persistence=True needs a persistence_dir")


def _persistence_lines(spec: MosquittoSpec) -> list[str]:
    if not spec.persistence or spec.persistence_dir is None:
        return ["persistence false"]
    # mosquitto concatenates location and file name: keep the trailing slash.
    return [
        "persistence true",
        f"persistence_location {spec.persistence_dir}/",
        f"autosave_interval {spec.autosave_interval}",
    ]


def _bridge_lines(bridge: MosquittoBridge) -> list[str]:
    lines = [
        f"connection {bridge.name}",
        f"address {bridge.remote_host}:{bridge.remote_port}",
        f"remote_clientid {bridge.remote_client_id}",
        f"cleansession {str(bridge.cleansession).lower()}",
        f"restart_timeout {bridge.restart_base_seconds} {bridge.restart_cap_seconds}",
        f"keepalive_interval {bridge.keepalive_seconds}",
        "bridge_protocol_version mqttv311",
        "try_private true",
        # No $SYS/broker/connection/... state messages in the bridged topic space.
        "notifications false",
        "start_type automatic",
    ]
    return lines + [f"topic {line}" for line in bridge.topics]


def render_config(spec: MosquittoSpec) -> str:
    """mosquitto.conf text for `spec` (logs go to stderr; the caller redirects them)."""
    lines = [
        # Global options come before any listener or bridge section.
        f"max_queued_messages {spec.max_queued_messages}",
        f"max_inflight_messages {spec.max_inflight_messages}",
        f"set_tcp_nodelay {str(spec.tcp_nodelay).lower()}",
        *_persistence_lines(spec),
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
    ]
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to user `mosquitto`, which cannot write our
        # persistence dir; stay root instead (test and bench processes only).
        lines.append("user root")
    lines += [
        f"listener {spec.port} {spec.host}",
        f"allow_anonymous {str(spec.allow_anonymous).lower()}",
        *spec.extra_config,
    ]
    if spec.bridge is not None:
        lines += _bridge_lines(spec.bridge)
    return "\n".join(lines) + "\n"


def _connect_packet(client_id: str) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT: clean session, keepalive 5 s, no credentials."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 5)
    payload = struct.pack("!H", len(cid)) + cid
    body = variable + payload
    return bytes([0x10, len(body)]) + body  # body < 128 bytes: one length byte


def _answers_connack(host: str, port: int) -> bool:
    """True once the broker answers CONNECT with a CONNACK (accepted or refused)."""
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT) as sock:
            sock.sendall(_connect_packet(f"edgebus-probe-{os.getpid()}"))
            reply = sock.recv(4)
            if len(reply) == 4 and reply[0] == 0x20 and reply[3] == 0:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so no will and a quiet log
            return len(reply) >= 2 and reply[0] == 0x20
    except OSError:
        return False


class MosquittoProcess(ChildServer):
    """One mosquitto child process; restartable on the same port with the same data."""

    error = MosquittoError

    def __init__(self, spec: MosquittoSpec, workdir: Path, name: str = "mosquitto") -> None:
        super().__init__(workdir, name)
        self.spec = spec

    def _command(self) -> list[str]:
        return [mosquitto_binary(), "-c", str(self.config_path)]

    def _config_text(self) -> str:
        return render_config(self.spec)

    def _prepare(self) -> None:
        super()._prepare()
        if self.spec.persistence_dir is not None:
            self.spec.persistence_dir.mkdir(parents=True, exist_ok=True)

    def _is_ready(self) -> bool:
        return _answers_connack(self.spec.host, self.spec.port)

    @property
    def host(self) -> str:
        return self.spec.host

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def url(self) -> str:
        return f"mqtt://{self.spec.host}:{self.spec.port}"
