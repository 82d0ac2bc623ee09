"""`SimulatorConfig`: how many virtual sites, how they are named and grouped, how they beat.

One frozen object; `edgebus simulate` and the scale benchmark build it from their flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bus import subjects
from edge_agent.heartbeat.inventory import package_version
from schemas.controller import MAX_BATCH

MAX_CONNECTIONS = 16


@dataclass(frozen=True)
class SimulatorConfig:
    """A fleet of `sites` virtual sites `<prefix>-<n>` (n zero-padded), in `groups` groups.

    `credentials` is the simulator identity on a center with auth: one service credential
    that may publish for every virtual site (see `edge_agent.simulator`). `site_keys`: make
    a real nkey per site and send its public key at onboarding, as a real site does (the
    center then signs a JWT for each); None = only when `credentials` is given, since a
    center without auth ignores the key and 100k keys cost ~10 s of simulator CPU.
    """

    sites: int
    server: str = "nats://127.0.0.1:4222"
    prefix: str = "sim"
    groups: int = 10
    interval_s: float = 30.0
    connections: int = 2
    credentials: Path | None = None
    site_keys: bool | None = None
    agent_version: str = field(default_factory=lambda: f"{package_version()}+sim")
    # Onboarding pipeline: `sites.add` batches in flight, onboarding requests in flight.
    add_concurrency: int = 2
    onboard_concurrency: int = 64
    token_ttl_s: float = 24 * 3600.0
    request_timeout_s: float = 30.0
    onboard_attempts: int = 3
    # The heartbeat scheduler wakes this often and sends every beat whose slot has come.
    tick_s: float = 0.05
    seed: int = 1

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ValueError("sites must be at least 1")
        subjects.token(self.prefix)
        longest = f"{self.prefix}-{self.sites - 1}"
        if len(longest) > 64:
            raise ValueError(f"site ids would exceed 64 characters: {longest!r}")
        if self.groups < 1:  # more groups than sites only leaves some groups empty
            raise ValueError("groups must be at least 1")
        if self.interval_s <= 0 or self.tick_s <= 0:
            raise ValueError("interval_s and tick_s must be positive")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be between 1 and {MAX_CONNECTIONS}")
        if self.add_concurrency < 1 or self.onboard_concurrency < 1:
            raise ValueError("concurrency limits must be at least 1")
        if self.onboard_attempts < 1 or self.request_timeout_s <= 0:
            raise ValueError("onboard_attempts and request_timeout_s must be positive")

    @property
    def add_batch(self) -> int:
        return MAX_BATCH

    @property
    def makes_site_keys(self) -> bool:
        return self.credentials is not None if self.site_keys is None else self.site_keys
