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
    # 0.1 s: a catch-up starts within ~0.1 s of the site's server relinking (its own redial
    # pace, 1 s by default, is what bounds the load on the center); measured 0.3-0.6 s of a
    # 3 s 100k catch-up went to waiting at 0.5 s.
    unreachable_probe_s: float = 0.1
    # An entry answered "no responders" while a later one of its batch reached the center
    # this many times is dead-lettered ("no_stream_at_center"): the center has no stream for
    # it, and retrying it for ever would hold back everything behind it.
    no_stream_proofs: int = 3
    # A held head answered "no responders" this long: fetch newer entries too, for one of
    # another kind to send beside it as a witness (the proof above). Not sooner: in a real
    # outage that would hold a whole batch in memory instead of one probe.
    witness_fetch_after_s: float = 30.0
    # Fresh entries of one kind (never sent before) go as one JetStream fast batch: one ack
    # per `fast_batch_flow` entries instead of one each. Re-sends always go one by one, so
    # duplicates absorbed by the center are still counted.
    fast_batch: bool = True
    fast_batch_min: int = 16  # smaller runs are not worth the extra round trip
    fast_batch_flow: int = 100

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_min_s <= backoff_max_s")
        if self.no_stream_proofs < 1 or self.witness_fetch_after_s < 0:
            raise ValueError("need no_stream_proofs >= 1 and witness_fetch_after_s >= 0")
        if self.fast_batch_min < 2 or self.fast_batch_flow < 1:
            raise ValueError("need fast_batch_min >= 2 and fast_batch_flow >= 1")
        if self.unreachable_probe_s <= 0:
            raise ValueError("unreachable_probe_s must be positive")
        if self.publish_timeout_s <= 0 or self.fetch_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
