"""`ForwarderConfig`: how one replay-log forwarder paces itself (batches, timeouts, backoff).

Plain frozen data, checked when created; `bus.forwarder.Forwarder` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwarderConfig:
    """Pacing of one forwarder; `batch_size` should equal the consumer's `max_ack_pending`."""

    batch_size: int = 500
    publish_timeout_s: float = 5.0  # a batch's center acks must all arrive within this
    backoff_min_s: float = 0.2
    backoff_max_s: float = 10.0
    fetch_timeout_s: float = 2.0  # long poll of an idle log (server side), not a retry pace
    # Retry pace, at most, while publishes get "no responders": the link is down (or the
    # center has no stream for them). The site's own server answers those, so a probe costs
    # the center nothing, and the first one after the link heals gets through at once.
    unreachable_probe_s: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_min_s <= backoff_max_s")
        if self.unreachable_probe_s <= 0:
            raise ValueError("unreachable_probe_s must be positive")
        if self.publish_timeout_s <= 0 or self.fetch_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
