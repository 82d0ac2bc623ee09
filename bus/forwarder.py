"""The replay-log forwarder: moves the site's REPLAY stream to the center's JetStream, in order.

Each entry's bytes go out unchanged with `Nats-Msg-Id` = its event id; the local ack follows the
center's ack. Guarantees and their assumptions are spelled out on `Forwarder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NotFoundError

from bus import subjects
from bus.deadletter import DeadLetterSink
from bus.jspublish import PipelinedPublisher
from bus.log import get_logger
from bus.replaylog import EVENT_ID_HEADER, FORWARDER_CONSUMER, MSG_ID_HEADER, STREAM

DEAD_LETTER_COMPONENT = "forwarder"
DEAD_LETTER_REASON = "rejected_by_center"
# JetStream "stream full" answers: the center must make room; never dead-letter for them.
_CENTER_FULL_ERR_CODES = frozenset({10047, 10077, 10078})
# How long past the server-side expiry a pull request may stay unanswered before we give up.
_FETCH_MARGIN_S = 2.0
_RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class ForwarderConfig:
    """Pacing of one forwarder; `batch_size` should equal the consumer's `max_ack_pending`."""

    batch_size: int = 500
    publish_timeout_s: float = 5.0  # a batch's center acks must all arrive within this
    backoff_min_s: float = 0.2
    backoff_max_s: float = 10.0
    fetch_timeout_s: float = 2.0  # long poll of an idle log (server side), not a retry pace

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_min_s <= backoff_max_s")
        if self.publish_timeout_s <= 0 or self.fetch_timeout_s <= 0:
            raise ValueError("timeouts must be positive")


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
    publishes: int  # publish attempts to the center, retries included
    redelivery_waits: int  # times an older entry was still held by a dead forwarder
    probing: bool  # after a failure: one entry at a time until one gets through


@dataclass(frozen=True)
class BacklogStats:
    """The replay log as JetStream sees it, plus what this forwarder knows of drops."""

    depth: int  # entries not yet at the center: undelivered + delivered but unacked
    messages: int
    bytes: int
    max_bytes: int  # -1: unbounded
    oldest_unsent_age_s: float | None  # None when nothing is owed
    dropped: int  # removed by the log's limits (drop-oldest, max age) before forwarding
    first_seq: int
    last_seq: int


# -- the decision over one batch's results (pure) -------------------------------------


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"  # permanent for this entry: dead-letter it, then move on
    FAILED = "failed"  # transient (link down, no stream, timeout): retry later, in order


class Unforwardable(Exception):
    """An entry that cannot even be sent (no event id, not a replay subject)."""


def classify(result: PubAck | BaseException) -> Outcome:
    if isinstance(result, PubAck):
        return Outcome.DUPLICATE if result.duplicate else Outcome.STORED
    if isinstance(result, Unforwardable | MaxPayloadError):
        return Outcome.REJECTED
    if (
        isinstance(result, APIError)
        and result.code == 400
        and result.err_code not in _CENTER_FULL_ERR_CODES
    ):
        return Outcome.REJECTED
    return Outcome.FAILED


def reached_center(result: PubAck | BaseException) -> bool:
    """A PubAck or a JetStream error reply both prove the center answered."""
    return isinstance(result, PubAck | APIError)


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


# -- pulling batches from the durable consumer ----------------------------------------


class _PullError(RuntimeError):
    def __init__(self, status: str, description: str) -> None:
        super().__init__(f"pull request answered {status} {description}".strip())
        self.status = status
        self.description = description


