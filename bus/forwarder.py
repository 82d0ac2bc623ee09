"""The replay-log forwarder: moves the site's REPLAY stream to the center's JetStream, in order.

Each entry's bytes go out unchanged with `Nats-Msg-Id` = its event id; the local ack follows the
center's ack. Guarantees and their assumptions are spelled out on `Forwarder`; its config, stats,
pure batch-outcome decisions and pull requests live in `bus.forwarding`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, NotFoundError

from bus import subjects
from bus.deadletter import DeadLetterSink
from bus.forwarding.config import ForwarderConfig
from bus.forwarding.outcomes import (
    NoStreamAtCenter,
    OrderWatch,
    Outcome,
    Unforwardable,
    backoff_delay,
    classify,
    describe,
    no_stream_despite_link,
    overtaken,
    reached_center,
    retry_delay,
    settled_prefix,
)
from bus.forwarding.puller import Puller, PullError
from bus.forwarding.sender import CenterSender, Outgoing
from bus.forwarding.stats import BacklogStats, ForwarderStats, RateMeter
from bus.log import get_logger
from bus.replaylog import (
    CENTER_ID_HEADER,
    EVENT_ID_HEADER,
    FORWARDER_CONSUMER,
    MSG_ID_HEADER,
    STREAM,
)

# Re-exported: callers and tests import these from `bus.forwarder`.
__all__ = [
    "DEAD_LETTER_COMPONENT",
    "DEAD_LETTER_REASON",
    "BacklogStats",
    "Forwarder",
    "ForwarderConfig",
    "ForwarderStats",
    "NoStreamAtCenter",
    "OrderWatch",
    "Outcome",
    "Unforwardable",
    "backoff_delay",
    "classify",
    "describe",
    "no_stream_despite_link",
    "overtaken",
    "reached_center",
    "retry_delay",
    "settled_prefix",
]

DEAD_LETTER_COMPONENT = "forwarder"
DEAD_LETTER_REASON = "rejected_by_center"
NO_STREAM_REASON = "no_stream_at_center"
EXTEND_FETCH_S = 0.2  # how long to wait for newer entries behind a head with no stream
PURGE_AT_LEAST = 8  # settled entries removed with one purge rather than an ack each


@dataclass(slots=True)
class _Entry:
    msg: Msg
    seq: int
    gap: int  # entries missing (dropped) between the previous settled one and this one
    # What the center dedups it by (its `Nats-Msg-Id`): the event id, or the device's own
    # message key where the entry has one (`CENTER_ID_HEADER`).
    event_id: str
    # Never sent to the center by anyone (first delivery, not re-sent by us): it cannot be a
    # duplicate there, so it may go in a fast batch, whose acks do not tell duplicates apart.
    fresh: bool = True

    @property
    def kind(self) -> str:
        """The entry's kind: `replay.<site>.<kind>...` (entries of a kind share a stream)."""
        parts = self.msg.subject.split(".", 3)
        return parts[2] if len(parts) > 2 else ""


async def _sleep_unless_stopped(stop: asyncio.Event, delay: float) -> None:
    if delay <= 0:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay)


