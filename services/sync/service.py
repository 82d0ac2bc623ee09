"""`SyncService`: one replica of config sync at the center; run as many as you like.

Operator requests share a queue group; every replica keeps the whole status (reports are not
queued); the lease holder audits the fleet and answers reports by re-sending what is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyWrongLastSequenceError
from pydantic import BaseModel, ValidationError

from bus import subjects
from bus.client import Bus
from bus.kvmirror import KvMirror
from bus.lease import LeaderLease
from bus.log import get_logger
from bus.streams import (
    CONFIG_LAYERS_KV,
    SITES_KV,
    config_history_stream,
    ensure_kv,
    ensure_stream,
    sync_lease_kv,
    sync_reports_stream,
)
from schemas import EventDecodeError
from schemas.common import ErrorReply
from schemas.controller import Availability, SiteRecord
from schemas.envelope import Event, EventData, utc_now
from schemas.sync import (
    ConfigBundle,
    ConfigBundleQuery,
    ConfigChanged,
    ConfigDesired,
    ConfigGet,
    ConfigHistory,
    ConfigHistoryQuery,
    ConfigReport,
    ConfigSet,
    ConfigSetResult,
    ConfigView,
    LayerView,
    StoredLayer,
    SyncRow,
    SyncState,
    SyncStatus,
    SyncStatusQuery,
    config_kinds,
)
from schemas.wire import encode_new_event_json
from services.sync.board import StatusBoard
from services.sync.config import SyncConfig
from services.sync.desired import DesiredConfig
from services.sync.layers import ConfigRefused, Effective, Layer, Member, applies_to, layer_key
from services.sync.reports import Reports
from services.sync.status import SEVERITY, should_push, sync_state

SERVICE = "sync"
SOURCE = "/center/sync"
MIRROR_CHECK_S = 2.0


def request_subjects() -> dict[str, str]:
    """Operation name -> subject of every operator request the sync service answers."""
    ops = ("set", "get", "history", "status", "bundle")
    return {op: subjects.control(SERVICE, op) for op in ops}


def member_of(record: SiteRecord) -> Member:
    return Member(site=record.site, group=record.group, labels=record.labels)


class SyncService:
    """Desired config (CONFIG_LAYERS), site membership (SITES), reports (SYNC_REPORTS)."""

    def __init__(
        self,
        bus: Bus,
        config: SyncConfig | None = None,
        *,
        kinds: dict[str, type[BaseModel]] | None = None,
    ) -> None:
        self.bus = bus
        self.config = config or SyncConfig()
        self.desired = DesiredConfig(kinds or config_kinds())
        self.reports = Reports()
        self.board = StatusBoard()
        self._refresh_pending = False
        self._refresher: asyncio.Task[None] | None = None
        self.sites: KvMirror[SiteRecord] | None = None
        self.layers: KvMirror[StoredLayer] | None = None
        self.lease: LeaderLease | None = None
        self._last_push: dict[tuple[str, str], float] = {}
        self._payloads: dict[tuple[str, int, str], bytes] = {}
        self._subscriptions: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = asyncio.Event()
        self.started = asyncio.Event()
        self.stats = {"pushed": 0, "reports": 0, "audits": 0, "changes": 0, "rejected": 0}
        self._log = get_logger("sync", replica=self.config.replica_id)

    @property
    def is_leader(self) -> bool:
        return self.lease is not None and self.lease.is_leader

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        js = self.bus.js
        await ensure_stream(js, config_history_stream())
        await ensure_stream(js, sync_reports_stream())
        layers_kv = await ensure_kv(js, CONFIG_LAYERS_KV)
        sites_kv = await ensure_kv(js, SITES_KV)
        lease_kv = await ensure_kv(js, sync_lease_kv(self.config.lease_ttl_s))
        self.layers = KvMirror(js, layers_kv, CONFIG_LAYERS_KV.bucket, _parse_layer, self._layer)
        self.sites = KvMirror(js, sites_kv, SITES_KV.bucket, _parse_site, self._site_changed)
        await self.layers.start()
        for key, stored in self.layers.items():
            self.desired.put(key, stored, self.layers.revision(key))
        await self.sites.start()
        self._layers_kv = layers_kv
        # Live reports first, then the stored ones: newest per kind wins either way.
        self._subscriptions.append(
            await self.bus.nc.subscribe(subjects.sync_report_all(), cb=self._on_report)
        )
        await self._load_reports()
        await self._refresh_all()
        self.lease = LeaderLease(lease_kv, self.config.replica_id, self.config.lease_ttl_s)
        await self.lease.tick()
        queue = self.config.request_queue
        ops = request_subjects()
        serve = self.bus.serve
        self._subscriptions += [
            await serve(ops["set"], ConfigSet, self._set, queue=queue, component="sync-set"),
            await serve(ops["get"], ConfigGet, self._get, queue=queue, component="sync-get"),
            await serve(
                ops["history"], ConfigHistoryQuery, self._history, queue=queue, component="sync"
            ),
            await serve(
                ops["status"], SyncStatusQuery, self._status, queue=queue, component="sync"
            ),
            await serve(ops["bundle"], ConfigBundleQuery, self._bundle, queue=queue),
            # Not `serve`: the answer depends on which site asked, i.e. on the subject.
            await self.bus.nc.subscribe(subjects.sync_pull_all(), queue=queue, cb=self._on_pull),
        ]
        await self.bus.confirm_subscriptions()
        self._tasks = [
            asyncio.create_task(self._keep_lease()),
            asyncio.create_task(self._keep_mirrors()),
            asyncio.create_task(self._audit_loop()),
        ]
        self.started.set()
        self._log.info(
            "sync_started",
            kinds=sorted(self.desired.kinds),
            layers=len(self.layers),
            sites=len(self.sites),
            reports=len(self.reports),
            leader=self.is_leader,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        self._closing.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self.lease is not None and not self.bus.nc.is_closed:
            await self.lease.release()
        for mirror in (self.sites, self.layers):
            if mirror is not None:
                await mirror.stop()
        self._log.info("sync_stopped", **self.stats)

    # -- membership and layers ----------------------------------------------------------

    def _records(self) -> Iterable[SiteRecord]:
        return (record for _, record in self.sites.items()) if self.sites else ()

    def _members(self) -> Iterator[Member]:
        return (member_of(record) for record in self._records())

    def _layer(self, key: str, before: StoredLayer | None, after: StoredLayer | None) -> None:
        assert self.layers is not None
        self.desired.put(key, after, self.layers.revision(key))
        self._schedule_refresh()

    def _site_changed(self, site: str, before: SiteRecord | None, after: SiteRecord | None) -> None:
        if after is None:
            self.reports.forget(site)
            self.board.forget(site)
            return
        self._refresh(after)
        if not self.is_leader or not _reachable(after):
            return
        came_back = before is None or not _reachable(before)
        moved = before is not None and (before.group, before.labels) != (after.group, after.labels)
        if came_back or moved:
            # A site that just came back (or changed group/labels) converges at once.
            self._spawn(self._push_stale(after, after_s=0.0))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    # -- pushing --------------------------------------------------------------------------

    def _payload(self, effective: Effective) -> bytes:
        key = (effective.kind, effective.rev, effective.digest)
        found = self._payloads.get(key)
        if found is None:
            if len(self._payloads) > 10_000:
                self._payloads.clear()
            data = ConfigDesired(
                kind=effective.kind,
                rev=effective.rev,
                digest=effective.digest,
                config=effective.config,
            )
            found = data.__pydantic_serializer__.to_json(data)
            self._payloads[key] = found
        return found

    async def push(self, site: str, effectives: Iterable[Effective]) -> int:
        """Send `site` the given effective configs (one message per kind)."""
        now, sent = time.monotonic(), 0
        subject = subjects.config_desired(site)
        for effective in effectives:
            _, raw = encode_new_event_json(
                ConfigDesired, self._payload(effective), source=SOURCE, subject=site
            )
            await self.bus.nc.publish(subject, raw)
            self._last_push[(site, effective.kind)] = now
            sent += 1
        self.stats["pushed"] += sent
        return sent

    def _stale(self, record: SiteRecord, after_s: float) -> list[Effective]:
        now, stale = time.monotonic(), []
        member = member_of(record)
        for kind in self.desired.kinds:
            desired = self.desired.for_site(member, kind)
            state = sync_state(desired, self.reports.get(record.site, kind))
            last_push = self._last_push.get((record.site, kind))
            if desired.rev > 0 and should_push(state, last_push, now, after_s):
                stale.append(desired)
        return stale

    async def _push_stale(self, record: SiteRecord, after_s: float) -> None:
        stale = self._stale(record, after_s)
        if stale:
            await self.push(record.site, stale)

    async def _audit_loop(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.config.audit_interval_s)
            if self._closing.is_set() or not self.is_leader or not self.bus.nc.is_connected:
                continue
            try:
                await self.audit()
            except Exception as exc:  # the next round tries again
                self._log.warning("audit_failed", error=repr(exc))

    async def audit(self) -> int:
        """Re-send stale config to every reachable site; returns how many sites got some."""
        self.stats["audits"] += 1
        pushed = 0
        for n, record in enumerate(list(self._records())):
            if _reachable(record):
                stale = self._stale(record, self.config.policy.resend_after_s)
                if stale:
                    await self.push(record.site, stale)
                    pushed += 1
            if n % self.config.push_chunk == 0:
                await asyncio.sleep(0)
        if pushed:
            self._log.info("audit_resent", sites=pushed)
        return pushed

    # -- status board -----------------------------------------------------------------------

    def _site_states(self, record: SiteRecord) -> dict[str, SyncState]:
        member = member_of(record)
        return {
            kind: sync_state(
                self.desired.for_site(member, kind), self.reports.get(record.site, kind)
            )
            for kind in self.desired.kinds
        }

    def _refresh(self, record: SiteRecord) -> None:
        self.board.update(record.site, self._site_states(record))

    async def _refresh_all(self) -> None:
        for n, record in enumerate(list(self._records())):
            self._refresh(record)
            if n % 1000 == 999:
                await asyncio.sleep(0)  # 100k sites take ~1 s: let reports and requests in

    def _schedule_refresh(self) -> None:
        """Desired config changed: every site's state may have; recompute them in the
        background, once for any number of changes that arrive meanwhile."""
        self._refresh_pending = True
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_while_pending())

    async def _refresh_while_pending(self) -> None:
        while self._refresh_pending:
            self._refresh_pending = False
            await self._refresh_all()

    # -- reports ----------------------------------------------------------------------------

    async def _on_report(self, msg: Msg) -> None:
        self.stats["reports"] += 1
        if self.stats["reports"] % 256 == 0:
            await asyncio.sleep(0)  # a report flood must not starve the lease renewal
        try:
            report = self.bus.registry.decode_as(msg.data, ConfigReport).data
        except EventDecodeError as exc:
            await self._reject(msg, exc.reason, exc.message)
            return
        parsed = subjects.parse_up(msg.subject)
        if parsed is None or parsed[0] != report.site:
            await self._reject(msg, "site_mismatch", f"report for {report.site} on {msg.subject}")
            return
        self.reports.take(report)
        record = self.sites.get(report.site) if self.sites else None
        if record is not None:
            self._refresh(record)
        if not self.is_leader:
            return
        if record is not None and record.onboarded_at is not None:
            await self._push_stale(record, self.config.policy.report_repush_after_s)

    async def _reject(self, msg: Msg, reason: str, detail: str) -> None:
        self.stats["rejected"] += 1
        await self.bus.dead_letters.record(
            component="sync-report",
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            reason=reason,
            detail=detail,
        )

    async def _load_reports(self) -> None:
        """The latest report of every site, as SYNC_REPORTS kept them (one per subject)."""
        js = self.bus.js
        info = await js.stream_info(sync_reports_stream().name)
        remaining = int(info.state.messages)
        if remaining == 0:
            return
        sub = await js.subscribe(
            subjects.sync_report_all(),
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        try:
            while remaining > 0:
                msg = await sub.next_msg(timeout=10.0)
                with contextlib.suppress(EventDecodeError):
                    self.reports.take(self.bus.registry.decode_as(msg.data, ConfigReport).data)
                remaining = msg.metadata.num_pending
        finally:
            await sub.unsubscribe()

    # -- requests ---------------------------------------------------------------------------

    def bundle_for(self, site: str) -> EventData:
        """Every kind with something desired for `site` (rev 0: nothing desired), or an error."""
        record = self.sites.get(site) if self.sites else None
        if record is None:
            return ErrorReply(code="site_unknown", message=f"no site {site!r} in the registry")
        all_kinds = self.desired.all_for_site(member_of(record)).values()
        effectives = [e for e in all_kinds if e.rev > 0]
        now = time.monotonic()
        for effective in effectives:
            self._last_push[(record.site, effective.kind)] = now
        return ConfigBundle(site=record.site, configs=[_desired(e) for e in effectives])

    async def _bundle(self, request: Event[ConfigBundleQuery]) -> EventData:
        return self.bundle_for(request.data.site)

    async def _on_pull(self, msg: Msg) -> None:
        parsed = subjects.parse_up(msg.subject)
        if parsed is None:
            reply: EventData = ErrorReply(code="bad_subject", message=msg.subject)
        else:
            reply = self.bundle_for(parsed[0])
        if msg.reply:
            await self.bus.nc.publish(msg.reply, self.bus.registry.encode(self.bus.event(reply)))

    async def _set(self, request: Event[ConfigSet]) -> EventData:
        change = request.data
        try:
            return await self._apply_set(change)
        except ConfigRefused as refusal:
            self._log.warning(
                "config_refused", kind=change.kind, code=refusal.code, why=str(refusal)
            )
            return ErrorReply(code=refusal.code, message=str(refusal))

    async def _apply_set(self, change: ConfigSet) -> EventData:
        assert self.layers is not None
        preview = self.desired.preview(
            change.kind, change.target, change.values, change.unset, self._members()
        )
        result = {
            "kind": change.kind,
            "target": change.target,
            "dry_run": change.dry_run,
            "targeted": preview.targeted,
            "changed": len(preview.changed),
            "diffs": preview.diffs(change.max_diffs),
            "truncated": len(preview.changed) > change.max_diffs,
        }
        current = self.layers.get(preview.key)
        if change.dry_run or (current is not None and current.values == preview.values):
            return ConfigSetResult(rev=None, **result)
        stored = StoredLayer(
            kind=change.kind,
            target=change.target,
            values=preview.values,
            actor=change.actor,
            updated_at=utc_now(),
        )
        rev = await self._write_layer(preview.key, stored)
        self.stats["changes"] += 1
        await self.bus.publish_js(
            subjects.config_changed(change.kind),
            self.bus.event(
                ConfigChanged(
                    kind=change.kind,
                    target=change.target,
                    rev=rev,
                    values=change.values,
                    unset=change.unset,
                    actor=change.actor,
                    targeted=preview.targeted,
                    changed_sites=len(preview.changed),
                    at=stored.updated_at,
                )
            ),
        )
        self._log.info(
            "config_changed",
            kind=change.kind,
            target=change.target.describe(),
            rev=rev,
            changed_sites=len(preview.changed),
        )
        await self._push_changed([member for member, _, _ in preview.changed], change.kind)
        return ConfigSetResult(rev=rev, **result)

    async def _write_layer(self, key: str, stored: StoredLayer) -> int:
        assert self.layers is not None
        data = stored.model_dump_json().encode()
        expected = self.layers.revision(key)
        try:
            if self.layers.get(key) is None and expected == 0:
                rev = await self._layers_kv.create(key, data)
            else:
                rev = await self._layers_kv.update(key, data, last=expected)
        except KeyWrongLastSequenceError:
            raise ConfigRefused(
                "conflict", f"layer {key} was changed at the same time; look again and retry"
            ) from None
        self.layers.remember(key, stored, rev)
        return int(rev)

    async def _push_changed(self, members: list[Member], kind: str) -> None:
        assert self.sites is not None
        for n, member in enumerate(members):
            record = self.sites.get(member.site)
            if record is not None and record.onboarded_at is not None:
                await self.push(member.site, [self.desired.for_site(member, kind)])
            if n % self.config.push_chunk == 0:
                await asyncio.sleep(0)

    async def _get(self, request: Event[ConfigGet]) -> EventData:
        query = request.data
        try:
            self.desired.model(query.kind)
        except ConfigRefused as refusal:
            return ErrorReply(code=refusal.code, message=str(refusal))
        layers = self.desired.layers(query.kind)
        if query.site is None:
            return ConfigView(kind=query.kind, layers=[self._view(layer) for layer in layers])
        record = self.sites.get(query.site) if self.sites else None
        if record is None:
            return ErrorReply(code="site_unknown", message=f"no site {query.site!r}")
        member = member_of(record)
        effective = self.desired.for_site(member, query.kind)
        mine = [layer for layer in layers if applies_to(layer.target, member)]
        return ConfigView(
            kind=query.kind,
            site=query.site,
            layers=[self._view(layer) for layer in sorted(mine, key=lambda x: x.rev)],
            effective=effective.config,
            rev=effective.rev,
            digest=effective.digest,
        )

    def _view(self, layer: Layer) -> LayerView:
        assert self.layers is not None
        stored = self.layers.get(layer_key(layer.kind, layer.target))
        return LayerView(
            target=layer.target,
            values=dict(layer.values),
            rev=layer.rev,
            actor=stored.actor if stored else "",
            updated_at=stored.updated_at if stored else None,
        )

    async def _history(self, request: Event[ConfigHistoryQuery]) -> EventData:
        query = request.data
        js = self.bus.js
        subject = (
            subjects.config_changed(query.kind) if query.kind else subjects.config_changed_all()
        )
        info = await js.stream_info(config_history_stream().name)
        if info.state.messages == 0:
            return ConfigHistory(changes=[])
        kept: deque[ConfigChanged] = deque(maxlen=query.limit)
        sub = await js.subscribe(subject, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    break  # nothing (more) matches the filter
                with contextlib.suppress(EventDecodeError):
                    kept.append(self.bus.registry.decode_as(msg.data, ConfigChanged).data)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return ConfigHistory(changes=list(kept))

    async def _status(self, request: Event[SyncStatusQuery]) -> EventData:
        query = request.data
        refresher = self._refresher
        if refresher is not None and not refresher.done():
            await refresher  # answer from states that include the latest change
        chosen = self.board.worst_first(query.limit, query.sites)
        rows = self.status_rows(chosen)
        if query.state is not None:
            rows = [row for row in rows if row.state == query.state]
        rows.sort(key=lambda row: (SEVERITY[row.state], row.site, row.kind))
        shown = {site: state for site in chosen if (state := self.board.site_state(site))}
        matching = len(query.sites) if query.sites is not None else len(self.board)
        return SyncStatus(
            rows=rows,
            sites=shown,
            totals=self.board.totals(),
            truncated=matching > len(chosen),
        )

    def status_rows(self, sites: list[str]) -> list[SyncRow]:
        """One row per kind of each of `sites` (unknown sites are skipped)."""
        rows: list[SyncRow] = []
        for site in sites:
            record = self.sites.get(site) if self.sites else None
            if record is None:
                continue
            member = member_of(record)
            for kind in self.desired.kinds:
                desired = self.desired.for_site(member, kind)
                applied = self.reports.get(site, kind)
                rows.append(
                    SyncRow(
                        site=site,
                        kind=kind,
                        state=sync_state(desired, applied),
                        desired_rev=desired.rev,
                        applied_rev=applied.rev if applied else None,
                        error=applied.error if applied else None,
                        reported_at=applied.at if applied else None,
                    )
                )
        return rows

    # -- background -------------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        assert self.lease is not None
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.config.lease_renew_s)
            if not self._closing.is_set():
                await self.lease.tick()

    async def _keep_mirrors(self) -> None:
        reconnects = self.bus.nc.stats.get("reconnects", 0)
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), MIRROR_CHECK_S)
            if self._closing.is_set() or not self.bus.nc.is_connected:
                continue
            now_reconnects = self.bus.nc.stats.get("reconnects", 0)
            for mirror in (self.sites, self.layers):
                if mirror is None:
                    continue
                try:
                    if now_reconnects != reconnects:
                        await mirror.resync()
                    else:
                        await mirror.check()
                except Exception as exc:  # retried at the next check
                    self._log.warning("mirror_check_failed", error=repr(exc))
            reconnects = now_reconnects


def _reachable(record: SiteRecord) -> bool:
    """Worth pushing to now: onboarded, managed, and not known to be offline."""
    return (
        record.onboarded_at is not None
        and record.managed
        and record.availability in (Availability.ONLINE, Availability.DEGRADED)
    )


def _desired(effective: Effective) -> ConfigDesired:
    return ConfigDesired(
        kind=effective.kind, rev=effective.rev, digest=effective.digest, config=effective.config
    )


def _parse_layer(key: str, value: bytes) -> StoredLayer | None:
    try:
        return StoredLayer.model_validate_json(value)
    except ValidationError:
        get_logger("sync").error("config_layer_invalid", key=key)
        return None


def _parse_site(key: str, value: bytes) -> SiteRecord | None:
    try:
        return SiteRecord.model_validate_json(value)
    except ValidationError:
        return None
