"""The ingest worker: raw device messages (site stream INGEST) become logged, published readings.

Durable pull consumer, batched and pipelined; a raw message is acked only once its outcome
(logged reading, refusal counted, or dead letter) is settled, so a crash loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus import subjects
from bus.client import Bus
from bus.log import get_logger
from bus.pullfeed import PullFeed
from bus.replaylog import AppendResult, AppendStatus, LogEntry, ReplayLog
from bus.streams import site_ingest_stream
from edge_agent.config import AgentConfig
from edge_agent.ingest.convert import (
    IngestLimits,
    Rejection,
    device_message_key,
    reading_from_device_message,
)
from edge_agent.ingest.ordering import SequenceGate
from schemas import REGISTRY, Event

CONSUMER = "ingest"
COMPONENT = "ingest"
READING_KIND = "reading"
INGEST_STREAM = site_ingest_stream().name
_SUBJECT_CACHE_SIZE = 50_000
# Distinct devices are counted exactly up to this many; past it the count stays at the cap
# (a site with more devices reports the cap): memory stays bounded whatever devices send.
MAX_TRACKED_DEVICES = 100_000
_REFUSED_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class IngestTuning:
    """Pacing of the worker; defaults suit a site taking ~10k device messages per second."""

    batch_size: int = 500
    # Raw messages delivered but not yet acked, at most: bounds the worker's memory. Room
    # for the batch being appended, the one being converted, and one arriving.
    max_ack_pending: int = 2000
    ack_wait_s: float = 30.0
    fetch_timeout_s: float = 0.5
    # Server-side life of one pull request; short, so a dead instance's request ends soon.
    pull_expires_s: float = 2.0
    retry_min_s: float = 0.2
    retry_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_ack_pending < self.batch_size:
            raise ValueError("need 1 <= batch_size <= max_ack_pending")


@dataclass(frozen=True)
class IngestStats:
    """A snapshot of the worker's counters since it was created."""

    received: int = 0
    ingested: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    duplicates: int = 0
    redelivered: int = 0
    append_retries: int = 0
    published_local: int = 0
    batches: int = 0
    order_waits: int = 0
    devices_seen: int = 0  # distinct devices with a valid reading; capped (MAX_TRACKED_DEVICES)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "ingested": self.ingested,
            "rejected": dict(self.rejected),
            "refused": self.refused,
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "append_retries": self.append_retries,
            "published_local": self.published_local,
            "batches": self.batches,
            "order_waits": self.order_waits,
            "devices_seen": self.devices_seen,
        }


@dataclass(slots=True)
class _Accepted:
    """One raw message that became a reading event, with what the worker needs afterwards."""

    msg: Msg
    entry: LogEntry
    local_subject: str
    payload: bytes  # the event, encoded once: logged and published locally as these bytes


@dataclass(slots=True)
class _Batch:
    accepted: list[_Accepted] = field(default_factory=list)
    rejected: list[tuple[Msg, Rejection]] = field(default_factory=list)


class _Counters:
    def __init__(self) -> None:
        self.received = 0
        self.ingested = 0
        self.rejected: Counter[str] = Counter()
        self.refused = 0
        self.duplicates = 0
        self.redelivered = 0
        self.append_retries = 0
        self.published_local = 0
        self.batches = 0
        self.order_waits = 0
        self.devices: set[str] = set()

    def see_device(self, device: str) -> None:
        if len(self.devices) < MAX_TRACKED_DEVICES:
            self.devices.add(device)

    def snapshot(self) -> IngestStats:
        return IngestStats(
            received=self.received,
            ingested=self.ingested,
            rejected=dict(self.rejected),
            refused=self.refused,
            duplicates=self.duplicates,
            redelivered=self.redelivered,
            append_retries=self.append_retries,
            published_local=self.published_local,
            batches=self.batches,
            order_waits=self.order_waits,
            devices_seen=len(self.devices),
        )


def delivery_of(ack_subject: str) -> tuple[int, int]:
    """(delivery count, stream sequence) from a JetStream ack subject, old or new format.

    Cheaper than nats-py's `msg.metadata`, which also parses a timestamp we do not need.
    """
    tokens = ack_subject.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...
    offset = 4 if len(tokens) == 9 else 6
    return int(tokens[offset]), int(tokens[offset + 1])


def ingest_consumer_config(tuning: IngestTuning) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=tuning.ack_wait_s,
        max_ack_pending=tuning.max_ack_pending,
        max_deliver=-1,
    )


