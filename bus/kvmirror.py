"""`KvMirror`: an in-memory copy of a JetStream KV bucket, kept current by its own pull consumer.

Values are parsed once, on arrival or (with no `on_change`) when the copy is next read; `barrier`
waits for every write made so far, and a watchdog re-synchronises a copy whose follower stalled.
A reload (after a resync, a lost consumer or a pause) tells `on_change` what changed meanwhile,
and drops the keys removed meanwhile.
The bucket's single writer may pause the follower and `remember` its own writes instead (as
values, or as the bytes it wrote, parsed only when the copy is next read).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, ItemsView, ValuesView
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from bus.log import get_logger
from bus.pullfeed import PullFeed, PullFeedError, seq_and_waiting, stream_seq

T = TypeVar("T")
# Markers of a deleted key: the `KV-Operation` header of a delete or purge, or the reason a
# server (2.11+) gives a marker it placed itself (TTL, max age); other reasons are skipped,
# as nats-py's watcher does.
_KV_OPERATION = "KV-Operation"
_DELETE_OPS = ("DEL", "PURGE")
_MARKER_REASON = "Nats-Marker-Reason"
_DELETE_REASONS = ("MaxAge", "Purge", "Remove")

# How long `start` waits, once the follower says it loaded, for the entries it loaded.
LOAD_GRACE_S = 5.0
# After this long without a delivery the follower asks whether its consumer still exists (a
# restarted server forgets it: pull requests then get "no responders" for good).
IDLE_CHECK_S = 5.0
# Deliveries asked for per pull request, and taken between two yields to the event loop.
_BATCH = 1000
# The server drops the consumer of a process gone this long (its pull requests stopped).
_INACTIVE_S = 60.0
_DELETE_TIMEOUT_S = 2.0
# Unparsed followed values kept per key (see `_Unparsed`): past it, the older are parsed.
_MAX_UNPARSED = 8
_RETRY_MAX_S = 30.0

Parse = Callable[[str, bytes], T | None]
OnChange = Callable[[str, T | None, T | None], None]
# A followed value not parsed yet: (bytes, revision, what holds if `parse` rejects it, depth).
# What holds is the value before it: another unparsed one, or the revision of the key as it
# was (its value in `_values` or an own write in `_encoded`). Parsed eagerly, a rejected value
# is skipped and the one before stays; kept lazily, so is it: the newest one `parse` accepts.
_Unparsed: TypeAlias = "tuple[bytes, int, _Unparsed | int, int]"


@dataclass
class _Reload:
    """A load into a copy that holds values already: the keys it delivered, and the newest
    revision before its consumer was made (a key remembered later may be delivered later)."""

    upto: int
    seen: set[str] = field(default_factory=set)


class _ConsumerGone(Exception):
    """The follower's consumer no longer exists (the server restarted, or it was removed)."""


