"""Connection settings for NATS, as config objects rather than long argument lists.

`NatsConfig.from_url` covers the common case; every field has a safe default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a live connection recovers; `max_attempts=-1` keeps trying for ever."""

    max_attempts: int = -1
    wait_s: float = 0.5
    jitter_s: float = 0.1


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class NatsConfig:
    """Everything needed to open one NATS connection.

    `connect_timeout_s` bounds the *first* connect as a whole: nats-py alone can hang
    on a server that is down.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "edgebus"
    credentials: Path | None = None
    tls: TlsConfig | None = None
    inbox_prefix: str | None = None
    connect_timeout_s: float = 5.0
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    pending_msgs_limit: int = 512 * 1024

    @classmethod
    def from_url(cls, url: str, *, name: str = "edgebus", **overrides: object) -> NatsConfig:
        servers = tuple(u.strip() for u in url.split(",") if u.strip())
        return replace(cls(servers=servers, name=name), **overrides)  # type: ignore[arg-type]