class IngestWorker:
    """Reads INGEST in batches: convert, append to the replay log, publish locally, ack.

    Order: deliveries pass a `SequenceGate` (stream order, even across redeliveries), and
    batches are appended one after another on one connection, so readings of one device
    reach the replay log (and local subscribers) in the order the device sent them.
    """

    def __init__(
        self,
        bus: Bus,
        replay_log: ReplayLog,
        config: AgentConfig,
        tuning: IngestTuning | None = None,
    ) -> None:
        self.bus = bus
        self.replay_log = replay_log
        self.config = config
        self.site = subjects.site_id(config.site)
        self.tuning = tuning or IngestTuning()
        self.limits = config.ingest  # replaced live by config sync (`set_limits`)
        self._counters = _Counters()
        self._local_subjects: dict[tuple[str, str], str] = {}
        self._last_keepalive = 0.0
        self._last_refused_log = -_REFUSED_LOG_INTERVAL_S
        self._log = get_logger("edge_agent.ingest", site=self.site)

    def stats(self) -> IngestStats:
        return self._counters.snapshot()

    def set_limits(self, limits: IngestLimits) -> None:
        """New limits for every message converted from now on."""
        self.limits = limits
        self._log.info(
            "ingest_limits_applied",
            max_payload_bytes=limits.max_payload_bytes,
            message_id_field=limits.message_id_field,
        )

    def device_count(self) -> int:
        """Distinct devices seen since start, at most `MAX_TRACKED_DEVICES` (cheap)."""
        return len(self._counters.devices)

    # -- lifecycle -------------------------------------------------------------------

    async def declare(self) -> None:
        """Create (or bring to this spec) the durable consumer; the INGEST stream must exist."""
        await self.bus.js.add_consumer(INGEST_STREAM, config=ingest_consumer_config(self.tuning))

    async def run(self, stop: asyncio.Event) -> None:
        """Ingest until `stop` is set; raises if the consumer cannot be declared or is lost."""
        await self.declare()
        info = await self.bus.js.consumer_info(INGEST_STREAM, CONSUMER)
        gate: SequenceGate[Msg] = SequenceGate(next_seq=info.ack_floor.stream_seq + 1)
        feed = PullFeed(
            self.bus.nc,
            INGEST_STREAM,
            CONSUMER,
            batch=self.tuning.batch_size,
            expires_s=self.tuning.pull_expires_s,
        )
        await feed.start()
        self._log.info("ingest_started", batch_size=self.tuning.batch_size)
        # Two-stage pipeline: batch N+1 is converted while batch N's appends are in flight.
        # N+1 is appended only once N is settled, so order holds even when N is retried.
        completing: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                msgs = await feed.next_batch(self.tuning.batch_size, self.tuning.fetch_timeout_s)
                ready = self._in_order(gate, msgs)
                if not ready and gate.blocked_at is not None:
                    ready = await self._resolve_gap(gate)
                if not ready:
                    continue
                batch = self._prepare(ready)
                if completing is not None:
                    await completing
                completing = asyncio.create_task(self._complete(batch, stop))
            if completing is not None:
                await completing
        finally:
            if completing is not None and not completing.done():
                completing.cancel()
                await asyncio.gather(completing, return_exceptions=True)
            # Held back behind a gap: give them back now rather than after their ack_wait.
            await self._nak_all(gate.waiting())
            await feed.stop()
            self._log.info("ingest_stopped", **self.stats().as_dict())

    # -- stream order ----------------------------------------------------------------

    @staticmethod
    def _in_order(gate: SequenceGate[Msg], msgs: Sequence[Msg]) -> list[Msg]:
        for msg in msgs:
            gate.offer(delivery_of(msg.reply)[1], msg)
        return gate.release()

    async def _resolve_gap(self, gate: SequenceGate[Msg]) -> list[Msg]:
        """Newer messages wait behind a missing one: skip it if it is gone from INGEST,
        otherwise keep waiting (it is held by an earlier delivery and comes back after
        its ack_wait; JetStream redelivers in no particular order)."""
        missing, lowest = gate.blocked_at, gate.lowest_waiting
        assert missing is not None and lowest is not None
        try:
            stored = await self.bus.js.get_msg(
                INGEST_STREAM, seq=missing, next=True, subject=subjects.device_raw_any()
            )
            first_stored: int | None = stored.seq
        except NotFoundError:
            first_stored = None
        if first_stored is None or first_stored >= lowest:
            gate.skip_to(lowest)
            return gate.release()
        now = time.monotonic()
        if now - self._last_keepalive >= self.tuning.ack_wait_s / 3:
            self._last_keepalive = now
            self._counters.order_waits += 1
            self._log.warning(
                "waiting_for_older_message",
                missing_seq=first_stored,
                waiting=len(gate),
                detail="an older device message is held by an earlier delivery",
            )
            await self._in_progress_all(gate.waiting())
        return []

    # -- one batch -------------------------------------------------------------------

    def _prepare(self, msgs: Sequence[Msg]) -> _Batch:
        """Convert every raw message (pure CPU: no I/O, no awaits)."""
        counters = self._counters
        counters.batches += 1
        counters.received += len(msgs)
        batch = _Batch()
        for msg in msgs:
            outcome = self._convert(msg)
            if isinstance(outcome, Rejection):
                batch.rejected.append((msg, outcome))
            else:
                batch.accepted.append(outcome)
        return batch

    async def _complete(self, batch: _Batch, stop: asyncio.Event) -> None:
        """Dead-letter, append, publish locally, then ack: nothing is acked before it is safe."""
        settled_rejects = await self._dead_letter_all(batch.rejected)
        accepted = batch.accepted
        if accepted:
            results = await self._append(accepted, stop)
            if results is None:  # stopping while the log is unreachable: redelivered later
                await self._nak_all([a.msg for a in accepted])
                await self._ack_all(settled_rejects)
                return
            self._count_results(results)
            await self._publish_local(accepted)
        await self._ack_all([a.msg for a in accepted])
        await self._ack_all(settled_rejects)

    def _convert(self, msg: Msg) -> _Accepted | Rejection:
        delivered, stream_seq = delivery_of(msg.reply)
        if delivered > 1:
            self._counters.redelivered += 1
        outcome = reading_from_device_message(self.site, msg.subject, msg.data, self.limits)
        if isinstance(outcome, Rejection):
            return outcome
        device, channel = outcome.device, outcome.channel
        self._counters.see_device(device)
        event: Event[Any] = self.bus.event(outcome, subject=f"{device}/{channel}")
        payload = REGISTRY.encode(event)
        # The device's own message id if it sends one (a QoS 1 re-send is then a duplicate),
        # else the raw message's stream sequence: re-ingesting it after a crash (append done,
        # ack lost) is a duplicate in the replay log, not a second reading.
        dedup_id = device_message_key(outcome, self.limits.message_id_field)
        entry = LogEntry(
            kind=READING_KIND,
            key=device,
            event=event,
            dedup_id=dedup_id or f"ingest-{stream_seq}",
            encoded=payload,
            # The center dedups by it too: a re-send after the site server restarted (its
            # work queue keeps no ids of entries already forwarded) is dropped there.
            center_id=dedup_id,
        )
        return _Accepted(msg, entry, self._local_subject(device, channel), payload)

    def _local_subject(self, device: str, channel: str) -> str:
        """`evt.<site>.reading.<device>.<channel>`, memoised: building it validates 4 tokens."""
        key = (device, channel)
        subject = self._local_subjects.get(key)
        if subject is None:
            if len(self._local_subjects) >= _SUBJECT_CACHE_SIZE:
                self._local_subjects.clear()
            subject = subjects.site_readings(self.site, device, channel)
            self._local_subjects[key] = subject
        return subject

    async def _dead_letter_all(self, rejected: list[tuple[Msg, Rejection]]) -> list[Msg]:
        """Store each rejection; the messages whose dead letter is stored (safe to ack)."""
        if not rejected:
            return []
        sink = self.bus.dead_letters
        failures_before = sink.store_failures
        await asyncio.gather(
            *(
                sink.record(
                    component=COMPONENT,
                    subject=msg.subject,
                    data=msg.data,
                    reason=rejection.reason,
                    detail=rejection.detail,
                    headers=dict(msg.headers or {}),
                    site=self.site,
                )
                for msg, rejection in rejected
            )
        )
        for _, rejection in rejected:
            self._counters.rejected[rejection.reason] += 1
        if sink.store_failures == failures_before:
            return [msg for msg, _ in rejected]
        # Some dead letter was not stored (we cannot tell which): keep all of this batch's
        # rejects in INGEST; they come back after a delay and are dead-lettered again.
        await self._nak_all([msg for msg, _ in rejected])
        return []

    async def _append(
        self, accepted: list[_Accepted], stop: asyncio.Event
    ) -> list[AppendResult] | None:
        """Append the batch, retrying transient errors with backoff; None if told to stop."""
        entries = [a.entry for a in accepted]
        delay = self.tuning.retry_min_s
        while True:
            try:
                return await self.replay_log.append_batch(entries)
            except Exception as exc:
                self._counters.append_retries += 1
                self._log.warning(
                    "replay_append_failed", error=repr(exc), batch=len(entries), retry_in_s=delay
                )
            # Keep the batch ours (no redelivery behind our back) while we retry it: the
            # same dedup ids make the retry idempotent, and nothing newer overtakes it.
            await self._in_progress_all([a.msg for a in accepted])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return None
            delay = min(delay * 2, self.tuning.retry_max_s)

    def _count_results(self, results: list[AppendResult]) -> None:
        counters = self._counters
        for result in results:
            if result.status is AppendStatus.STORED:
                counters.ingested += 1
            elif result.status is AppendStatus.DUPLICATE:
                counters.duplicates += 1
            else:
                counters.refused += 1
        now = time.monotonic()
        if (
            any(r.status is AppendStatus.REFUSED for r in results)
            and now - self._last_refused_log >= _REFUSED_LOG_INTERVAL_S
        ):
            # Local subscribers still get these readings; the center never will.
            self._last_refused_log = now
            self._log.warning("replay_log_refused", refused_total=counters.refused)

    async def _publish_local(self, accepted: list[_Accepted]) -> None:
        """Real-time fan-out at the site (even when the replay log refused the reading)."""
        publish = self.bus.nc.publish
        for item in accepted:
            await publish(item.local_subject, item.payload)
        self._counters.published_local += len(accepted)

    # -- acknowledgements ------------------------------------------------------------

    async def _ack_all(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            await msg.ack()

    async def _nak_all(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.tuning.retry_min_s)

    async def _in_progress_all(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.in_progress()