class KvMirror(Generic[T]):
    """Every key of one bucket, parsed by `parse(key, value)` (None: skip and log).

    `on_change(key, before, after)` runs for every change the follower delivers after the
    initial load (after None: deleted), in revision order, and on a reload for every key that
    changed or went away meanwhile. Without it, followed values are kept as bytes and parsed
    when the copy is next read.
    """

    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        bucket: str,
        parse: Parse[T],
        on_change: OnChange[T] | None = None,
    ) -> None:
        self._js = js
        # The follower pulls on the context's own connection, under its API prefix (a domain).
        self._nc = js._nc
        self._api_prefix = js._prefix
        self._kv = kv
        self._stream = f"KV_{bucket}"
        self._filter = f"$KV.{bucket}.>"
        self._key_at = len(self._filter) - 1  # where the key starts in an entry's subject
        self._parse = parse
        self._on_change = on_change
        self._values: dict[str, T] = {}
        self._encoded: dict[str, bytes] = {}  # our own writes, parsed when next read
        self._unparsed: dict[str, _Unparsed] = {}  # followed writes, parsed when next read
        self._revisions: dict[str, int] = {}
        self._applied = 0  # highest revision the follower delivered (not our own writes)
        self._progress = asyncio.Event()
        self._short_of: int | None = None  # a newest revision `start` found undeliverable
        self._checked_at = -1
        self._loading = False
        self._loaded_once = False  # later loads are reloads: see `_Reload`
        self._reload: _Reload | None = None
        self._consumer: str | None = None
        self._feed: PullFeed | None = None
        self._follow: asyncio.Task[None] | None = None
        self._resyncing = asyncio.Lock()
        self._paused = False
        self.resyncs = 0
        self._log = get_logger("bus.kvmirror", bucket=bucket)

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str) -> T | None:
        self._parse_encoded()
        return self._values.get(key)

    def items(self) -> ItemsView[str, T]:
        self._parse_encoded()
        return self._values.items()

    def values(self) -> ValuesView[T]:
        self._parse_encoded()
        return self._values.values()

    def revision(self, key: str) -> int:
        """The key's last revision seen (a deleted key keeps its delete marker's)."""
        if key in self._unparsed:  # the revision of the newest value `parse` accepts
            self._settle(key, self._unparsed.pop(key))
        return self._revisions.get(key, 0)

    @property
    def applied(self) -> int:
        """Highest bucket revision this copy has seen."""
        return self._applied

    def __len__(self) -> int:
        self._parse_encoded()
        return len(self._values)

    def remember(self, key: str, value: T | None, revision: int) -> None:
        """Take a write we made ourselves now, without waiting for the follower to echo it."""
        self._store(key, value, revision, notify=True)

    def remember_encoded(self, key: str, data: bytes, revision: int) -> None:
        """`remember` a value we wrote from the bytes we wrote: parsed when this copy is next
        read, so a writer that seldom reads its own copy (a leader in a storm) never pays
        for it. With an `on_change`, parsed now: it is told of each change as it happens."""
        if self._on_change is not None:
            value = self._parse(key, data)
            if value is not None:
                self._store(key, value, revision, notify=True)
            return
        if key in self._unparsed:
            # What stays if these bytes are rejected: the newest followed value accepted.
            self._settle(key, self._unparsed.pop(key))
        if revision <= self._revisions.get(key, 0):
            return
        self._revisions[key] = revision
        self._encoded[key] = data

    def _parse_encoded(self) -> None:
        if self._unparsed:  # first: an accepted one replaces an own write older than it
            unparsed, self._unparsed = self._unparsed, {}
            for key, entry in unparsed.items():
                self._settle(key, entry)
        if not self._encoded:
            return
        encoded, self._encoded = self._encoded, {}
        for key, data in encoded.items():
            value = self._parse(key, data)
            if value is None:  # not ours to keep (logged by `parse`): as the follower would
                continue
            self._values[key] = value

    def _settle(self, key: str, entry: _Unparsed | int) -> None:
        """Parse a key's followed values newest first, up to the first `parse` accepts: what
        parsing each on arrival would have left (a rejected one leaves the one before)."""
        while not isinstance(entry, int):
            data, revision, entry, _ = entry
            value = self._parse(key, data)
            if value is not None:
                self._values[key] = value
                self._revisions[key] = revision
                self._encoded.pop(key, None)  # older than this
                return
        if entry:
            self._revisions[key] = entry
        else:
            self._revisions.pop(key, None)

    # -- the follower -----------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        """Load the whole bucket, then keep following it. Returns once the copy holds every
        write made before the call (or, for a newest revision no consumer can deliver, after
        waiting `LOAD_GRACE_S` for it)."""
        loaded = asyncio.Event()
        self._loading = True
        target = await self._last_revision()
        feed = await self._subscribe(loaded)
        self._follow = asyncio.create_task(self._follow_updates(feed, loaded))
        await asyncio.wait_for(self._loaded_up_to(target, loaded), timeout)
        self._loading = False
        self._loaded_once = True

    async def _loaded_up_to(self, target: int, loaded: asyncio.Event) -> None:
        # A consumer's load can end without the newest revision: a newest message purged away
        # (as `KeyValue.purge_deletes` does) is counted by the stream, but no consumer can
        # deliver it, and it must not stop the start. So wait for the revision only briefly.
        await loaded.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reach(target), LOAD_GRACE_S)
        if self._applied < target:
            self._short_of = target  # not a stall: `check` and `barrier` must not wait for it
            self._log.warning("kv_mirror_loaded_short", applied=self._applied, target=target)

    async def _reach(self, target: int) -> None:
        while self._applied < target:
            self._progress.clear()
            await self._progress.wait()

    async def _subscribe(self, loaded: asyncio.Event) -> PullFeed:
        """A consumer of our own (the latest of each key, then every write) and its feed;
        `loaded` is set at once if it has nothing to load."""
        # Unique per start: a resync or a restarted process never meets an old one (left to
        # the server's inactivity threshold if our `stop` could not delete it).
        name = f"kvmirror-{uuid.uuid4().hex}"
        self._reload = _Reload(await self._last_revision()) if self._loaded_once else None
        self._consumer = name  # before it exists: a `stop` meanwhile still deletes it
        info = await self._js.add_consumer(
            self._stream,
            config=ConsumerConfig(
                name=name,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE,
                filter_subject=self._filter,
                inactive_threshold=_INACTIVE_S,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        # Counted before anything was delivered (nothing is, before the first pull request).
        if not info.num_pending:
            await self._end_load(loaded)
        feed = PullFeed(self._nc, self._stream, name, batch=_BATCH, api_prefix=self._api_prefix)
        self._feed = feed
        await feed.start()
        return feed

    async def _unsubscribe(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.stop(nak_buffered=False)  # nothing to nak: no acks
        name, self._consumer = self._consumer, None
        if name is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):  # already gone (with its server, say)
                await asyncio.wait_for(
                    self._js.delete_consumer(self._stream, name), _DELETE_TIMEOUT_S
                )

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
            self._follow = None
        await self._unsubscribe()

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Stop following the bucket; the values stay. For the bucket's one writer (a lease
        holder), whose `remember` keeps this copy current: each of its writes would otherwise
        come back as a followed update to receive and skip."""
        self._paused = True
        await self.stop()

    async def resume(self) -> None:
        """Follow the bucket again, first catching up on whatever others wrote meanwhile."""
        if self._paused:
            self._paused = False
            await self.start()

    async def resync(self) -> None:
        """Restart the follower (its consumer may be gone): reloads the latest of each key."""
        if self._resyncing.locked() or self._paused:
            return
        async with self._resyncing:
            self.resyncs += 1
            await self.stop()
            await self.start()

    async def barrier(self, timeout: float) -> bool:
        """Wait until this copy has seen every write made so far, by anyone (not while paused).

        True once caught up; False after `timeout` (re-synchronised if it made no progress)."""
        target = await self._last_revision()
        started_at = self._applied
        deadline = time.monotonic() + timeout
        while self._behind(target):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._log.warning("kv_mirror_lagging", applied=self._applied, target=target)
                if self._applied == started_at:
                    await self.resync()
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        return True

    def _behind(self, target: int) -> bool:
        return self._applied < target and target != self._short_of

    async def _last_revision(self) -> int:
        """The newest revision in the bucket (0 if it holds none: a purged stream keeps its
        last sequence, but no consumer can deliver it)."""
        state = (await self._js.stream_info(self._stream)).state
        return int(state.last_seq) if state.messages else 0

    async def check(self) -> None:
        """Call periodically: a copy behind the bucket that has not moved since the last
        check lost its follower (e.g. the server restarted), so it re-synchronises."""
        if self._paused:
            return
        behind = self._behind(await self._last_revision())
        if behind and self._applied == self._checked_at:
            self._log.warning("kv_watch_stalled", applied=self._applied)
            await self.resync()
        self._checked_at = self._applied

    async def _follow_updates(self, feed: PullFeed, loaded: asyncio.Event) -> None:
        """Take deliveries until stopped. A lost consumer, or any failure, ends in a new one
        that reloads the latest of each key (as `resync` does): this task never just ends."""
        retry_s, failed_at = 0.0, -_RETRY_MAX_S
        while True:
            try:
                await self._take_deliveries(feed, loaded)
                self._log.info("kv_mirror_connection_closed")  # for good: nothing to follow
                return
            except (PullFeedError, _ConsumerGone) as exc:
                self._log.warning("kv_mirror_consumer_lost", error=str(exc) or repr(exc))
            except Exception as exc:  # e.g. `parse` or `on_change` raised: logged, not lost
                self._log.exception("kv_mirror_follow_failed", error=repr(exc))
            # Failing again soon after (the same bad entry, a server still coming back):
            # wait longer each time rather than reload the bucket in a loop.
            now = time.monotonic()
            retry_s = min(max(2 * retry_s, 0.5), _RETRY_MAX_S) if now - failed_at < 10 else 0.0
            failed_at = now
            self.resyncs += 1
            await self._unsubscribe()
            if loaded.is_set():
                loaded = asyncio.Event()  # a reload, as after `resync`
            while True:
                await asyncio.sleep(retry_s)
                if self._nc.is_closed:
                    self._log.info("kv_mirror_connection_closed")
                    return
                try:
                    feed = await self._subscribe(loaded)
                    break
                except Exception as exc:  # disconnected: retried until stopped
                    self._log.warning("kv_mirror_resubscribe_failed", error=repr(exc))
                    await self._unsubscribe()
                    retry_s = min(max(2 * retry_s, 0.5), _RETRY_MAX_S)

    async def _take_deliveries(self, feed: PullFeed, loaded: asyncio.Event) -> None:
        """Returns only once the connection is closed."""
        taken = 0
        heard_at = time.monotonic()
        while True:
            msgs = await feed.next_batch(_BATCH, IDLE_CHECK_S)
            if not msgs:
                if self._nc.is_closed:
                    return
                if time.monotonic() - heard_at >= IDLE_CHECK_S:
                    await self._still_there(feed, loaded)
                    heard_at = time.monotonic()
                continue
            heard_at = time.monotonic()
            if not loaded.is_set():
                if self._take_loading(msgs):
                    await self._end_load(loaded)
            elif self._on_change is None:
                self._take_unparsed(msgs)
            else:
                self._take_parsed(msgs)
            self._progress.set()
            taken += len(msgs)
            if taken >= _BATCH:
                taken = 0
                await asyncio.sleep(0)  # a 100k-key load must not starve the loop

    async def _still_there(self, feed: PullFeed, loaded: asyncio.Event) -> None:
        """After a quiet while: the consumer must still exist (a server restart loses it),
        and if it has nothing left to load, the load is over (its last entries were removed
        before they could be delivered)."""
        if self._consumer is None:
            return
        try:
            info = await self._js.consumer_info(self._stream, self._consumer)
        except NotFoundError as exc:
            raise _ConsumerGone(str(exc)) from exc
        except Exception as exc:  # disconnected, or slow: asked again after the next while
            self._log.info("kv_mirror_consumer_unknown", error=repr(exc))
            return
        if not loaded.is_set() and not info.num_pending and not feed.buffered:
            await self._end_load(loaded)

    def _take_loading(self, msgs: list[Msg]) -> bool:
        """Deliveries of a load, one by one; True if one nothing follows ended it. The first
        load tells `on_change` nothing (its caller reads the copy); a reload tells what
        changed, and whatever follows the end is told as followed."""
        revision, ended = 0, False
        reload = self._reload
        for msg in msgs:
            revision, waiting = seq_and_waiting(msg.reply)
            if reload is not None:
                reload.seen.add(msg.subject[self._key_at :])
            self._take(msg, revision, notify=reload is not None or ended)
            ended = ended or waiting == 0
        self._applied = max(self._applied, revision)
        return ended

    async def _end_load(self, loaded: asyncio.Event) -> None:
        """The load delivered all it had. A key a reload did not deliver was removed meanwhile
        (deleted, then purged), unless it was written again during the load: the server skips
        a key's last revision replaced (history 1) after the consumer was made, and the new
        one may come after the load's end. So each such key is looked up before it is dropped."""
        reload, self._reload = self._reload, None
        if reload is not None:
            unseen = [
                key
                for key, revision in self._revisions.items()
                if revision <= reload.upto and key not in reload.seen
            ]
            for key in unseen:
                if not await self._stored(key):
                    self._forget(key)
        loaded.set()

    async def _stored(self, key: str) -> bool:
        try:
            await self._js.get_last_msg(self._stream, self._filter[:-1] + key)
        except NotFoundError:
            return False
        return True

    def _forget(self, key: str) -> None:
        revision = self._revisions.pop(key, None)
        self._encoded.pop(key, None)
        self._unparsed.pop(key, None)
        before = self._values.pop(key, None)
        if before is None or self._on_change is None:
            return
        try:
            self._on_change(key, before, None)
        except BaseException:  # as in `_store`: kept, so the next reload tells it again
            self._values[key] = before
            if revision is not None:
                self._revisions[key] = revision
            raise

    def _take_parsed(self, msgs: list[Msg]) -> None:
        revision = 0
        for msg in msgs:
            revision = stream_seq(msg.reply)
            self._take(msg, revision, notify=True)
        self._applied = max(self._applied, revision)

    def _take(self, msg: Msg, revision: int, *, notify: bool) -> None:
        key = msg.subject[self._key_at :]
        if revision <= self._revisions.get(key, 0):
            return  # our own write, taken by `remember` already: no need to parse it again
        data = msg.data
        if not data:
            deleted = _deleted(msg)
            if deleted:
                self._store(key, None, revision, notify=notify)
                return
            if deleted is None:
                return  # a marker of unknown meaning
        if self._on_change is None:
            self._keep_unparsed(key, data, revision)
            return
        value = self._parse(key, data)
        if value is not None:
            self._store(key, value, revision, notify=notify)

    def _take_unparsed(self, msgs: list[Msg]) -> None:
        """`_take` for the deliveries after the load, with no `on_change`: the hot path of a
        copy following a busy bucket, inlined (bytes kept, nothing parsed)."""
        revisions, unparsed, key_at = self._revisions, self._unparsed, self._key_at
        revision = 0
        for msg in msgs:
            reply = msg.reply
            revision = (  # `bus.pullfeed.stream_seq`, inline
                int(reply.rsplit(".", 4)[1]) if reply.count(".") == 8 else int(reply.split(".")[7])
            )
            key = msg.subject[key_at:]
            known = revisions.get(key, 0)
            if revision <= known:
                continue  # our own write, remembered already
            data = msg.data
            if not data:
                self._take(msg, revision, notify=False)  # a delete, likely: headers read
                continue
            before = unparsed.get(key)
            if before is None:
                unparsed[key] = (data, revision, known, 1)
            elif before[3] < _MAX_UNPARSED:
                unparsed[key] = (data, revision, before, before[3] + 1)
            else:
                self._keep_unparsed(key, data, revision)
                continue
            revisions[key] = revision
        self._applied = max(self._applied, revision)

    def _keep_unparsed(self, key: str, data: bytes, revision: int) -> None:
        before = self._unparsed.pop(key, None)
        if before is not None and before[3] >= _MAX_UNPARSED:
            # A key rewritten again and again, never read: parse the older ones now (usually
            # just the newest of them), rather than keep every one of them.
            self._settle(key, before)
            before = None
        if before is None:
            self._unparsed[key] = (data, revision, self._revisions.get(key, 0), 1)
        else:
            self._unparsed[key] = (data, revision, before, before[3] + 1)
        self._revisions[key] = revision

    def _store(self, key: str, value: T | None, revision: int, *, notify: bool) -> None:
        if revision <= self._revisions.get(key, 0):
            if key not in self._unparsed:
                return
            # Followed values not parsed yet may all be rejected: compare with the revision
            # of the value they would leave.
            self._settle(key, self._unparsed.pop(key))
            if revision <= self._revisions.get(key, 0):
                return
        known = self._revisions.get(key)
        self._revisions[key] = revision
        self._encoded.pop(key, None)  # older than this
        self._unparsed.pop(key, None)
        before = self._values.get(key)
        self._put(key, value)
        if notify and self._on_change is not None:
            try:
                self._on_change(key, before, value)
            except BaseException:
                # Not taken, so the follower's restart delivers it again and tells it again.
                self._put(key, before)
                if known is None:
                    self._revisions.pop(key, None)
                else:
                    self._revisions[key] = known
                raise

    def _put(self, key: str, value: T | None) -> None:
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = value


def _deleted(msg: Msg) -> bool | None:
    """For an entry without data: True if it marks its key deleted, False if it is a value
    (empty), None if it is a marker of unknown meaning. Only such an entry's headers are read
    (`DeliveredMsg` parses them then)."""
    headers = msg.headers
    if not headers:
        return False
    operation = headers.get(_KV_OPERATION)
    if operation is not None:
        return operation in _DELETE_OPS
    reason = headers.get(_MARKER_REASON)
    if reason is None:
        return False
    return True if reason in _DELETE_REASONS else None