class Forwarder:
    """Moves the REPLAY stream of one site to the center, batch by batch, in stream order.

    Guarantees, given one forwarder per site and a center duplicate window (6 h) longer than
    any outage + ack_wait:
    - an entry is acked locally only after the center acked it: a crash re-sends, never loses;
    - re-sends are absorbed by the center's dedup on `Nats-Msg-Id` = event id;
    - the center gets entries in stream order (so per key/device): a batch is acked up to its
      first failure; the rest stays in hand (unacked, kept alive with +WPI) and is retried by
      this forwarder itself, one entry at a time until one gets through, then all of it,
      before anything new is fetched. An entry is never sent while an older one is still
      unacked elsewhere (a killed forwarder's batch): it waits for that redelivery instead.
      Any violation that still happens is detected and counted (`order_violations`).
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
        self._sender = CenterSender(nc, self.config, self.site)
        self._puller = Puller(nc, STREAM, FORWARDER_CONSUMER)
        self._log = get_logger("forwarder", site=self.site)
        # Highest stream sequence settled (forwarded, dead-lettered or known dropped); every
        # entry at or below it is done. None until read from the consumer's ack floor.
        self._watermark: int | None = None
        self._ack_wait_s = 30.0  # the consumer's, read with the watermark
        # Delivered to us, in order, not yet at the center: retried before any fetch.
        self._held: list[_Entry] = []
        self._inflight: list[_Entry] = []  # the batch being published right now
        self._probing = True  # the link may just be coming up: start with one entry
        # Event ids answered "no responders" while a later entry reached the center: times.
        self._no_stream: dict[str, int] = {}
        # Since when the held head is answered "no responders" (None: it is not).
        self._head_unanswered_since: float | None = None
        self._order = OrderWatch(capacity=4 * self.config.batch_size)
        self._rate = RateMeter()
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
        self._dropped = 0
        self._fetches = 0
        self._pulls = 0
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
            order_violations=self._order.violations,
            dropped_seen=self._dropped,
            fetches=self._fetches,
            pulls=self._pulls,
            publishes=self._publishes,
            batched=self._sender.batched,
            redelivery_waits=self._redelivery_waits,
            probing=self._probing,
        )

    async def backlog(self) -> BacklogStats:
        """Read the log's JetStream state (two or three local API calls).

        The stream is read before the consumer, so `depth == 0` means every entry up to
        `last_seq` is settled (one appended between the two reads only adds to depth)."""
        stream = await self._js.stream_info(STREAM)
        consumer = await self._js.consumer_info(STREAM, FORWARDER_CONSUMER)
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
        # been forwarded: dropped. Those in our hands right now are not counted.
        # Entries in our hands are not lost even if the log dropped them meanwhile: we have
        # their bytes and they go out next.
        gone_below = state.first_seq - 1
        hand = {entry.seq for entry in (*self._held, *self._inflight)}  # may overlap
        in_hand = sum(1 for seq in hand if watermark < seq <= gone_below)
        return BacklogStats(
            depth=depth,
            messages=state.messages,
            bytes=state.bytes,
            max_bytes=stream.config.max_bytes if stream.config.max_bytes is not None else -1,
            oldest_unsent_age_s=age,
            dropped=self._dropped + max(0, gone_below - watermark - in_hand),
            first_seq=state.first_seq,
            last_seq=state.last_seq,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until `stop` is set; never raises for link, center or log failures."""
        await self._sender.start()
        await self._puller.start()
        self._rate = RateMeter()
        self._log.info("forwarder_started", batch_size=self.config.batch_size)
        try:
            while not stop.is_set():
                try:
                    delay = await self._step(stop)
                except Exception as exc:  # a bug or an unforeseen error: keep forwarding
                    self._log.exception("forwarder_step_failed")
                    delay = self._failure(f"unexpected: {exc!r}")
                if delay > 0:
                    await self._sleep_holding(stop, delay)
        finally:
            # Hand back what we hold, in order, so a successor gets it at once.
            await self._nak_all([entry.msg for entry in self._held])
            self._held = []
            await self._puller.close()
            await self._sender.close()
            self._log.info("forwarder_stopped", forwarded=self._forwarded)

    # -- one iteration -----------------------------------------------------------------

    async def _step(self, stop: asyncio.Event) -> float:
        """Forward one batch; returns how long to back off before the next one."""
        if self._held:
            if self._probing and self._head_unanswered_since is not None:
                return await self._forward(await self._head_and_witness(stop))
            # After a failure: the oldest held entry alone until one gets through, then all.
            return await self._forward(self._held[:1] if self._probing else self._held)
        if self._watermark is None:
            try:
                info = await self._js.consumer_info(STREAM, FORWARDER_CONSUMER)
            except Exception as exc:
                return self._local_failure(f"replay log not readable: {exc!r}")
            self._watermark = info.ack_floor.stream_seq if info.ack_floor else 0
            self._ack_wait_s = float(info.config.ack_wait or self._ack_wait_s)
            if self.config.publish_timeout_s > self._ack_wait_s / 2:
                # A batch could then be redelivered while its center acks are still awaited.
                self._log.warning(
                    "publish_timeout_too_long",
                    publish_timeout_s=self.config.publish_timeout_s,
                    ack_wait_s=self._ack_wait_s,
                )
        size = 1 if self._probing else self.config.batch_size
        self._pulls += 1
        try:
            msgs = await self._puller.fetch(size, self.config.fetch_timeout_s, stop)
        except PullError as exc:
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
        except Exception as exc:  # left unacked: they come back after ack_wait, in order
            return self._local_failure(f"replay log not readable: {exc!r}")
        delay = await self._forward(ready) if ready else 0.0
        if blocked:
            return self._wait_for_redelivery(blocked)
        return delay

    async def _head_and_witness(self, stop: asyncio.Event) -> list[_Entry]:
        """The held head, plus the first held entry of another kind (fetching newer entries
        for one if none is held): if the head is again "no responders" while the witness
        reaches the center, the center has no stream for the head (see `_forward`). Should
        the head be merely unlucky (a link healing between the two), the witness overtakes
        it: counted by the order watch, as for any batch."""
        head = self._held[0]
        witness = next((e for e in self._held[1:] if e.kind != head.kind), None)
        since = self._head_unanswered_since
        if (
            witness is None
            and len(self._held) < self.config.batch_size
            and since is not None
            and time.monotonic() - since >= self.config.witness_fetch_after_s
        ):
            await self._hold_newer(stop)
            witness = next((e for e in self._held[1:] if e.kind != head.kind), None)
        if witness is None:
            return [head]
        return self._held[: self._held.index(witness) + 1]

    async def _hold_newer(self, stop: asyncio.Event) -> None:
        """Fetch entries newer than the held ones and hold them too (in order, behind)."""
        room = self.config.batch_size - len(self._held)
        try:
            msgs = await self._puller.fetch(
                room, min(EXTEND_FETCH_S, self.config.fetch_timeout_s), stop
            )
            ready, _ = await self._in_order(msgs, after=self._held[-1].seq) if msgs else ([], 0)
        except Exception as exc:  # left unacked: they come back after ack_wait, in order
            self._log.warning("replay_log_failure", error=repr(exc))
            return
        self._held.extend(ready)

    async def _in_order(
        self, msgs: list[Msg], after: int | None = None
    ) -> tuple[list[_Entry], int]:
        """The entries that may go now, in stream order, and (if any) the blocking older seq.

        An entry may go only if every entry between the watermark and it is gone (dropped by
        the log's limits, counted) -- not merely delivered to someone else: a forwarder killed
        mid-batch leaves its entries unacked until ack_wait, and meanwhile the consumer hands
        us newer ones. Those are left unacked too (they expire after the older ones).
        """
        assert self._watermark is not None
        previous = self._watermark if after is None else after
        ready: list[_Entry] = []
        seqs = [_stream_seq(msg) for msg in msgs]
        if any(a > b for a, b in itertools.pairwise(seqs)):  # redeliveries can come unsorted
            pairs = sorted(zip(seqs, msgs, strict=True), key=lambda pair: pair[0])
            seqs, msgs = [seq for seq, _ in pairs], [msg for _, msg in pairs]
        for seq, msg in zip(seqs, msgs, strict=True):
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
            event_id = (
                headers.get(CENTER_ID_HEADER)
                or headers.get(EVENT_ID_HEADER)
                or headers.get(MSG_ID_HEADER)
                or ""
            )
            ready.append(_Entry(msg, seq, gap, event_id, fresh=_first_delivery(msg)))
            previous = seq
        return ready, 0

    async def _forward(self, entries: list[_Entry]) -> float:
        """Publish `entries` (the oldest in hand), ack the settled prefix, hold the rest."""
        self._publishes += len(entries)
        self._inflight = entries
        try:
            results = self._prove_missing_streams(entries, await self._send(entries))
            outcomes = [classify(result) for result in results]
            settled = settled_prefix(outcomes)
            self._check_order(entries, outcomes)
            settled = await self._dead_letter_rejected(entries, results, outcomes, settled)
            acked = await self._remove_settled(entries[:settled])
            # `entries` is either the head of what we hold or a fresh batch (nothing held).
            # Unacked entries stay in hand and go first next time; an entry whose ack could
            # not be queued is sent again (a duplicate the center absorbs).
            self._held = entries[acked:] + self._held[len(entries) :]
        finally:
            self._inflight = []
        stored = sum(1 for o in outcomes[:settled] if o is Outcome.STORED)
        duplicates = sum(1 for o in outcomes[:settled] if o is Outcome.DUPLICATE)
        self._stored += stored
        self._duplicates += duplicates
        self._forwarded += stored + duplicates
        self._rate.add(stored + duplicates)
        attempted = [r for r in results if not isinstance(r, Unforwardable)]
        if attempted:
            self._set_link(any(reached_center(result) for result in attempted), attempted)
        if self._no_stream:  # rare: only while a "no stream" entry is being proven
            for entry in entries[:settled]:
                self._no_stream.pop(entry.event_id, None)
        if settled == len(entries):
            self._succeeded()
            return 0.0
        error = results[settled]
        self._probing = True
        if not isinstance(error, NoStreamResponseError):
            self._head_unanswered_since = None
        elif self._head_unanswered_since is None or settled > 0:
            self._head_unanswered_since = time.monotonic()
        if isinstance(error, BaseException):
            return self._failure(
                f"entry seq {entries[settled].seq} not forwarded: {describe(error)}", error
            )
        return self._failure(f"entry seq {entries[settled].seq}: dead-letter store failed")

    async def _send(self, entries: list[_Entry]) -> list[PubAck | BaseException]:
        """Publish every entry; results in entry order (see `CenterSender`)."""
        results: list[PubAck | BaseException | None] = [None] * len(entries)
        outgoing: list[Outgoing] = []
        positions: list[int] = []
        for index, entry in enumerate(entries):
            try:
                if not entry.event_id:
                    raise Unforwardable("entry has no event id header")
                subject = subjects.replay_to_up(entry.msg.subject)
            except (Unforwardable, subjects.SubjectError) as exc:
                results[index] = Unforwardable(str(exc))
                continue
            outgoing.append(
                Outgoing(subject, entry.msg.data, entry.event_id, entry.kind, entry.fresh)
            )
            positions.append(index)
            entry.fresh = False  # from now on a re-send: one by one, duplicates counted
        for index, result in zip(positions, await self._sender.send(outgoing), strict=True):
            results[index] = result
        return [r if r is not None else RuntimeError("not sent") for r in results]

    async def _remove_settled(self, entries: list[_Entry]) -> int:
        """Take settled entries (the next ones in stream order) off the log, moving the
        watermark over them; returns how many, a prefix.

        A run of them goes with one purge below the last instead of an ack each: every
        entry below it is settled (this forwarder goes in stream order and is the work
        queue's only consumer), and JetStream moves the consumer's ack floor with it.
        Measured: fewer protocol messages and deletes at the agent and the site's server.
        A failed purge falls back to acks (a lost one: the entries come back after
        ack_wait, below the watermark, and are settled again without a re-send).
        """
        if len(entries) >= PURGE_AT_LEAST:
            last = entries[-1]
            try:
                await self._js.purge_stream(STREAM, seq=last.seq + 1)
            except Exception as exc:
                self._log.warning("local_purge_failed", seq=last.seq, error=repr(exc))
            else:
                self._passed(entries)
                return len(entries)
        acked = 0
        for entry in entries:
            try:
                await entry.msg.ack()
            except Exception as exc:  # not even queued (connection closed)
                self._log.warning("local_ack_failed", seq=entry.seq, error=repr(exc))
                break
            acked += 1
        self._passed(entries[:acked])
        return acked

    def _passed(self, entries: list[_Entry]) -> None:
        for entry in entries:
            self._dropped += entry.gap
        if entries:
            self._watermark = entries[-1].seq

    def _prove_missing_streams(
        self, entries: list[_Entry], results: list[PubAck | BaseException]
    ) -> list[PubAck | BaseException]:
        """Count the entries answered "no responders" while a later one reached the center;
        those proven `no_stream_proofs` times become `NoStreamAtCenter` (dead-lettered)."""
        results = list(results)
        for index in no_stream_despite_link(results):
            entry = entries[index]
            proofs = self._no_stream.get(entry.event_id, 0) + 1
            self._no_stream[entry.event_id] = proofs
            if proofs >= self.config.no_stream_proofs:
                center_subject = subjects.replay_to_up(entry.msg.subject)
                results[index] = NoStreamAtCenter(
                    f"no stream at the center stores {center_subject} ({proofs} times "
                    "answered no responders while later entries reached the center)"
                )
        if len(self._no_stream) > 4 * self.config.batch_size:  # ids long gone by now
            self._no_stream = dict(list(self._no_stream.items())[-self.config.batch_size :])
        return results

    def _check_order(self, entries: list[_Entry], outcomes: list[Outcome]) -> None:
        for event_id in self._order.observe([e.event_id for e in entries], outcomes):
            self._log.error(
                "order_violation",
                event_id=event_id,
                detail="re-sent entry stored at the center after a later one of its batch",
            )

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
                reason=NO_STREAM_REASON
                if isinstance(results[index], NoStreamAtCenter)
                else DEAD_LETTER_REASON,
                detail=describe(_as_error(results[index])),
                headers=dict(entry.msg.headers or {}),
                event_id=entry.event_id,
                seq=entry.seq,
            )
            if self._dead_letters.store_failures != failures_before:
                return index  # keep it (and what follows) in hand; retried after a backoff
            self._dead_lettered += 1
        return settled

    async def _sleep_holding(self, stop: asyncio.Event, delay: float) -> None:
        """Back off; entries in hand are kept from expiring (+WPI) at a third of ack_wait."""
        deadline = time.monotonic() + delay
        while not stop.is_set():
            for entry in self._held:
                with contextlib.suppress(Exception):
                    await entry.msg.in_progress()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await _sleep_unless_stopped(stop, min(remaining, self._ack_wait_s / 3))

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
        self._head_unanswered_since = None
        if self._waiting:
            self._log.info("redelivery_arrived", watermark=self._watermark)
            self._waiting = False
        self._consecutive = 0
        self._probing = False  # one got through: the rest of what we hold goes as one batch

    def _failure(self, error: str, cause: BaseException | None = None) -> float:
        self._failures += 1
        self._consecutive += 1
        self._last_error = error
        delay = retry_delay(self._consecutive, cause, self.config)
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
            down_since, self._link_down_since = self._link_down_since, None
            outage = None if down_since is None else round(now - down_since, 3)
            self._log.info("center_link_up", outage_s=outage, watermark=self._watermark)
        else:
            self._link_down_since = now
            error = next((r for r in results if isinstance(r, BaseException)), None)
            self._log.warning(
                "center_link_down",
                error=describe(error) if error else None,
                was_up=previous,
                watermark=self._watermark,
            )


@dataclass(frozen=True)
class _StoredHead:
    seq: int | None
    time: datetime | None


def _first_delivery(msg: Msg) -> bool:
    """Delivered for the first time (the delivery count in its ack subject is 1)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[1] == "ACK":
        return tokens[4] == "1"
    if len(tokens) >= 11 and tokens[1] == "ACK":
        return tokens[6] == "1"
    return int(msg.metadata.num_delivered or 0) == 1


def _stream_seq(msg: Msg) -> int:
    """The entry's stream sequence, read straight from its ack subject (hot path)."""
    tokens = (msg.reply or "").split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>... or, with domain and account hash,
    # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>...
    if len(tokens) == 9 and tokens[1] == "ACK":
        return int(tokens[5])
    if len(tokens) >= 11 and tokens[1] == "ACK":
        return int(tokens[7])
    return int(msg.metadata.sequence.stream)


def _as_error(result: PubAck | BaseException) -> BaseException:
    return result if isinstance(result, BaseException) else RuntimeError(str(result))
