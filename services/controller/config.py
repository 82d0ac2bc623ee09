"""The controller's settings: availability thresholds, leader lease, sweep and write budget.

One frozen config object; `python -m services.controller` builds it from flags.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from services.controller.availability import AvailabilityPolicy


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ControllerConfig:
    """Everything a controller replica needs besides its bus and its credential authority.

    `public_urls` go into bootstrap tokens (where a new site sends its onboarding request);
    `leaf_urls` go into the onboarding reply (where the site's leaf node connects).
    """

    policy: AvailabilityPolicy = field(default_factory=AvailabilityPolicy)
    public_urls: tuple[str, ...] = ()
    leaf_urls: tuple[str, ...] = ()
    replica_id: str = field(default_factory=default_replica_id)
    # Leader lease: a dead leader is replaced within about one TTL.
    lease_ttl_s: float = 10.0
    # How long onboarding waits for the sync service to send the new site its config.
    config_lookup_timeout_s: float = 2.0
    # How often the leader looks at the sites that are due (availability resolution).
    sweep_interval_s: float = 1.0
    # Heartbeats are kept in memory; the registry gets last_seen/inventory at most this
    # often per site (and on every state change), so 100k sites x 30 s heartbeats do not
    # become 3.3k KV writes/s.
    persist_every_s: float = 300.0
    max_persist_per_s: float = 200.0
    # Concurrent registry writes of one sweep (a mass outage flips many sites at once).
    write_concurrency: int = 32
    # A query waits this long for this replica's registry copy to catch up with KV.
    read_barrier_timeout_s: float = 2.0
    request_queue: str = "controller"

    def __post_init__(self) -> None:
        if self.lease_ttl_s <= 0 or self.sweep_interval_s <= 0:
            raise ValueError("lease_ttl_s and sweep_interval_s must be positive")
        if self.persist_every_s <= 0 or self.max_persist_per_s <= 0:
            raise ValueError("persist_every_s and max_persist_per_s must be positive")
        if self.write_concurrency < 1:
            raise ValueError("write_concurrency must be at least 1")

    @property
    def lease_renew_s(self) -> float:
        return self.lease_ttl_s / 4
