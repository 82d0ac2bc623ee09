"""`SyncConfig`: how one sync-service replica runs (queue group, lease, audit pacing).

One frozen object; `python -m services.sync` builds it from flags, tests directly.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from services.sync.status import PushPolicy


def _replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class SyncConfig:
    replica_id: str = field(default_factory=_replica_id)
    request_queue: str = "sync"
    # The leader re-checks every site this often and re-sends what is out of sync.
    audit_interval_s: float = 10.0
    lease_ttl_s: float = 10.0
    policy: PushPolicy = field(default_factory=PushPolicy)
    # Sites pushed between two yields to the event loop.
    push_chunk: int = 500

    def __post_init__(self) -> None:
        if self.audit_interval_s <= 0 or self.lease_ttl_s <= 0:
            raise ValueError("audit_interval_s and lease_ttl_s must be positive")

    @property
    def lease_renew_s(self) -> float:
        return self.lease_ttl_s / 4
