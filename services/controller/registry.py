"""The site registry in JetStream KV: a watched in-memory copy for reads, CAS for every write.

Any number of controller replicas share one bucket; none ever overwrites another's write.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from bus.log import get_logger
from schemas.controller import SiteRecord

MUTATE_DEADLINE_S = 10.0
BACKOFF_MAX_S = 0.05
# Markers of a deleted key as nats-py reports them (`KV-Operation` header).
_DELETE_OPS = ("DEL", "PURGE")


@dataclass(frozen=True)
class Mutation:
    """What a compare-and-set write did: the record before and after, and if it was written."""

    before: SiteRecord | None
    after: SiteRecord | None
    written: bool
    revision: int


class ContentionError(RuntimeError):
    """A key changed under us on every attempt: give up rather than spin."""


Change = Callable[[SiteRecord | None], SiteRecord | None]


class Registry:
    """SITES bucket access for one replica.

    Reads come from a copy kept current by a KV watcher. Writes go through `mutate`:
    compute the next record from the current one, write it only if the key's revision is
    still the one it was computed from, and on conflict re-read and recompute.
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str) -> None:
        self._js = js
        self._kv = kv
        self._stream = f"KV_{bucket}"
        self._records: dict[str, SiteRecord] = {}
        # Last revision known per key, deleted keys included: an older write must never
        # resurrect a record a newer delete removed.
        self._revisions: dict[str, int] = {}
        self._applied = 0  # highest revision delivered by the watcher (not by our writes)
        self._checked_at = -1  # `_applied` at the previous watchdog check
        self._progress = asyncio.Event()
        self._resyncing = asyncio.Lock()
        self._watcher: KeyValue.KeyWatcher | None = None
        self._follow: asyncio.Task[None] | None = None
        self.conflicts = 0
        self.resyncs = 0
        self._log = get_logger("controller.registry")

    # -- reads ------------------------------------------------------------------------

    def get(self, site: str) -> SiteRecord | None:
        return self._records.get(site)

    def records(self) -> Iterable[SiteRecord]:
        return self._records.values()

    def __len__(self) -> int:
        return len(self._records)

    async def read(self, site: str) -> tuple[SiteRecord | None, int]:
        """The authoritative record and revision, straight from the bucket."""
        try:
            entry = await self._kv.get(site)
        except KeyNotFoundError as exc:  # deleted (the marker's revision) or never written
            revision = exc.entry.revision if exc.entry is not None else 0
            self._remember(site, None, revision)
            return None, revision
        record, revision = self._decode(site, entry.value), entry.revision or 0
        self._remember(site, record, revision)
        return record, revision

    async def barrier(self, timeout: float) -> bool:
        """Wait until this copy has seen every write made so far by any replica.

        True once caught up; False after `timeout` (re-synchronised if it made no progress).
        """
        target = await self._last_revision()
        started_at = self._applied
        deadline = time.monotonic() + timeout
        while self._applied < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._log.warning("registry_lagging", applied=self._applied, target=target)
                if self._applied == started_at:
                    await self.resync()
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        return True

    async def check(self) -> None:
        """Watchdog, called periodically: a copy that is behind the bucket and has not moved
        since the last check lost its watcher (e.g. the server restarted): re-synchronise."""
        target = await self._last_revision()
        behind = self._applied < target
        if behind and self._applied == self._checked_at:
            self._log.warning("registry_watch_stalled", applied=self._applied, target=target)
            await self.resync()
        self._checked_at = self._applied

    async def _last_revision(self) -> int:
        info = await self._js.stream_info(self._stream)
        return int(info.state.last_seq)

    # -- writes -----------------------------------------------------------------------

    async def mutate(
        self, site: str, change: Change, *, give_up_after_s: float = MUTATE_DEADLINE_S
    ) -> Mutation:
        """Apply `change` to the current record with compare-and-set, retrying on conflict.

        `change` returns the record unchanged (same object) to write nothing, None to
        delete, or a new record. It may raise (e.g. a Refusal): nothing is written then.
        Conflicts back off with jitter, so a replica that keeps losing to another's
        stream of writes on the same key still gets its turn.
        """
        record, revision = self._records.get(site), self._revisions.get(site, 0)
        deadline = time.monotonic() + give_up_after_s
        attempt = 0
        while True:
            after = change(record)
            if after is record or (after is not None and after == record):
                return Mutation(record, record, False, revision)
            try:
                if after is None:
                    # A delete returns no revision; the marker is the key's next message.
                    await self._kv.delete(site, last=revision)
                    new_revision = revision + 1
                else:
                    data = after.model_dump_json().encode()
                    new_revision = await self._kv.update(site, data, last=revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                attempt += 1
                if time.monotonic() >= deadline:
                    raise ContentionError(
                        f"registry key {site} kept changing: gave up after {attempt} attempts"
                    ) from None
                await asyncio.sleep(random.uniform(0, min(BACKOFF_MAX_S, 0.001 * 2**attempt)))
                record, revision = await self.read(site)
                continue
            self._remember(site, after, new_revision)
            return Mutation(record, after, True, new_revision)

    # -- the watched copy ---------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Load the whole bucket, then keep following it."""
        loaded = asyncio.Event()
        self._watcher = await self._kv.watchall()
        self._follow = asyncio.create_task(self._follow_updates(self._watcher, loaded))
        await asyncio.wait_for(loaded.wait(), timeout)
        self._log.info("registry_loaded", sites=len(self._records), revision=self._applied)

    async def resync(self) -> None:
        """Restart the watcher (e.g. its consumer was lost): reloads the latest of each key."""
        if self._resyncing.locked():
            return  # one is under way: it will bring the copy up to date
        async with self._resyncing:
            self.resyncs += 1
            await self.stop()
            await self.start()

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

    async def _follow_updates(self, watcher: KeyValue.KeyWatcher, loaded: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial load
                loaded.set()
                continue
            revision = entry.revision or 0
            if entry.operation in _DELETE_OPS:
                self._remember(entry.key, None, revision)
            else:
                record = self._decode(entry.key, entry.value)
                if record is not None:
                    self._remember(entry.key, record, revision)
            self._applied = max(self._applied, revision)
            self._progress.set()
            if entry.delta == 0:
                loaded.set()

    def _remember(self, site: str, record: SiteRecord | None, revision: int) -> None:
        if revision <= self._revisions.get(site, 0):
            return
        self._revisions[site] = revision
        if record is None:
            self._records.pop(site, None)
        else:
            self._records[site] = record

    def _decode(self, site: str, value: bytes | None) -> SiteRecord | None:
        try:
            return SiteRecord.model_validate_json(value or b"")
        except ValidationError as exc:
            # Kept out of the copy but logged: an operator must look at this key.
            self._log.error("registry_record_invalid", site=site, error=str(exc)[:500])
            return None
