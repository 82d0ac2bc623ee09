"""What a replay-log forwarder reports: its counters, the log's backlog, a forward-rate meter.

Plain data for the status report and the replay-log alarms; no I/O here.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class ForwarderStats:
    """Counters since this forwarder started (plain data for status and alarms)."""

    forwarded: int  # entries the center acked (stored or duplicate), then acked locally
    stored_at_center: int
    duplicates_at_center: int  # re-sent entries the center already had (dedup window)
    dead_lettered: int  # entries the center rejected for good; kept in the site's DLQ
    failures: int  # attempts (fetch or batch) that failed and were retried after a backoff
    consecutive_failures: int
    last_error: str | None
    link_up: bool | None  # did the last attempt reach the center? None: no attempt yet
    rate_per_s: float  # forwarded entries per second over the last few seconds
    order_violations: int  # re-sent entries stored fresh after a later one (must stay 0)
    dropped_seen: int  # entries found removed from the log before they were forwarded
    fetches: int  # non-empty batches pulled from the log
    pulls: int  # pull requests, empty long polls included (an idle log: one per fetch_timeout)
    publishes: int  # publish attempts to the center, retries included
    batched: int  # of those, sent in JetStream fast batches (fresh entries, one ack per flow)
    redelivery_waits: int  # times an older entry was still held by a dead forwarder
    probing: bool  # after a failure: one entry at a time until one gets through


@dataclass(frozen=True)
class BacklogStats:
    """The replay log as JetStream sees it, plus what this forwarder knows of drops.

    `dropped` counts stream sequences that vanished (drop-oldest, max age) without reaching
    the center: those passed over since the watermark (the consumer's ack floor at start,
    then each entry this forwarder settled) plus those gone below the log's first stored
    entry right now. Entries in the forwarder's hands are not lost (it has their bytes).
    Exact within one forwarder process; across a restart, a killed forwarder's unacked batch
    that the log then dropped is not counted (JetStream moves the ack floor over it).
    """

    depth: int  # entries not yet at the center: undelivered + delivered but unacked
    messages: int
    bytes: int
    max_bytes: int  # -1: unbounded
    oldest_unsent_age_s: float | None  # None when nothing is owed
    dropped: int  # removed by the log's limits (drop-oldest, max age) before forwarding
    first_seq: int
    last_seq: int


class RateMeter:
    """Events per second over a sliding window (1 s buckets)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window = window_s
        self._buckets: deque[tuple[int, int]] = deque()
        self._started = time.monotonic()

    def add(self, count: int, now: float | None = None) -> None:
        second = int(now if now is not None else time.monotonic())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1] = (second, self._buckets[-1][1] + count)
        else:
            self._buckets.append((second, count))
        self._trim(second)

    def rate(self, now: float | None = None) -> float:
        current = now if now is not None else time.monotonic()
        self._trim(int(current))
        span = min(self._window, current - self._started)
        total = sum(count for _, count in self._buckets)
        return total / max(span, 1e-3) if total else 0.0

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self._window:
            self._buckets.popleft()