class _Puller:
    """One long-poll pull request per batch, on one inbox subscription.

    `no_wait` together with `expires` makes the server answer as soon as anything is available
    (then "404"), or "408" at expiry: an idle log costs one request per `wait_s`, never a spin,
    and "nothing" is an empty list rather than an exception.
    """

    def __init__(self, nc: NatsClient, stream: str, consumer: str) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._tokens = itertools.count()
        self._token = ""
        self._batch = 0
        self._msgs: list[Msg] = []
        self._status: tuple[str, str] | None = None
        self._done = asyncio.Event()
        self.stale = 0  # messages after the request was over: left to expire, never forwarded

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def fetch(self, batch: int, wait_s: float, stop: asyncio.Event) -> list[Msg]:
        self._token = str(next(self._tokens))
        self._batch = batch
        self._msgs = []
        self._status = None
        self._done = asyncio.Event()
        request = {"batch": batch, "expires": int(wait_s * 1e9), "no_wait": True}
        await self._nc.publish(
            self._api, json.dumps(request).encode(), reply=f"{self._inbox}.{self._token}"
        )
        waiters = [asyncio.ensure_future(self._done.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(
                waiters, timeout=wait_s + _FETCH_MARGIN_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        msgs, done, status = self._msgs, self._done.is_set(), self._status
        self._token = ""
        if not done:
            # Abandoned while the server may still deliver to it: a fresh inbox makes sure
            # nothing of it is ever forwarded (such entries expire after ack_wait).
            await self.close()
            await self.start()
            if not stop.is_set():
                raise TimeoutError(f"pull request unanswered after {wait_s + _FETCH_MARGIN_S:.1f}s")
        if status is not None and not msgs:
            raise _PullError(*status)
        return msgs

    async def _on_msg(self, msg: Msg) -> None:
        # Deliveries carry the entry's own subject; only status messages carry our token.
        if not self._token:
            if msg.reply:
                self.stale += 1
            return
        if not msg.reply:  # a status message: JetStream deliveries always carry an ack subject
            if msg.subject.rpartition(".")[2] != self._token:
                return
            headers = msg.headers or {}
            status = headers.get("Status", "")
            if status == "100":  # idle heartbeat
                return
            if status not in ("404", "408"):
                self._status = (status, headers.get("Description", ""))
            self._done.set()
            return
        self._msgs.append(msg)
        if len(self._msgs) >= self._batch:
            self._done.set()


# -- the forwarder -------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    msg: Msg
    seq: int
    gap: int  # entries missing (dropped) between the previous settled one and this one
    event_id: str


class _RateMeter:
    """Events per second over a sliding window (1 s buckets)."""

    def __init__(self, window_s: float = _RATE_WINDOW_S) -> None:
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


async def _sleep_unless_stopped(stop: asyncio.Event, delay: float) -> None:
    if delay <= 0:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay)


class Forwarder:
    """Moves the REPLAY stream of one site to the center, batch by batch, in stream order.

    Guarantees, given one forwarder per site and the center's duplicate window (6 h) covering
    outage + ack_wait:
    - nothing is acked locally before the center acked it (so a crash re-sends, never loses);
    - re-sends are absorbed by the center's dedup on `Nats-Msg-Id` = event id;
    - the center receives entries in stream order (hence per-key/device order): a batch is
      acked up to its first failure and the rest nak'ed in order; after any failure one entry
      at a time is sent until one gets through; and an entry is never sent while an older one
      is still held unacked elsewhere (a killed forwarder's batch): it waits for the
      redelivery instead. Any remaining violation is detected and counted.
    """

    def __init__(
        self,
        nc: NatsClient,
        site: str,
        config: ForwarderConfig | None = None,
        dead_letters: DeadLetterSink | None = None,
    ) -> None:
        self.site = subjects.site_id(site)
        self.config = config or ForwarderConfig()
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._dead_letters = dead_letters or DeadLetterSink(self._js, self.site)
        self._filter = subjects.replay_all(self.site)
        self._publisher = PipelinedPublisher(nc)
        self._puller = _Puller(nc, STREAM, FORWARDER_CONSUMER)
        self._log = get_logger("forwarder", site=self.site)
        # Highest stream sequence settled (forwarded, dead-lettered or known dropped); every
        # entry at or below it is done. None until read from the consumer's ack floor.
        self._watermark: int | None = None
        self._inflight_low: int | None = None
        self._probing = True  # the link may just be coming up: start with one entry
        # Event ids of failed entries a later entry overtook (see `overtaken`), oldest first.
        self._at_risk: dict[str, None] = {}
        self._rate = _RateMeter()
        self._link_up: bool | None = None
        self._link_down_since: float | None = None
        self._waiting = False
        self._forwarded = 0
        self._stored = 0
        self._duplicates = 0
        self._dead_lettered = 0
        self._failures = 0
        self._consecutive = 0
        self._last_error: str | None = None
        self._order_violations = 0
        self._dropped = 0
        self._fetches = 0
        self._publishes = 0
        self._redelivery_waits = 0

    # -- public ----------------------------------------------------------------------

    def stats(self) -> ForwarderStats:
        return ForwarderStats(
            forwarded=self._forwarded,
            stored_at_center=self._stored,
            duplicates_at_center=self._duplicates,
            dead_lettered=self._dead_lettered,
            failures=self._failures,
            consecutive_failures=self._consecutive,
            last_error=self._last_error,
            link_up=self._link_up,
            rate_per_s=self._rate.rate(),
            order_violations=self._order_violations,
            dropped_seen=self._dropped,
            fetches=self._fetches,
            publishes=self._publishes,
            redelivery_waits=self._redelivery_waits,
            probing=self._probing,
        )

    async def backlog(self) -> BacklogStats:
        """Read the log's JetStream state (two or three local API calls)."""
        consumer = await self._js.consumer_info(STREAM, FORWARDER_CONSUMER)
        stream = await self._js.stream_info(STREAM)
        state = stream.state
        ack_floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        depth = int(consumer.num_pending or 0) + int(consumer.num_ack_pending or 0)
        watermark = self._watermark if self._watermark is not None else ack_floor
        age: float | None = None
        if depth > 0 and state.messages > 0:
            oldest = await self._next_stored(max(state.first_seq, ack_floor + 1, watermark + 1))
            if oldest is not None and oldest.time is not None:
                age = max(0.0, (datetime.now(UTC) - oldest.time).total_seconds())
        # Entries between the watermark and the first stored one are gone without having
        # been forwarded: dropped. Those in flight right now are not counted yet.
        gone_below = state.first_seq - 1
        if self._inflight_low is not None:
            gone_below = min(gone_below, self._inflight_low - 1)
        return BacklogStats(
            depth=depth,
            messages=state.messages,
            bytes=state.bytes,
            max_bytes=stream.config.max_bytes if stream.config.max_bytes is not None else -1,
            oldest_unsent_age_s=age,
            dropped=self._dropped + max(0, gone_below - watermark),
            first_seq=state.first_seq,
            last_seq=state.last_seq,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until `stop` is set; never raises for link, center or log failures."""
        await self._publisher.start()
        await self._puller.start()
        self._log.info("forwarder_started", batch_size=self.config.batch_size)
        try:
            while not stop.is_set():
                delay = await self._step(stop)
                if delay > 0:
                    await _sleep_unless_stopped(stop, delay)
        finally:
            await self._puller.close()
            await self._publisher.close()
            self._log.info("forwarder_stopped", forwarded=self._forwarded)

    # -- one iteration -----------------------------------------------------------------

    async def _step(self, stop: asyncio.Event) -> float:
        """Forward one batch; returns how long to back off before the next one."""
        if self._watermark is None:
            try:
                info = await self._js.consumer_info(STREAM, FORWARDER_CONSUMER)
            except Exception as exc:
                return self._local_failure(f"replay log not readable: {exc!r}")
            self._watermark = info.ack_floor.stream_seq if info.ack_floor else 0
        size = 1 if self._probing else self.config.batch_size
        try:
            msgs = await self._puller.fetch(size, self.config.fetch_timeout_s, stop)
        except _PullError as exc:
            if "consumer deleted" in exc.description.lower():
                self._watermark = None
            return self._local_failure(str(exc))
        except Exception as exc:
            return self._local_failure(f"fetch failed: {exc!r}")
        if not msgs:
            return 0.0
        self._fetches += 1
        try:
            ready, blocked = await self._in_order(msgs)
        except Exception as exc:
            await self._nak_all(sorted(msgs, key=_stream_seq))
            return self._local_failure(f"replay log not readable: {exc!r}")
        delay = await self._forward(ready) if ready else 0.0
        if blocked:
            return self._wait_for_redelivery(blocked)
        return delay

    async def _in_order(self, msgs: list[Msg]) -> tuple[list[_Entry], int]:
        """The entries that may go now, in stream order, and (if any) the blocking older seq.

        An entry may go only if every entry between the watermark and it is gone (dropped by
        the log's limits, counted) — not merely delivered to someone else: a forwarder killed
        mid-batch leaves its entries unacked until ack_wait, and meanwhile the consumer hands
        us newer ones. Those are left unacked too (they expire after the older ones).
        """
        assert self._watermark is not None
        previous = self._watermark
        ready: list[_Entry] = []
        for msg in sorted(msgs, key=_stream_seq):
            seq = _stream_seq(msg)
            if seq <= self._watermark:
                # Forwarded already; its ack never reached the server. Settle it again.
                await msg.ack()
                continue
            if seq <= previous:
                continue
            gap = seq - previous - 1
            if gap > 0:
                oldest = await self._next_stored(previous + 1)
                if oldest is not None and oldest.seq is not None and oldest.seq < seq:
                    return ready, oldest.seq
            headers = msg.headers or {}
            event_id = headers.get(EVENT_ID_HEADER) or headers.get(MSG_ID_HEADER) or ""
            ready.append(_Entry(msg, seq, gap, event_id))
            previous = seq
        return ready, 0

    async def _forward(self, entries: list[_Entry]) -> float:
        futures: list[asyncio.Future[PubAck]] = []
        for entry in entries:
            try:
                if not entry.event_id:
                    raise Unforwardable("entry has no event id header")
                subject = subjects.replay_to_up(entry.msg.subject)
            except (Unforwardable, subjects.SubjectError) as exc:
                futures.append(_failed_future(Unforwardable(str(exc))))
                continue
            futures.append(
                await self._publisher.publish(
                    subject, entry.msg.data, {MSG_ID_HEADER: entry.event_id}
                )
            )
        self._publishes += len(entries)
        self._inflight_low = entries[0].seq
        try:
            results = await self._publisher.wait(futures, self.config.publish_timeout_s)
            outcomes = [classify(result) for result in results]
            settled = settled_prefix(outcomes)
            self._check_order(entries, outcomes, settled)
            settled = await self._dead_letter_rejected(entries, results, outcomes, settled)
            # Acks and naks are queued back to back, with no await that yields in between,
            # so they leave in one write: a kill cannot ack a prefix yet strand the naks.
            for entry in entries[:settled]:
                await entry.msg.ack()
                self._dropped += entry.gap
                self._watermark = entry.seq
            await self._nak_all([entry.msg for entry in entries[settled:]])
        finally:
            self._inflight_low = None
        stored = sum(1 for o in outcomes[:settled] if o is Outcome.STORED)
        duplicates = sum(1 for o in outcomes[:settled] if o is Outcome.DUPLICATE)
        self._stored += stored
        self._duplicates += duplicates
        self._forwarded += stored + duplicates
        self._rate.add(stored + duplicates)
        self._set_link(any(reached_center(result) for result in results), results)
        if settled == len(entries):
            self._succeeded()
            return 0.0
        error = results[settled]
        self._probing = True
        return self._failure(
            f"entry seq {entries[settled].seq} not forwarded: {error!r}"
            if isinstance(error, BaseException)
            else f"entry seq {entries[settled].seq}: dead-letter store failed"
        )

    def _check_order(
        self, entries: list[_Entry], outcomes: list[Outcome], settled: int
    ) -> None:
        for entry, outcome in zip(entries[:settled], outcomes[:settled], strict=True):
            if entry.event_id in self._at_risk:
                del self._at_risk[entry.event_id]
                if outcome is Outcome.STORED:
                    self._order_violations += 1
                    self._log.error(
                        "order_violation",
                        event_id=entry.event_id,
                        seq=entry.seq,
                        detail="re-sent entry stored after a later one of its first batch",
                    )
        for index in overtaken(outcomes):
            self._at_risk[entries[index].event_id] = None
        while len(self._at_risk) > 4 * self.config.batch_size:
            del self._at_risk[next(iter(self._at_risk))]

    async def _dead_letter_rejected(
        self,
        entries: list[_Entry],
        results: list[PubAck | BaseException],
        outcomes: list[Outcome],
        settled: int,
    ) -> int:
        """Dead-letter rejected entries of the settled prefix; shortens it if a store fails."""
        for index in range(settled):
            if outcomes[index] is not Outcome.REJECTED:
                continue
            entry = entries[index]
            failures_before = self._dead_letters.store_failures
            await self._dead_letters.record(
                component=DEAD_LETTER_COMPONENT,
                subject=entry.msg.subject,
                data=entry.msg.data,
                reason=DEAD_LETTER_REASON,
                detail=repr(results[index]),
                headers=dict(entry.msg.headers or {}),
                event_id=entry.event_id,
                seq=entry.seq,
            )
            if self._dead_letters.store_failures != failures_before:
                return index  # keep it (and what follows) in the log; retried after a backoff
            self._dead_lettered += 1
        return settled

    async def _nak_all(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _next_stored(self, from_seq: int) -> _StoredHead | None:
        """The first entry still in the log at or after `from_seq`, or None."""
        try:
            raw = await self._js.get_msg(STREAM, seq=from_seq, subject=self._filter, next=True)
        except NotFoundError:
            return None
        return _StoredHead(seq=raw.seq, time=raw.time)

    # -- state transitions -------------------------------------------------------------

    def _succeeded(self) -> None:
        if self._waiting:
            self._log.info("redelivery_arrived", watermark=self._watermark)
            self._waiting = False
        self._consecutive = 0
        self._probing = False

    def _failure(self, error: str) -> float:
        self._failures += 1
        self._consecutive += 1
        self._last_error = error
        delay = backoff_delay(
            self._consecutive, self.config.backoff_min_s, self.config.backoff_max_s
        )
        return delay * random.uniform(0.8, 1.0)

    def _local_failure(self, error: str) -> float:
        if self._consecutive == 0:
            self._log.warning("replay_log_failure", error=error)
        return self._failure(error)

    def _wait_for_redelivery(self, blocking_seq: int) -> float:
        """An older entry is still held unacked by a gone forwarder: wait for its ack_wait."""
        self._redelivery_waits += 1
        if not self._waiting:
            self._waiting = True
            self._log.warning(
                "waiting_for_redelivery",
                blocking_seq=blocking_seq,
                detail="an older entry is still unacked elsewhere; newer ones wait for it",
            )
        self._consecutive += 1
        self._last_error = f"entry seq {blocking_seq} still held by a previous delivery"
        return backoff_delay(
            self._consecutive, self.config.backoff_min_s, self.config.backoff_max_s
        )

    def _set_link(self, up: bool, results: list[PubAck | BaseException]) -> None:
        if up == self._link_up:
            return
        previous, self._link_up = self._link_up, up
        now = time.monotonic()
        if up:
            outage = None if self._link_down_since is None else round(now - self._link_down_since, 3)
            self._link_down_since = None
            self._log.info("center_link_up", outage_s=outage, watermark=self._watermark)
        else:
            self._link_down_since = now
            error = next((r for r in results if isinstance(r, BaseException)), None)
            self._log.warning(
                "center_link_down", error=repr(error), was_up=previous, watermark=self._watermark
            )


@dataclass(frozen=True)
class _StoredHead:
    seq: int | None
    time: datetime | None


def _stream_seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


def _failed_future(exc: BaseException) -> asyncio.Future[PubAck]:
    future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future
