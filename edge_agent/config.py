"""Configuration of one edge agent process, as plain frozen dataclasses.

Built from command-line flags by `edge_agent.__main__`, or directly by tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bus.streams import ReplayFullPolicy
from edge_agent.ingest.convert import IngestLimits
from schemas.alarms import AlarmRulesConfig


@dataclass(frozen=True)
class ReplayConfig:
    """Bounds and pacing of the edge-local replay log and its forwarder."""

    max_bytes: int = 512 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0
    policy: str = ReplayFullPolicy.REFUSE_NEW
    near_full_ratio: float = 0.8  # raise the "replay log near full" alarm above this
    batch_size: int = 500  # also the most events in flight to the center at once
    ack_wait_s: float = 10.0  # a crashed forwarder's batch is redelivered after this
    publish_timeout_s: float = 5.0
    backoff_min_s: float = 0.2
    backoff_max_s: float = 10.0
    monitor_interval_s: float = 2.0


@dataclass(frozen=True)
class ExternalBroker:
    """An existing MQTT broker the agent subscribes to instead of the site's own listener."""

    host: str
    port: int
    protocol: str = "3.1.1"  # or "5"
    client_id: str = ""
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str, **overrides: str) -> ExternalBroker:
        """`mqtt://host:port` (or `mqtt5://host:port` for an MQTT 5 session)."""
        scheme, _, rest = url.partition("://")
        if scheme not in ("mqtt", "mqtt5") or not rest:
            raise ValueError(f"expected mqtt://host:port or mqtt5://host:port, got {url!r}")
        host, _, port = rest.rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected mqtt://host:port, got {url!r}")
        protocol = "5" if scheme == "mqtt5" else "3.1.1"
        return cls(host=host, port=int(port), protocol=protocol, **overrides)


@dataclass(frozen=True)
class AgentConfig:
    site: str
    nats_url: str  # the site's own nats-server, never the center
    data_dir: Path
    ingest: IngestLimits = field(default_factory=IngestLimits)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    external_broker: ExternalBroker | None = None
    credentials: Path | None = None
    heartbeat_interval_s: float = 30.0  # the center's choice, given at onboarding
    # Alarm rules to start with (`--alarm-rules FILE`); config sync replaces them live.
    alarm_rules: AlarmRulesConfig | None = None
    # Own log records at this level and above go to the center (config kind `log` changes it).
    log_ship_level: str = "warning"
    # A dead-letter alarm clears once no dead letter of its reason came for this long.
    dead_letter_quiet_s: float = 600.0
    # How often the agent tells the center what config it runs (drift detection).
    sync_report_interval_s: float = 60.0
