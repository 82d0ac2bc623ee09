"""The alarms service's settings: leader lease, batching and flush pacing, storm handling.

One frozen config object; `python -m services.alarms` builds it from flags.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from services.alarms.state import FlapPolicy
from services.alarms.storm import StormPolicy

DAY_S = 24 * 3600.0


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class AlarmsConfig:
    """Every replica answers requests; the lease holder alone consumes and writes state."""

    replica_id: str = field(default_factory=default_replica_id)
    # Alarm changes are partitioned by site, one leader per partition (each replica leads its
    # fair share): several leaders use several cores. Every replica must use the same count,
    # which is fixed once the sites' alarm stream holds messages (`bus.partitions`).
    partitions: int = 1
    flap: FlapPolicy = field(default_factory=FlapPolicy)
    storm: StormPolicy = field(default_factory=StormPolicy)
    lease_ttl_s: float = 10.0
    # Messages per pull. State is written (coalesced per alarm) and the consumed messages
    # acked every `flush_every_s` while the service keeps up. While more than `behind_after`
    # changes wait in the streams (a storm, a catch-up), every `busy_flush_every_s` instead:
    # each write then stands for many changes. Sooner once `max_dirty` alarms changed or half
    # of `max_ack_pending` messages wait for their ack.
    batch_size: int = 1000
    flush_every_s: float = 0.2
    busy_flush_every_s: float = 5.0
    behind_after: int = 1000
    max_dirty: int = 50_000
    # Consumed but unacked: redelivered after `ack_wait_s` if the leader dies meanwhile.
    ack_wait_s: float = 30.0
    max_ack_pending: int = 200_000
    tick_s: float = 1.0  # flapping settles, summaries, pruning
    retention_s: float = 7 * DAY_S  # a cleared alarm's record is forgotten this long after
    # History queries read at most this many stored messages (they say when they stopped).
    history_max_scan: int = 100_000
    # An acknowledgement waits this long for the state to show it before answering.
    ack_visible_timeout_s: float = 3.0
    request_queue: str = "alarms"

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError("partitions must be >= 1")
        if self.lease_ttl_s <= 0 or self.flush_every_s <= 0 or self.tick_s <= 0:
            raise ValueError("lease_ttl_s, flush_every_s and tick_s must be positive")
        if self.busy_flush_every_s < self.flush_every_s or self.behind_after < 0:
            raise ValueError("need busy_flush_every_s >= flush_every_s and behind_after >= 0")
        if self.batch_size < 1 or self.max_dirty < 1 or self.max_ack_pending < self.batch_size:
            raise ValueError("need batch_size >= 1, max_dirty >= 1, max_ack_pending >= batch")
        if self.ack_wait_s <= self.busy_flush_every_s * 5:
            raise ValueError("ack_wait_s must comfortably exceed busy_flush_every_s")

    @property
    def lease_renew_s(self) -> float:
        return self.lease_ttl_s / 4
