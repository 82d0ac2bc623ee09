"""The demo's center: an operator-mode nats-server with its own CredentialAuthority, the creds
files of its services, and the controller's command line. Everything lives under one directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bus.auth import CredentialAuthority, write_private
from bus.client import Bus
from bus.natsserver import NatsServerProcess
from edgebus.center import connect_center, start_center_server


@dataclass(frozen=True)
class ControllerTuning:
    """Demo-friendly controller thresholds: a site shows online within a heartbeat and
    offline within seconds, instead of production's minutes."""

    heartbeat_interval_s: float = 5.0
    offline_after_s: float = 15.0
    sweep_interval_s: float = 0.5
    persist_every_s: float = 5.0
    lease_ttl_s: float = 5.0


class DemoCenter:
    """Layout: authority/ (keys, 0600), accounts/ (resolver), creds/, jetstream/, center.conf,
    center.log. Blocking methods: call them from a worker thread inside an event loop."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.authority_dir = directory / "authority"
        self.creds_dir = directory / "creds"
        self._server: NatsServerProcess | None = None

    @property
    def server(self) -> NatsServerProcess:
        if self._server is None:
            raise RuntimeError("the center has not been started")
        return self._server

    def start(self) -> None:
        """Keys (made on first use), one creds file per center identity, then the server."""
        authority = CredentialAuthority(self.authority_dir)
        for name in ("demo", "controller", "simulator", "sync", "alarms"):
            write_private(self.creds_path(name), authority.issue_service_credentials(name))
        write_private(self.creds_path("system"), authority.system_credentials())
        extra = authority.server_config_block(self.directory / "accounts")
        self._server = start_center_server(self.directory, extra_config=extra)

    @property
    def started(self) -> bool:
        return self._server is not None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.stop(timeout=timeout_s)

    def creds_path(self, name: str) -> Path:
        return self.creds_dir / f"{name}.creds"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def leaf_url(self) -> str:
        return self.server.leaf_url

    async def connect(self, name: str = "edgebus-demo") -> Bus:
        return await connect_center(self.url, name=name, credentials=self.creds_path("demo"))

    def controller_argv(self, tuning: ControllerTuning) -> list[str]:
        return [
            sys.executable,
            "-m",
            "services.controller",
            "--nats",
            self.url,
            "--credentials",
            str(self.creds_path("controller")),
            "--authority-dir",
            str(self.authority_dir),
            "--system-credentials",
            str(self.creds_path("system")),
            "--leaf-url",
            self.leaf_url,
            "--public-url",
            self.url,
            "--heartbeat-interval-s",
            str(tuning.heartbeat_interval_s),
            "--offline-after-s",
            str(tuning.offline_after_s),
            "--sweep-interval-s",
            str(tuning.sweep_interval_s),
            "--persist-every-s",
            str(tuning.persist_every_s),
            "--lease-ttl-s",
            str(tuning.lease_ttl_s),
        ]

    def sync_argv(self, tuning: ControllerTuning) -> list[str]:
        """The config-sync service: audits every heartbeat interval in the demo."""
        return [
            sys.executable,
            "-m",
            "services.sync",
            "--nats",
            self.url,
            "--credentials",
            str(self.creds_path("sync")),
            "--audit-interval-s",
            str(tuning.heartbeat_interval_s),
            "--lease-ttl-s",
            str(tuning.lease_ttl_s),
        ]

    def alarms_argv(self, tuning: ControllerTuning) -> list[str]:
        """The alarms service (one replica; more could run against the same center)."""
        return [
            sys.executable,
            "-m",
            "services.alarms",
            "--nats",
            self.url,
            "--credentials",
            str(self.creds_path("alarms")),
            "--lease-ttl-s",
            str(tuning.lease_ttl_s),
        ]
