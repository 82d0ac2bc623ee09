"""`KvMirror`: an in-memory copy of a JetStream KV bucket, kept current by a watcher.

Values are parsed once on arrival; `barrier` waits for every write made so far, and a watchdog
re-synchronises a copy whose watcher stalled.
The bucket's single writer may pause the watcher and `remember` its own writes instead (as
values, or as the bytes it wrote, parsed only when the copy is next read).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, ItemsView, ValuesView
from typing import Generic, TypeVar

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.log import get_logger

T = TypeVar("T")
# Markers of a deleted key as nats-py reports them (`KV-Operation` header).
_DELETE_OPS = ("DEL", "PURGE")

# How long `start` waits, once the watcher says it loaded, for the entries it loaded.
LOAD_GRACE_S = 5.0

Parse = Callable[[str, bytes], T | None]
OnChange = Callable[[str, T | None, T | None], None]


class KvMirror(Generic[T]):
    """Every key of one bucket, parsed by `parse(key, value)` (None: skip and log).

    `on_change(key, before, after)` runs for every change the watcher delivers after the
    initial load (after None: deleted), in revision order.
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
        self._kv = kv
        self._stream = f"KV_{bucket}"
        self._parse = parse
        self._on_change = on_change
        self._values: dict[str, T] = {}
        self._encoded: dict[str, bytes] = {}  # our own writes, parsed when next read
        self._revisions: dict[str, int] = {}
        self._applied = 0  # highest revision the watcher delivered (not our own writes)
        self._progress = asyncio.Event()
        self._short_of: int | None = None  # a newest revision `start` found undeliverable
        self._checked_at = -1
        self._loading = False
        self._watcher: KeyValue.KeyWatcher | None = None
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
        return self._revisions.get(key, 0)

    @property
    def applied(self) -> int:
        """Highest bucket revision this copy has seen."""
        return self._applied

    def __len__(self) -> int:
        self._parse_encoded()
        return len(self._values)

    def remember(self, key: str, value: T | None, revision: int) -> None:
        """Take a write we made ourselves now, without waiting for the watcher to echo it."""
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
        if revision <= self._revisions.get(key, 0):
            return
        self._revisions[key] = revision
        self._encoded[key] = data

    def _parse_encoded(self) -> None:
        if not self._encoded:
            return
        encoded, self._encoded = self._encoded, {}
        for key, data in encoded.items():
            value = self._parse(key, data)
            if value is None:  # not ours to keep (logged by `parse`): as the watcher would
                continue
            self._values[key] = value

    # -- the watcher ------------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        """Load the whole bucket, then keep following it. Returns once the copy holds every
        write made before the call (or, for a newest revision no watcher can deliver, after
        waiting `LOAD_GRACE_S` for it)."""
        loaded = asyncio.Event()
        self._loading = True
        target = await self._last_revision()
        self._watcher = await self._kv.watchall()
        self._follow = asyncio.create_task(self._follow_updates(self._watcher, loaded))
        await asyncio.wait_for(self._loaded_up_to(target, loaded), timeout)
        self._loading = False

    async def _loaded_up_to(self, target: int, loaded: asyncio.Event) -> None:
        # nats-py's watcher can say "loaded" before it hands over the entries it loaded:
        # when the server sent them all before its consumer-info reply came back, it sees
        # nothing pending and nothing taken yet. So also wait for the revision, briefly:
        # those entries are already here, and a newest revision no watcher can deliver (its
        # message purged away, as `KeyValue.purge_deletes` does) must not stop the start.
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

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
            self._follow = None
        if self._watcher is not None:
            with contextlib.suppress(Exception):  # already gone with its connection
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            self._watcher = None

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Stop following the bucket; the values stay. For the bucket's one writer (a lease
        holder), whose `remember` keeps this copy current: each of its writes would otherwise
        come back as a watched update to receive and skip."""
        self._paused = True
        await self.stop()

    async def resume(self) -> None:
        """Follow the bucket again, first catching up on whatever others wrote meanwhile."""
        if self._paused:
            self._paused = False
            await self.start()

    async def resync(self) -> None:
        """Restart the watcher (its consumer may be gone): reloads the latest of each key."""
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
        last sequence, but no watcher can deliver it)."""
        state = (await self._js.stream_info(self._stream)).state
        return int(state.last_seq) if state.messages else 0

    async def check(self) -> None:
        """Call periodically: a copy behind the bucket that has not moved since the last
        check lost its watcher (e.g. the server restarted), so it re-synchronises."""
        if self._paused:
            return
        behind = self._behind(await self._last_revision())
        if behind and self._applied == self._checked_at:
            self._log.warning("kv_watch_stalled", applied=self._applied)
            await self.resync()
        self._checked_at = self._applied

    async def _follow_updates(self, watcher: KeyValue.KeyWatcher, loaded: asyncio.Event) -> None:
        count = 0
        async for entry in watcher:
            if entry is None:  # end of the initial load
                loaded.set()
                continue
            revision = entry.revision or 0
            if revision <= self._revisions.get(entry.key, 0):
                pass  # our own write, taken by `remember` already: no need to parse it again
            elif entry.operation in _DELETE_OPS:
                self._store(entry.key, None, revision, notify=loaded.is_set())
            else:
                value = self._parse(entry.key, entry.value or b"")
                if value is not None:
                    self._store(entry.key, value, revision, notify=loaded.is_set())
            self._applied = max(self._applied, revision)
            self._progress.set()
            if entry.delta == 0:
                loaded.set()
            count += 1
            if count % 1000 == 0:
                await asyncio.sleep(0)  # a 100k-key load must not starve the loop

    def _store(self, key: str, value: T | None, revision: int, *, notify: bool) -> None:
        if revision <= self._revisions.get(key, 0):
            return
        self._revisions[key] = revision
        self._encoded.pop(key, None)  # older than this
        before = self._values.get(key)
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = value
        if notify and self._on_change is not None:
            self._on_change(key, before, value)
