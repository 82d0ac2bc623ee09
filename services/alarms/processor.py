"""`AlarmProcessor`: what the leader of a partition does (one partition: the whole fleet).
Consume its sites' alarm changes (UP_ALARM, CENTER_ALARMS) and acknowledgements
(ALARM_ACTIVITY) with durable consumers, apply them (`state`), tell operators (`storm`), then
write the changed records to KV and ack what was consumed. The table holds
mutable `AlarmEntry`s; a flush runs in a task of its own, so consuming goes on while it waits.

The stream is the log and the KV table its checkpoint. Writes are coalesced per alarm (more so
while a backlog waits: `busy_flush_every_s`) and compare-and-set: a second writer is detected,
never ignored. The consumed messages are acked (AckPolicy.ALL) only once the state they led to
is stored, and each leadership term starts its consumers right after their ack floor, so a
crash replays them in order; `source`/`seq` on each record make the replay a no-op where it
was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import APIError, NotFoundError

from bus import subjects
from bus.client import MSG_ID_HEADER, Bus
from bus.jspublish import Message, PipelinedPublisher
from bus.kvmirror import KvMirror
from bus.log import get_logger
from bus.partitions import partition_filter
from bus.pullfeed import PullFeed, stream_seq, waiting_in_stream
from bus.streams import ALARMS_KV, alarm_activity_stream, center_alarm_stream, uplink_stream
from schemas.alarms import AlarmAcknowledged, AlarmRecord
from schemas.envelope import utc_now
from schemas.errors import EventDecodeError
from services.alarms.config import AlarmsConfig
from services.alarms.inputs import (
    RAISED,
    ChangeDecoder,
    origin_problem,
    site_of,
)
from services.alarms.partitions import Partition
from services.alarms.state import (
    AlarmEntry,
    alarm_key,
    apply_ack,
    apply_cleared,
    apply_raised,
    prunable,
    settle_flapping,
)
from services.alarms.storm import Notice, StormGuard

CONSUMER = "alarms"
ACK_CONSUMER = "alarms-acks"
BARE_CONSUMER = "alarms-bare"
COMPONENT = "alarms"
KV_SUBJECT_PREFIX = f"$KV.{ALARMS_KV.bucket}."
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
KV_OPERATION = "KV-Operation"
WRONG_LAST_SEQUENCE = 10071  # JetStream error code of a failed compare-and-set
WRITE_TIMEOUT_S = 10.0
PRUNE_EVERY_S = 60.0
LOAD_TIMEOUT_S = 30.0


UNPARTITIONED = Partition()


class WriteConflict(RuntimeError):
    """Someone else changed alarm state under us: this replica must not keep writing."""


@dataclass
class _Feed:
    stream: str
    consumer: str
    filters: tuple[str, ...]
    acks: bool  # acknowledgements, not raises/clears
    # Carries every partition's sites: this partition applies its own, skips the others'.
    sieve: bool = False
    # Dead-letter everything consumed, for this (reason, detail).
    refuse: tuple[str, str] | None = None
    pull: PullFeed | None = None
    to_ack: Msg | None = None  # the last message whose effect awaits the next flush
    unacked: int = 0  # consumed messages up to `to_ack`
    waiting: int = 0  # messages still in the stream behind the last one consumed


def _feeds(part: Partition) -> list[_Feed]:
    """The streams a partition's leader consumes. Partitioned, the sites' stream (the storm's)
    is filtered by the server; the center's alarms and the acknowledgements (few) are sieved."""
    up, center = uplink_stream("alarm").name, center_alarm_stream().name
    acks = alarm_activity_stream().name
    ack_filter = ("center.alarms.ack.*",)
    if part.count == 1:
        return [
            _Feed(up, CONSUMER, (), acks=False),
            _Feed(center, CONSUMER, (), acks=False),
            _Feed(acks, ACK_CONSUMER, ack_filter, acks=True),
        ]
    suffix = f"-p{part.index}"
    feeds = [
        _Feed(up, CONSUMER + suffix, (partition_filter("alarm", part.index),), acks=False),
        _Feed(center, CONSUMER + suffix, (), acks=False, sieve=True),
        _Feed(acks, ACK_CONSUMER + suffix, ack_filter, acks=True, sieve=True),
    ]
    if part.index == 0:  # the transform leaves a change without a key unpartitioned
        refuse = ("unpartitioned_subject", "an alarm change needs a key: up.<site>.alarm.<key>")
        feeds.append(_Feed(up, BARE_CONSUMER, ("up.*.alarm",), acks=False, refuse=refuse))
    return feeds


class AlarmProcessor:
    """The alarm table of the leader; `start`, `run(halt)` until halted, `stop`."""

    def __init__(
        self,
        bus: Bus,
        mirror: KvMirror[AlarmRecord],
        config: AlarmsConfig,
        *,
        may_write: Callable[[], bool] = lambda: True,
        partition: Partition = UNPARTITIONED,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._mirror = mirror
        self._config = config
        self._may_write = may_write
        self.partition = partition
        self._clock = clock
        self._monotonic = monotonic
        self.table: dict[str, AlarmEntry] = {}
        self._revisions: dict[str, int] = {}
        self._dirty: dict[str, None] = {}
        self._flapping: set[str] = set()
        self._notices: list[Notice] = []
        self._guard = StormGuard(partition.storm_policy(config.storm))
        self._decode_change = ChangeDecoder(bus.registry)
        self._decode_ack = bus.registry.decoder_for(AlarmAcknowledged)
        self._feeds = _feeds(partition)
        self._publisher = PipelinedPublisher(bus.nc)
        self._flush_lock = asyncio.Lock()
        self._flush_wanted = asyncio.Event()
        self._last_flush = monotonic()
        self._last_prune = monotonic()
        self.stats: Counter[str] = Counter()
        self._log = get_logger("alarms.processor", replica=config.replica_id)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Take the table over from KV (through the mirror, once it caught up), then consume.

        While this processor writes the whole table (one partition), the mirror follows it
        through `remember` rather than by watching the bucket (see `KvMirror.pause`)."""
        await self._mirror.resume()
        await self._load()
        if self.partition.count == 1:
            await self._mirror.pause()
        await self._publisher.start()
        config = self._config
        for feed in self._feeds:
            await self._declare_after_ack_floor(feed)
            feed.pull = PullFeed(self._bus.nc, feed.stream, feed.consumer, batch=config.batch_size)
            await feed.pull.start()
        self._log.info(
            "alarm_processing_started", records=len(self.table), partition=self.partition.index
        )

    async def _declare_after_ack_floor(self, feed: _Feed) -> None:
        """(Re)create the feed's durable consumer so it delivers, in stream order, everything
        after its ack floor. A previous leader may have consumed past the floor without storing
        (it died, or lost the lease): left to the ack wait, those messages would come back after
        later ones had been applied, and be skipped as already applied."""
        js, config = self._bus.js, self._config
        try:
            floor = (await js.consumer_info(feed.stream, feed.consumer)).ack_floor.stream_seq
        except NotFoundError:
            floor = None
        else:
            await js.delete_consumer(feed.stream, feed.consumer)
        consumer = ConsumerConfig(
            durable_name=feed.consumer,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if floor else DeliverPolicy.ALL,
            opt_start_seq=floor + 1 if floor else None,
            ack_wait=config.ack_wait_s,
            max_ack_pending=config.max_ack_pending,
            max_deliver=-1,
            filter_subjects=list(feed.filters) or None,
        )
        await js.add_consumer(feed.stream, config=consumer)

    async def _load(self) -> None:
        if not await self._mirror.barrier(LOAD_TIMEOUT_S):
            self._log.warning("alarm_state_behind", applied=self._mirror.applied)
        self.table = {}
        self._revisions = {}
        owns = self.partition.owns
        for key, record in list(self._mirror.items()):
            if not owns(record.site):
                continue
            self.table[record.alarm_id] = AlarmEntry.of(record)
            self._revisions[record.alarm_id] = self._mirror.revision(key)
        self._flapping = {r.alarm_id for r in self.table.values() if r.flapping}

    async def run(self, halt: asyncio.Event) -> None:
        """Consume and tick until `halt`; a failure (a write conflict) ends it by raising."""
        tasks = [asyncio.create_task(self._consume(feed, halt)) for feed in self._feeds]
        tasks.append(asyncio.create_task(self._tick(halt)))
        flusher = asyncio.create_task(self._flush_when_due(halt))
        tasks.append(flusher)
        try:
            halted = asyncio.create_task(halt.wait())
            done, _ = await asyncio.wait([*tasks, halted], return_when=asyncio.FIRST_COMPLETED)
            halted.cancel()
            for task in done:
                failure = None if task is halted else task.exception()
                if failure is not None:
                    raise failure
        finally:
            halt.set()
            self._flush_wanted.set()  # the flusher wakes, and ends unless a flush is under way
            for task in tasks:
                if task is not flusher:  # a flush under way finishes (its waits are bounded)
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop_writing(self) -> None:
        """Not the leader any more: no write from now on (the next flush fails instead)."""
        self._may_write = lambda: False

    async def stop(self, *, flush: bool) -> None:
        """Stop consuming; with `flush`, store what was applied and ack it first."""
        if flush:
            try:
                await self.flush()
            except Exception as exc:  # unacked messages come back to the next leader
                self._log.warning("final_flush_failed", error=repr(exc))
        for feed in self._feeds:
            if feed.pull is not None:
                await feed.pull.stop()
                feed.pull = None
        await self._publisher.close()
        with contextlib.suppress(Exception):  # retried by the service's mirror check
            await self._mirror.resume()
        self._log.info("alarm_processing_stopped", **dict(self.stats))

    # -- consuming --------------------------------------------------------------------

    async def _consume(self, feed: _Feed, halt: asyncio.Event) -> None:
        config = self._config
        assert feed.pull is not None
        while not halt.is_set():
            msgs = await feed.pull.next_batch(config.batch_size, config.flush_every_s)
            if msgs:
                now, now_s = self._clock(), self._monotonic()
                self.stats["consumed"] += len(msgs)
                mine = self._sieve(msgs) if feed.sieve else msgs
                if feed.refuse is not None:
                    refused = [(m, feed.refuse) for m in mine]
                elif feed.acks:
                    refused = [(m, p) for m in mine if (p := self._apply_ack(m, now, now_s))]
                else:
                    refused = self._apply_changes(feed.stream, mine, now, now_s)
                for msg, (reason, detail) in refused:
                    await self._dead_letter(msg, reason, detail)
                feed.to_ack = msgs[-1]
                feed.unacked += len(msgs)
                feed.waiting = waiting_in_stream(msgs[-1].reply)
            if self._flush_due():
                self._flush_wanted.set()
            if msgs:
                # A backlog never empties the buffer, so `next_batch` would never yield: let
                # the lease renewal, the socket reader and the flush run between batches.
                await asyncio.sleep(0)

    def _sieve(self, msgs: list[Msg]) -> list[Msg]:
        """This partition's messages of a stream that carries every partition's."""
        owns = self.partition.owns
        mine = [m for m in msgs if owns(site_of(m.subject))]
        self.stats["other_partitions"] += len(msgs) - len(mine)
        return mine

    def _apply_changes(
        self, source: str, msgs: list[Msg], now: datetime, now_s: float
    ) -> list[tuple[Msg, tuple[str, str]]]:
        """Apply stored raises and clears (from stream `source`) to the table, in order; those
        to dead-letter, with (reason, detail). One loop over the batch with its look-ups bound
        once: this is the leader's hot path (the alarm storm's)."""
        decode, table, changed = self._decode_change.fields, self.table, self._changed
        on_change, policy = self._guard.on_change, self._config.flap
        refused: list[tuple[Msg, tuple[str, str]]] = []
        applied = 0
        for msg in msgs:
            try:
                change = decode(msg.data)
            except EventDecodeError as exc:
                refused.append((msg, (exc.reason, exc.message)))
                continue
            data = change["data"]
            problem = origin_problem(site_of(msg.subject), data)
            if problem is not None:
                refused.append((msg, problem))
                continue
            entry = table.get(data["alarm_id"])
            was_flapping = entry is not None and entry.flapping
            seq = stream_seq(msg.reply)
            if change["type"] == RAISED:  # `change["data"]` again: typed by this test
                after = apply_raised(
                    entry, change["data"], source=source, seq=seq, now=now, policy=policy
                )
            else:
                after = apply_cleared(
                    entry, change["data"], source=source, seq=seq, now=now, policy=policy
                )
            if after is None:
                continue
            applied += 1
            changed(after)
            notices = on_change(after, was_flapping, now_s, after.last_transition_at)
            if notices:
                self._notices += notices
        stats = self.stats
        stats["applied"] += applied
        stats["unchanged"] += len(msgs) - len(refused) - applied
        return refused

    def _apply_ack(self, msg: Msg, now: datetime, now_s: float) -> tuple[str, str] | None:
        try:
            ack = self._decode_ack(msg.data).data
        except EventDecodeError as exc:
            return exc.reason, exc.message
        if site_of(msg.subject) != ack.site:
            return "site_mismatch", f"acknowledgement of {ack.site!r} on {msg.subject!r}"
        after = apply_ack(self.table.get(ack.alarm_id), ack, now=now)
        if after is None:
            self.stats["acks_ignored"] += 1
            return None
        self.stats["acks"] += 1
        self._changed(after)
        self._notices += self._guard.on_acknowledged(after, now_s, ack.at)
        return None

    def _changed(self, entry: AlarmEntry) -> None:
        alarm_id = entry.alarm_id
        self.table[alarm_id] = entry  # new, or the same entry changed in place
        self._dirty[alarm_id] = None
        if entry.flapping:
            self._flapping.add(alarm_id)

    async def _dead_letter(self, msg: Msg, reason: str, detail: str) -> None:
        self.stats["dead_lettered"] += 1
        await self._bus.dead_letters.record(
            component=COMPONENT,
            subject=msg.subject,
            data=msg.data,
            reason=reason,
            detail=detail,
            headers=dict(msg.headers or {}),
        )

    # -- time -------------------------------------------------------------------------

    async def _tick(self, halt: asyncio.Event) -> None:
        while not halt.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), self._config.tick_s)
            if halt.is_set():
                return
            self.on_tick(self._clock(), self._monotonic())
            if self._flush_due():
                self._flush_wanted.set()

    async def _flush_when_due(self, halt: asyncio.Event) -> None:
        """Flushes run in this task, beside consuming: while one waits for its PubAcks, the
        next changes are applied (they are flushed, and their messages acked, next time)."""
        while not halt.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wanted.wait(), self._config.flush_every_s)
            self._flush_wanted.clear()
            if not halt.is_set() and self._flush_due():
                await self.flush()

    def on_tick(self, now: datetime, now_s: float) -> None:
        """Flapping alarms that settled, summaries that are due, records past retention."""
        policy = self._config.flap
        for alarm_id in list(self._flapping):
            entry = self.table.get(alarm_id)
            if entry is None or not entry.flapping:
                self._flapping.discard(alarm_id)
                continue
            suppressed = entry.suppressed
            if settle_flapping(entry, now, policy) is not None:
                self._flapping.discard(alarm_id)
                self._changed(entry)
                self._notices += self._guard.on_settled(entry, suppressed, now)
        flapping = [self.table[a] for a in self._flapping if a in self.table]
        self._notices += self._guard.tick(flapping, now_s, now)
        if now_s - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now_s
            for alarm_id, entry in list(self.table.items()):
                if prunable(entry, now, self._config.retention_s):
                    del self.table[alarm_id]
                    self._dirty[alarm_id] = None
                    self.stats["pruned"] += 1

    # -- storing ----------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Everything consumed so far is stored and acked (nothing dirty, no flush running)."""
        pending = self._dirty or self._notices or any(f.to_ack for f in self._feeds)
        return not pending and not self._flush_lock.locked()

    def _flush_due(self) -> bool:
        feeds, config = self._feeds, self._config
        pending = bool(self._dirty or self._notices or any(f.to_ack for f in feeds))
        if not pending:
            return False
        if (
            len(self._dirty) >= config.max_dirty
            or sum(f.unacked for f in feeds) * 2 >= config.max_ack_pending
        ):
            return True
        behind = sum(f.waiting for f in feeds) > config.behind_after
        every = config.busy_flush_every_s if behind else config.flush_every_s
        return self._monotonic() - self._last_flush >= every

    async def flush(self) -> None:
        """Store summaries and changed records, then ack what led to them, then tell."""
        async with self._flush_lock:
            self._last_flush = self._monotonic()
            if not self._may_write():
                raise WriteConflict("the lease lapsed: not the leader any more")
            dirty, self._dirty = self._dirty, {}
            notices, self._notices = self._notices, []
            to_ack = [
                (feed, feed.to_ack, feed.unacked) for feed in self._feeds if feed.to_ack is not None
            ]
            for feed in self._feeds:
                feed.to_ack, feed.unacked = None, 0
            stored = False
            try:
                await self._store_notices([n for n in notices if n.store])
                stored = True
                failed = await self._write(dirty)
            except BaseException as exc:
                self._dirty.update(dirty)
                # Summaries already stored must not be stored twice (new event ids).
                self._notices[:0] = (
                    [Notice(n.notice, store=False, live=n.live) for n in notices]
                    if stored
                    else notices
                )
                self._restore_acks(to_ack)
                # A conflict ends this term. A flush cancelled midway (shutdown) must leave its
                # records dirty and its messages unacked too: a later flush's cumulative ack
                # would otherwise cover messages whose state was never stored.
                if isinstance(exc, WriteConflict) or not isinstance(exc, Exception):
                    raise
                self.stats["flush_failures"] += 1
                self._log.warning("flush_failed", error=repr(exc), records=len(dirty))
                return
            if failed:
                # Not stored: keep them dirty and keep their messages unacked.
                self._dirty.update(dict.fromkeys(failed))
                self._restore_acks(to_ack)
                self.stats["flush_failures"] += 1
                return
            for _, msg, _ in to_ack:
                with contextlib.suppress(Exception):  # lost ack: redelivered, then a no-op
                    await msg.ack()
            self.stats["flushes"] += 1
            await self._tell([n for n in notices if n.live])

    def _restore_acks(self, to_ack: list[tuple[_Feed, Msg, int]]) -> None:
        for feed, msg, unacked in to_ack:
            feed.unacked += unacked
            if feed.to_ack is None:
                feed.to_ack = msg

    async def _write(self, dirty: dict[str, None]) -> list[str]:
        """Compare-and-set every changed record (or delete a pruned one); the ids not written."""
        if not dirty:
            return []
        pending: list[tuple[str, str, bytes]] = []
        messages: list[Message] = []
        for alarm_id in dirty:
            entry = self.table.get(alarm_id)
            key = alarm_key(alarm_id)
            revision = self._revisions.get(alarm_id)
            if revision is None:  # never written by us: maybe a delete marker, maybe nothing
                revision = self._mirror.revision(key)
            headers = {EXPECTED_LAST_SUBJECT_SEQ: str(revision)}
            if entry is None:
                if not revision:
                    continue
                headers[KV_OPERATION] = "DEL"
                payload = b""
            else:
                payload = entry.encoded()
            messages.append((KV_SUBJECT_PREFIX + key, payload, headers))
            pending.append((alarm_id, key, payload))
        futures = await self._publisher.publish_batch(messages)
        results = await self._publisher.wait(futures, WRITE_TIMEOUT_S)
        failed: list[str] = []
        conflicts = 0
        for (alarm_id, key, payload), result in zip(pending, results, strict=True):
            if isinstance(result, PubAck):
                self._revisions[alarm_id] = result.seq
                if payload:
                    self._mirror.remember_encoded(key, payload, result.seq)
                else:
                    self._mirror.remember(key, None, result.seq)
                self.stats["kv_writes"] += 1
            elif isinstance(result, APIError) and result.err_code == WRONG_LAST_SEQUENCE:
                conflicts += 1
            else:
                failed.append(alarm_id)
                self._log.warning("alarm_write_failed", alarm_id=alarm_id, error=repr(result))
        if conflicts:
            raise WriteConflict(f"{conflicts} alarm records changed by another writer")
        return failed

    async def _store_notices(self, notices: list[Notice]) -> None:
        """Summaries are alarm history: stored (JetStream, idempotent by event id) or retried."""
        if not notices:
            return
        futures = []
        for item in notices:
            event = self._bus.event(item.notice, subject=item.notice.alarm_id)
            futures.append(
                await self._publisher.publish(
                    subjects.alarm_activity(item.notice.site),
                    self._bus.registry.encode(event),
                    {MSG_ID_HEADER: event.id},
                )
            )
        results = await self._publisher.wait(futures, WRITE_TIMEOUT_S)
        errors = [r for r in results if not isinstance(r, PubAck)]
        if errors:
            raise RuntimeError(f"{len(errors)} alarm summaries not stored: {errors[0]!r}")
        self.stats["summaries_stored"] += len(notices)

    async def _tell(self, notices: list[Notice]) -> None:
        for item in notices:
            with contextlib.suppress(Exception):  # live notices are best effort
                await self._bus.emit(
                    subjects.alarm_notice(item.notice.site),
                    item.notice,
                    event_subject=item.notice.alarm_id,
                )
        self.stats["notices"] += len(notices)
        self.stats["notices_held_back"] = self._guard.held_back
