"""What one batch's center replies mean for the forwarder: pure functions over plain data.

Classify each reply, find the prefix safe to ack, spot order risks, pace retries; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from nats.errors import MaxPayloadError
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from bus.forwarding.config import ForwarderConfig

# JetStream "stream full" answers: the center must make room; never dead-letter for them.
_CENTER_FULL_ERR_CODES = frozenset({10047, 10077, 10078})


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"  # permanent for this entry: dead-letter it, then move on
    FAILED = "failed"  # transient (link down, no stream, timeout): retry later, in order


class Unforwardable(Exception):
    """An entry that cannot even be sent (no event id, not a replay subject)."""


class NoStreamAtCenter(Exception):
    """Proven several times: the center is reachable but no stream there stores this subject."""


def classify(result: PubAck | BaseException) -> Outcome:
    if isinstance(result, PubAck):
        return Outcome.DUPLICATE if result.duplicate else Outcome.STORED
    if isinstance(result, Unforwardable | NoStreamAtCenter | MaxPayloadError):
        return Outcome.REJECTED
    if (
        isinstance(result, APIError)
        and result.code == 400
        and result.err_code not in _CENTER_FULL_ERR_CODES
    ):
        return Outcome.REJECTED
    return Outcome.FAILED


def describe(error: BaseException) -> str:
    """An error as text that keeps JetStream's code and description (its repr drops them)."""
    if isinstance(error, APIError):
        return f"{type(error).__name__} {error.code}/{error.err_code}: {error.description}"
    return repr(error)


def reached_center(result: PubAck | BaseException) -> bool:
    """A PubAck or a JetStream error reply both prove the center answered."""
    return isinstance(result, PubAck | APIError)


def no_stream_despite_link(results: Sequence[PubAck | BaseException]) -> list[int]:
    """Entries answered "no responders" although a later entry of the same batch reached the
    center: the link was up (publishes go out in order on one connection), so most likely
    no stream at the center stores that subject. A cut link fails everything after it too.
    """
    found: list[int] = []
    reached_later = False
    for index in range(len(results) - 1, -1, -1):
        result = results[index]
        if reached_center(result):
            reached_later = True
        elif reached_later and isinstance(result, NoStreamResponseError):
            found.append(index)
    found.reverse()
    return found


def settled_prefix(outcomes: Sequence[Outcome]) -> int:
    """How many leading entries are final (stored, duplicate or rejected): ack those, in order."""
    for index, outcome in enumerate(outcomes):
        if outcome is Outcome.FAILED:
            return index
    return len(outcomes)


def overtaken(outcomes: Sequence[Outcome]) -> list[int]:
    """Failed entries that a later entry of the same batch got past into the center.

    If such an entry was really lost (not just its ack), resending it stores it after the later
    one: an order violation, which the forwarder detects when the resend is stored fresh.
    """
    result: list[int] = []
    reached_later = False
    for index in range(len(outcomes) - 1, -1, -1):
        outcome = outcomes[index]
        if outcome in (Outcome.STORED, Outcome.DUPLICATE):
            reached_later = True
        elif outcome is Outcome.FAILED and reached_later:
            result.append(index)
    result.reverse()
    return result


def backoff_delay(failures: int, minimum: float, maximum: float) -> float:
    """Exponential: minimum, 2x, 4x ... capped at maximum (before jitter)."""
    if failures <= 0:
        return 0.0
    return float(min(maximum, minimum * 2 ** min(failures - 1, 32)))


def retry_delay(failures: int, error: BaseException | None, config: ForwarderConfig) -> float:
    """Before jitter: exponential backoff, but no longer than `unreachable_probe_s` after a
    "no responders" answer (nobody reachable: local, free to probe; it ends with the outage).
    """
    delay = backoff_delay(failures, config.backoff_min_s, config.backoff_max_s)
    if isinstance(error, NoStreamResponseError):
        return min(delay, config.unreachable_probe_s)
    return delay


class OrderWatch:
    """Spots order violations at the center from batch outcomes alone (no extra round trip).

    A failed entry that a later one of its batch overtook is "at risk"; if its resend is then
    stored fresh (not a duplicate), the center got it after the later one: a violation.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._at_risk: dict[str, None] = {}  # event ids, oldest first
        self.violations = 0

    def observe(self, event_ids: Sequence[str], outcomes: Sequence[Outcome]) -> list[str]:
        """Record one batch's outcomes; returns the event ids found stored out of order."""
        found: list[str] = []
        for event_id, outcome in zip(event_ids, outcomes, strict=True):
            if outcome is Outcome.FAILED or event_id not in self._at_risk:
                continue
            del self._at_risk[event_id]
            if outcome is Outcome.STORED:
                found.append(event_id)
        for index in overtaken(outcomes):
            self._at_risk[event_ids[index]] = None
        while len(self._at_risk) > self._capacity:
            del self._at_risk[next(iter(self._at_risk))]
        self.violations += len(found)
        return found
