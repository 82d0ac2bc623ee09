"""The replay-log forwarder against real servers: a hub and a site behind a cuttable link.

Exactly once and per-device order at the center across outages, kill -9, full logs; pure parts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from nats.js.errors import NotFoundError as JsNotFoundError

from bus.client import Bus, open_connection
from bus.config import NatsConfig
from bus.forwarder import (
    Forwarder,
    ForwarderConfig,
    ForwarderStats,
    NoStreamAtCenter,
    OrderWatch,
    Outcome,
    Unforwardable,
    backoff_delay,
    classify,
    no_stream_despite_link,
    overtaken,
    settled_prefix,
)
from bus.replaylog import AppendStatus, LogEntry, ReplayLog
from bus.streams import (
    ReplayFullPolicy,
    StreamSpec,
    dead_letter_stream,
    ensure_stream,
    ensure_uplink_streams,
    site_replay_stream,
)
from bus.testing import EdgeTopology
from edge_agent.alarms import LocalAlarms
from edge_agent.config import ReplayConfig
from edge_agent.replay.monitor import ReplayMonitor
from edge_agent.replay.policy import CAUSE_LOSING, ENTITY
from schemas import REGISTRY, new_event
from schemas.alarms import AlarmRaised
from schemas.devices import DeviceReading
from schemas.envelope import utc_now
from schemas.logs import LogLevel, LogRecord

SITE = "s1"
CHILD = Path(__file__).with_name("forwarder_child.py")
FAST = ForwarderConfig(
    batch_size=500, publish_timeout_s=1.0, backoff_min_s=0.1, backoff_max_s=1.0, fetch_timeout_s=1.0
)


# -- pure parts ----------------------------------------------------------------------


def _ack(duplicate: bool = False) -> PubAck:
    return PubAck(stream="UP_READING", seq=1, duplicate=duplicate)


def test_classify_separates_permanent_from_transient_failures() -> None:
    too_big = APIError(code=400, err_code=10054, description="message size exceeds maximum")
    center_full = APIError(code=400, err_code=10077, description="maximum bytes exceeded")
    assert classify(_ack()) is Outcome.STORED
    assert classify(_ack(duplicate=True)) is Outcome.DUPLICATE
    assert classify(too_big) is Outcome.REJECTED
    assert classify(Unforwardable("no event id")) is Outcome.REJECTED
    assert classify(center_full) is Outcome.FAILED
    assert classify(APIError(code=503, description="stream store failed")) is Outcome.FAILED
    assert classify(NoStreamResponseError()) is Outcome.FAILED
    assert classify(TimeoutError()) is Outcome.FAILED


def test_no_responders_counts_as_no_stream_only_before_an_entry_that_reached_the_center() -> None:
    gone = NoStreamResponseError()
    assert no_stream_despite_link([]) == []
    assert no_stream_despite_link([gone, gone, gone]) == []  # a cut link: all fail alike
    assert no_stream_despite_link([gone, _ack(), gone]) == [0]  # the link fell after it
    assert no_stream_despite_link([gone, TimeoutError(), _ack(duplicate=True)]) == [0]
    center_error = APIError(code=503, description="stream store failed")
    assert no_stream_despite_link([_ack(), gone, center_error]) == [1]  # the center answered
    assert classify(NoStreamAtCenter("no stream for up.s1.log.warning")) is Outcome.REJECTED


def test_settled_prefix_stops_at_the_first_transient_failure() -> None:
    s, d, r, f = Outcome.STORED, Outcome.DUPLICATE, Outcome.REJECTED, Outcome.FAILED
    assert settled_prefix([]) == 0
    assert settled_prefix([s, d, r, s]) == 4
    assert settled_prefix([s, r, f, s, s]) == 2
    assert settled_prefix([f, s]) == 0


def test_overtaken_lists_failures_a_later_entry_got_past() -> None:
    s, d, f = Outcome.STORED, Outcome.DUPLICATE, Outcome.FAILED
    assert overtaken([s, f, f]) == []  # nothing got past them
    assert overtaken([s, f, s, f]) == [1]
    assert overtaken([f, f, d, f, s]) == [0, 1, 3]


def test_order_watch_counts_a_resent_entry_stored_fresh_after_a_later_one() -> None:
    s, d, f = Outcome.STORED, Outcome.DUPLICATE, Outcome.FAILED
    watch = OrderWatch(capacity=10)
    assert watch.observe(["a", "b", "c"], [s, f, s]) == []  # b at risk: c got past it
    assert watch.observe(["b", "c"], [d, d]) == []  # b was stored first after all (lost ack)
    assert watch.violations == 0
    assert watch.observe(["x", "y"], [f, s]) == []
    assert watch.observe(["x"], [f]) == []  # still failing: still at risk
    assert watch.observe(["x", "y"], [s, d]) == ["x"]  # stored fresh after y: violation
    assert watch.violations == 1
    assert watch.observe(["x"], [s]) == []  # counted once


def test_order_watch_is_bounded() -> None:
    watch = OrderWatch(capacity=2)
    for name in "abc":
        watch.observe([name, name + "-later"], [Outcome.FAILED, Outcome.STORED])
    assert watch.observe(["a"], [Outcome.STORED]) == []  # evicted, oldest first
    assert watch.observe(["c"], [Outcome.STORED]) == ["c"]


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [backoff_delay(n, 0.2, 1.0) for n in range(6)]
    assert delays == [0.0, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff_delay(10_000, 0.2, 10.0) == 10.0


# -- harness ------------------------------------------------------------------------------


@dataclass
class Site:
    """One site with its replay log, wired to a hub that stores what it is sent."""

    topology: EdgeTopology
    hub_js: JetStreamContext
    nc: NatsClient
    log: ReplayLog
    spec: StreamSpec
    sent: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    next_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    refused: int = 0
    _tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)

    async def append(self, count: int, devices: int = 10, *, pad: int = 0) -> int:
        """Append `count` readings round-robin over `devices`; returns how many were stored."""
        stored = 0
        for start in range(0, count, 500):
            entries = []
            for i in range(start, min(count, start + 500)):
                device = f"d{i % devices}"
                n = self.next_n[device]
                self.next_n[device] = n + 1
                payload: dict[str, Any] = {"n": n, "pad": "x" * pad}
                data = DeviceReading(site=SITE, device=device, channel="t", payload=payload)
                event = new_event(data, source=f"/sites/{SITE}")
                entries.append(LogEntry(kind="reading", key=device, event=event))
            for entry, result in zip(entries, await self.log.append_batch(entries), strict=True):
                if result.status is AppendStatus.STORED:
                    data = entry.event.data
                    self.sent[data.device].append(data.payload["n"])
                    stored += 1
                elif result.status is AppendStatus.REFUSED:
                    self.refused += 1
        return stored

    def forwarder(self, config: ForwarderConfig = FAST) -> Forwarder:
        forwarder = Forwarder(self.nc, SITE, config)
        self.spawn(forwarder.run)
        return forwarder

    def spawn(self, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        stop = asyncio.Event()
        self._tasks.append((stop, asyncio.create_task(run(stop))))

    async def cut(self) -> None:
        await asyncio.to_thread(self.topology.cut_link, SITE)

    async def restore(self) -> None:
        await asyncio.to_thread(self.topology.restore_link, SITE)

    async def stop_tasks(self) -> None:
        for stop, _ in self._tasks:
            stop.set()
        for _, task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=10)
            except Exception:
                task.cancel()
        self._tasks.clear()


SiteFactory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def make_site(edge_topology: EdgeTopology) -> AsyncIterator[SiteFactory]:
    """Starts the site and the hub's uplink streams; `await make_site(spec=..., ack_wait_s=...)`."""
    sites: list[Site] = []
    connections: list[NatsClient] = []

    async def factory(
        *, spec: StreamSpec | None = None, batch_size: int = 500, ack_wait_s: float = 10.0
    ) -> Site:
        await asyncio.to_thread(edge_topology.add_site, SITE, mqtt=False)
        hub_nc = await open_connection(NatsConfig.from_url(edge_topology.hub.url, name="hub"))
        site_nc = await open_connection(
            NatsConfig.from_url(edge_topology.site(SITE).url, name="site")
        )
        connections.extend([hub_nc, site_nc])
        hub_js = hub_nc.jetstream()
        await ensure_uplink_streams(hub_js)
        spec = spec or site_replay_stream(
            SITE, max_bytes=256 * 1024**2, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
        )
        await ensure_stream(site_nc.jetstream(), dead_letter_stream(SITE))
        log = ReplayLog(site_nc, SITE, spec, batch_size=batch_size, ack_wait_s=ack_wait_s)
        await log.declare()
        site = Site(edge_topology, hub_js, site_nc, log, spec)
        sites.append(site)
        return site

    try:
        yield factory
    finally:
        for site in sites:
            await site.stop_tasks()
        for nc in connections:
            with contextlib.suppress(Exception):
                await nc.close()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


async def center_count(hub_js: JetStreamContext, stream: str = "UP_READING") -> int:
    return int((await hub_js.stream_info(stream)).state.messages)


async def center_events(hub_js: JetStreamContext, stream: str = "UP_READING") -> list[bytes]:
    """Every message the center stored in `stream`, in stream order."""
    total = await center_count(hub_js, stream)
    kind = stream.removeprefix("UP_").lower()
    sub = await hub_js.subscribe(f"up.*.{kind}.>", stream=stream, ordered_consumer=True)
    try:
        return [(await sub.next_msg(timeout=5)).data for _ in range(total)]
    finally:
        await sub.unsubscribe()


def readings_by_device(raws: list[bytes]) -> tuple[dict[str, list[int]], list[str]]:
    by_device: dict[str, list[int]] = defaultdict(list)
    ids = []
    for raw in raws:
        event = REGISTRY.decode_as(raw, DeviceReading)
        by_device[event.data.device].append(event.data.payload["n"])
        ids.append(event.id)
    return dict(by_device), ids


async def assert_center_has_exactly(site: Site) -> None:
    """The center holds every stored entry once, each device's entries in append order."""
    by_device, ids = readings_by_device(await center_events(site.hub_js))
    assert len(ids) == len(set(ids)), "duplicates at the center"
    assert by_device == dict(site.sent)


async def wait_center(site: Site, expected: int, timeout: float = 60.0) -> None:
    async def reached() -> bool:
        return await center_count(site.hub_js) >= expected

    await wait_until(reached, timeout, f"{expected} entries at the center")


async def _at_least(site: Site, count: int) -> bool:
    return await center_count(site.hub_js) >= count


def assert_clean(stats: ForwarderStats) -> None:
    assert stats.order_violations == 0
    assert stats.dead_lettered == 0


# -- delivery ---------------------------------------------------------------------------


async def test_backlog_reaches_center_exactly_once_in_device_order(make_site: SiteFactory) -> None:
    site = await make_site()
    assert await site.append(3000, devices=30) == 3000
    forwarder = Forwarder(site.nc, SITE, FAST)

    before = await forwarder.backlog()
    assert (before.depth, before.messages, before.dropped) == (3000, 3000, 0)
    assert before.bytes > 3000 * 300
    assert before.max_bytes == site.spec.max_bytes
    assert before.oldest_unsent_age_s is not None and 0 <= before.oldest_unsent_age_s < 30
    await asyncio.sleep(0.5)
    aged = await forwarder.backlog()
    assert aged.oldest_unsent_age_s is not None
    assert aged.oldest_unsent_age_s >= before.oldest_unsent_age_s + 0.4

    started = time.monotonic()
    site.spawn(forwarder.run)
    await wait_center(site, 3000)
    elapsed = time.monotonic() - started
    rate = forwarder.stats().rate_per_s
    print(f"\nforwarded 3000 in {elapsed:.2f}s ({3000 / elapsed:.0f}/s), stats rate {rate:.0f}/s")
    assert rate > 0

    assert await site.append(200, devices=30) == 200  # appends while it runs go out too
    await wait_center(site, 3200)
    await assert_center_has_exactly(site)
    stats = forwarder.stats()
    assert_clean(stats)
    assert (stats.forwarded, stats.stored_at_center, stats.duplicates_at_center) == (3200, 3200, 0)
    assert stats.batched > 3000  # fresh entries go in fast batches (single probes do not)
    assert (stats.failures, stats.link_up, stats.dropped_seen) == (0, True, 0)
    after = await forwarder.backlog()
    assert (after.depth, after.dropped, after.oldest_unsent_age_s) == (0, 0, None)
    pulls = forwarder.stats().pulls
    await asyncio.sleep(2.0)  # idle: one long poll per fetch_timeout_s (1 s), no spinning
    assert forwarder.stats().pulls - pulls <= 3


async def test_link_outage_backs_off_then_delivers_all_once_in_order(
    make_site: SiteFactory,
) -> None:
    site = await make_site()
    await site.append(8000, devices=20)
    forwarder = site.forwarder()
    await wait_center(site, 500)
    await site.cut()  # most likely with a batch in flight
    assert await site.append(1000, devices=20) == 1000  # the site keeps logging while cut

    async def link_down() -> bool:
        return forwarder.stats().link_up is False

    await wait_until(link_down, 10, "forwarder sees the link down")
    before = forwarder.stats()
    await asyncio.sleep(2.0)
    during = forwarder.stats()
    attempts = during.publishes - before.publishes
    print(f"\npublish attempts during a 2 s outage: {attempts}; last error: {during.last_error}")
    # "No responders" comes from the site's own server: probing at unreachable_probe_s
    # (jittered down to 0.8x) is the pace; anything faster would be a spin.
    assert attempts <= 2.0 / (0.8 * FAST.unreachable_probe_s) + 3, "the forwarder spins"
    assert during.fetches - before.fetches <= 8
    assert during.consecutive_failures >= 2 and during.probing
    assert (await forwarder.backlog()).depth >= 1000

    await site.restore()
    await wait_center(site, 9000)
    await asyncio.sleep(0.3)  # anything extra would show up as a count above 9000
    await assert_center_has_exactly(site)
    stats = forwarder.stats()
    assert_clean(stats)
    assert stats.link_up is True and stats.consecutive_failures == 0
    assert stats.forwarded == 9000  # each entry settled once; re-sends count as duplicates
    assert stats.stored_at_center == 9000 - stats.duplicates_at_center
    assert (await forwarder.backlog()).depth == 0


async def test_killed_forwarder_process_resumes_exactly_once_in_order(
    make_site: SiteFactory,
) -> None:
    site = await make_site(ack_wait_s=2.0)
    total = 6000
    await site.append(total, devices=25)
    url = site.topology.site(SITE).url
    env = {**os.environ, "EDGEBUS_LOG_LEVEL": "warning"}
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), url, SITE, "500", env=env
    )
    try:
        # 1750: in the middle of the fourth batch of 500 (likely some of it stored already)
        await wait_until(
            lambda: _at_least(site, 1750), timeout=30, what="the child forwarding", interval=0.005
        )
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), timeout=10)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == -signal.SIGKILL
    await asyncio.sleep(0.5)  # what the killed process had already sent lands meanwhile
    at_kill = await center_count(site.hub_js)
    print(f"\nforwarder process killed with {at_kill} of {total} at the center")
    assert at_kill < total, "the backlog was gone before the kill: nothing was tested"

    forwarder = site.forwarder()
    await wait_center(site, total, timeout=60)
    await asyncio.sleep(0.3)
    await assert_center_has_exactly(site)
    stats = forwarder.stats()
    print(f"after restart: {stats.duplicates_at_center} re-sent entries were duplicates")
    assert_clean(stats)
    assert stats.stored_at_center == total - at_kill
    assert (await forwarder.backlog()).depth == 0


async def test_entries_held_by_a_dead_forwarder_go_before_newer_ones(
    make_site: SiteFactory,
) -> None:
    site = await make_site(ack_wait_s=2.0)
    await site.append(10, devices=1)
    # A forwarder that took three entries and died before forwarding them: they stay
    # unacked until ack_wait, while the consumer would hand out the newer ones at once.
    dead = await open_connection(NatsConfig.from_url(site.topology.site(SITE).url, name="dead"))
    held = await dead.jetstream().pull_subscribe_bind("forwarder", "REPLAY")
    assert len(await held.fetch(3, timeout=2)) == 3
    await dead.close()

    forwarder = site.forwarder()
    await wait_center(site, 10, timeout=20)
    await asyncio.sleep(0.3)
    await assert_center_has_exactly(site)  # d0: 0..9 in order, not 3..9 then 0..2
    stats = forwarder.stats()
    assert_clean(stats)
    assert stats.redelivery_waits >= 1


async def test_stopped_forwarder_hands_back_what_it_held_in_order(make_site: SiteFactory) -> None:
    site = await make_site(ack_wait_s=30.0)
    await site.append(10, devices=3)
    first = Forwarder(site.nc, SITE, FAST)
    site.spawn(first.run)
    await wait_center(site, 10)
    await site.cut()
    await site.append(300, devices=3)

    async def holding() -> bool:  # what it fetched failed and stays in its hands
        return first.stats().link_up is False

    await wait_until(holding, 10, "a batch failed while cut")
    await site.stop_tasks()  # graceful: hands the held entries back (nak, in order)
    await site.restore()
    started = time.monotonic()
    second = site.forwarder()
    await wait_center(site, 310, timeout=20)
    # Handed back, not left to expire: no 30 s ack_wait before they flow again.
    assert time.monotonic() - started < 10
    await asyncio.sleep(0.3)
    await assert_center_has_exactly(site)
    assert_clean(second.stats())


@pytest.mark.parametrize(
    ("before", "after", "devices", "batched"),
    [(4, 5, 1, 0), (20, 20, 2, 40)],
    ids=["one by one", "inside a fast batch"],
)
async def test_rejected_entry_is_dead_lettered_and_the_rest_go_in_order(
    make_site: SiteFactory, before: int, after: int, devices: int, batched: int
) -> None:
    """The center refuses one entry for good: it is dead-lettered at the site, the rest
    arrives in order. Inside a fast batch the center ends the batch at that message: the
    entries before it are stored, the ones after it are sent again one by one at once."""
    site = await make_site()
    info = await site.hub_js.stream_info("UP_READING")
    info.config.max_msg_size = 1024  # the center refuses big messages for good (400)
    await site.hub_js.update_stream(config=info.config)
    await site.append(before, devices=devices)
    big = site.next_n["d0"]
    await site.append(1, devices=1, pad=2000)  # too big for the center
    await site.append(after, devices=devices)
    site.sent["d0"].remove(big)

    forwarder = site.forwarder()
    await wait_center(site, before + after)

    async def dead_lettered() -> bool:
        return forwarder.stats().dead_lettered == 1

    await wait_until(dead_lettered, 10, "the big entry dead-lettered")
    await assert_center_has_exactly(site)
    dlq = await site.nc.jetstream().get_msg("DEADLETTER", seq=1)
    assert dlq.subject == f"dlq.{SITE}.forwarder.rejected_by_center"
    assert dlq.headers is not None and "exceeds" in dlq.headers["Edgebus-Dlq-Detail"].lower()
    assert REGISTRY.decode_as(dlq.data or b"", DeviceReading).data.payload["n"] == big
    stats = forwarder.stats()
    # The first entry goes alone (a probe); a fast batch carries the rest, if long enough.
    assert stats.batched == batched
    assert (stats.forwarded, stats.stored_at_center, stats.duplicates_at_center) == (
        before + after, before + after, 0
    )  # fmt: skip
    assert (stats.order_violations, stats.failures) == (0, 0)
    assert (await forwarder.backlog()).depth == 0


async def test_entries_with_the_same_center_id_are_one_message_at_the_center(
    make_site: SiteFactory,
) -> None:
    """A device's QoS 1 re-send ingested as a second event (own event id, own INGEST seq)
    carries the device's message key as its center id: the center keeps the first."""
    site = await make_site()

    def keyed(n: int, key: str) -> LogEntry:
        data = DeviceReading(site=SITE, device="d0", channel="t", payload={"n": n})
        event = new_event(data, source=f"/sites/{SITE}")
        return LogEntry(kind="reading", key="d0", event=event, center_id=key, dedup_id=f"i-{n}")

    entries = [keyed(0, "dev-a"), keyed(1, "dev-b"), keyed(2, "dev-a")]  # 2 re-sends 0
    results = await site.log.append_batch(entries)
    assert [r.status for r in results] == [AppendStatus.STORED] * 3  # distinct in the log
    forwarder = site.forwarder()
    await wait_center(site, 2)

    async def all_settled() -> bool:
        return forwarder.stats().forwarded == 3

    await wait_until(all_settled, 10, "all three settled")
    await asyncio.sleep(0.3)
    by_device, _ = readings_by_device(await center_events(site.hub_js))
    assert by_device == {"d0": [0, 1]}
    stats = forwarder.stats()
    assert (stats.stored_at_center, stats.duplicates_at_center) == (2, 1)


async def test_a_center_without_fast_batches_gets_everything_one_by_one(
    make_site: SiteFactory,
) -> None:
    site = await make_site()
    info = await site.hub_js.stream_info("UP_READING")
    info.config.allow_batched = False  # e.g. a center on an older nats-server
    await site.hub_js.update_stream(config=info.config)
    await site.append(1200, devices=12)
    forwarder = site.forwarder()
    await wait_center(site, 1200)
    await assert_center_has_exactly(site)
    stats = forwarder.stats()
    assert stats.batched == 0 and stats.failures == 0
    assert (stats.forwarded, stats.stored_at_center, stats.duplicates_at_center) == (1200, 1200, 0)


async def test_a_log_that_refuses_purges_is_acked_entry_by_entry(make_site: SiteFactory) -> None:
    """Settled runs leave the log with one purge; where that is refused (a stream with
    deny_purge, say), entries are acked one by one and nothing else changes."""
    site = await make_site()
    site_js = site.nc.jetstream()
    info = await site_js.stream_info("REPLAY")
    info.config.deny_purge = True
    await site_js.update_stream(config=info.config)
    with pytest.raises(APIError):  # the fallback is what is tested here
        await site_js.purge_stream("REPLAY")
    await site.append(1500, devices=15)
    forwarder = site.forwarder()
    await wait_center(site, 1500)
    await assert_center_has_exactly(site)
    assert_clean(forwarder.stats())
    backlog = await forwarder.backlog()
    assert (backlog.depth, backlog.messages, backlog.dropped) == (0, 0, 0)
    consumer = await site_js.consumer_info("REPLAY", "forwarder")
    assert consumer.ack_floor is not None and consumer.ack_floor.stream_seq == 1500


async def append_log_record(site: Site, message: str) -> None:
    record = LogRecord(
        site=SITE, level=LogLevel.WARNING, logger="test", message=message, timestamp=utc_now()
    )
    event = new_event(record, source=f"/sites/{SITE}")
    [result] = await site.log.append_batch([LogEntry(kind="log", key="warning", event=event)])
    assert result.status is AppendStatus.STORED


async def test_an_entry_the_center_has_no_stream_for_is_dead_lettered_not_blocking(
    make_site: SiteFactory,
) -> None:
    """A center without `UP_LOG` (an older center, say) answers "no responders" for log
    entries, exactly as a cut link would: proven against later entries that do reach it,
    those are dead-lettered at the site and everything behind them still goes, in order."""
    site = await make_site()
    await site.hub_js.delete_stream("UP_LOG")
    await append_log_record(site, "first")  # the very first entry: nothing behind it yet
    forwarder = site.forwarder(replace(FAST, witness_fetch_after_s=0.5))
    await asyncio.sleep(1.0)
    assert forwarder.stats().dead_lettered == 0  # no proof yet: it could be a cut link
    await site.append(5, devices=2)
    await append_log_record(site, "between")
    await site.append(5, devices=2)
    await wait_center(site, 10, timeout=20)

    async def both_dead_lettered() -> bool:
        return forwarder.stats().dead_lettered == 2

    await wait_until(both_dead_lettered, 15, "both log entries dead-lettered")
    await assert_center_has_exactly(site)
    for seq in (1, 2):
        dlq = await site.nc.jetstream().get_msg("DEADLETTER", seq=seq)
        assert dlq.subject == f"dlq.{SITE}.forwarder.no_stream_at_center"
        assert dlq.headers is not None
        assert f"up.{SITE}.log.warning" in dlq.headers["Edgebus-Dlq-Detail"]
    # Witnesses sent beside an unproven head are re-sent with it: duplicates, absorbed.
    stats = forwarder.stats()
    assert stats.order_violations == 0 and stats.dead_lettered == 2
    assert (await forwarder.backlog()).depth == 0


async def test_a_cut_link_never_counts_as_a_missing_stream(make_site: SiteFactory) -> None:
    site = await make_site()
    await site.cut()
    await append_log_record(site, "while cut")
    await site.append(20, devices=2)
    forwarder = site.forwarder()
    await asyncio.sleep(2.0)  # many probes, every one "no responders": nothing proven
    await site.restore()
    await wait_center(site, 20, timeout=30)
    await wait_until(lambda: _count_in(site.hub_js, "UP_LOG", 1), 10, "the log entry at the center")
    await assert_center_has_exactly(site)
    assert forwarder.stats().dead_lettered == 0


async def _count_in(hub_js: JetStreamContext, stream: str, count: int) -> bool:
    return await center_count(hub_js, stream) >= count


# -- full log policies and their alarms ----------------------------------------------------


async def start_watch(
    site: Site, forwarder: Forwarder, policy: str
) -> tuple[LocalAlarms, ReplayMonitor, Bus]:
    bus = await Bus.connect(
        NatsConfig.from_url(site.topology.site(SITE).url, name="alarms"),
        scope=SITE,
        source=f"/sites/{SITE}",
    )
    alarms = LocalAlarms(bus, site.log, SITE)
    config = ReplayConfig(
        max_bytes=site.spec.max_bytes, policy=policy, monitor_interval_s=0.2, near_full_ratio=0.8
    )
    monitor = ReplayMonitor(forwarder, site.log, alarms, config, quiet_s=5.0)
    site.spawn(monitor.run)
    return alarms, monitor, bus


def active_causes(alarms: LocalAlarms) -> set[str]:
    return {alarm.probable_cause for alarm in alarms.active()}


async def center_alarm_causes(hub_js: JetStreamContext) -> list[str]:
    raws = await center_events(hub_js, "UP_ALARM")
    return [
        event.data.probable_cause
        for event in (REGISTRY.decode(raw) for raw in raws)
        if isinstance(event.data, AlarmRaised)
    ]


async def test_drop_oldest_counts_dropped_entries_and_raises_alarm(
    make_site: SiteFactory,
) -> None:
    spec = site_replay_stream(
        SITE, max_bytes=64 * 1024, max_age_s=3600, policy=ReplayFullPolicy.DROP_OLDEST
    )
    site = await make_site(spec=spec)
    await site.cut()
    forwarder = site.forwarder()
    assert await site.append(1000, devices=5) == 1000  # all stored: the oldest make room

    cut_view = await forwarder.backlog()
    # Nothing forwarded yet: every entry gone from the log is dropped, except the one the
    # forwarder holds as its probe (it has its bytes; it will go out when the link returns).
    gone = cut_view.last_seq - cut_view.messages
    assert gone - 1 <= cut_view.dropped <= gone
    assert cut_view.dropped > 700 and cut_view.bytes <= 64 * 1024
    alarms, monitor, bus = await start_watch(site, forwarder, ReplayFullPolicy.DROP_OLDEST)
    try:

        async def alarmed() -> bool:
            return CAUSE_LOSING in active_causes(alarms)

        await wait_until(alarmed, 10, "the dropping alarm")
        snapshot = monitor.snapshot()
        assert snapshot["dropped"] >= cut_view.dropped and snapshot["link_up"] is False
        assert snapshot["usage_ratio"] > 0.8 and snapshot["policy"] == "drop_oldest"

        await site.restore()

        async def drained() -> bool:
            backlog = await forwarder.backlog()
            return backlog.depth == 0 and CAUSE_LOSING in await center_alarm_causes(site.hub_js)

        await wait_until(drained, 30, "log drained and the alarm at the center", interval=0.2)
        # Every entry ever stored either reached the center or was counted as dropped; the
        # alarm copies re-logged after drops (LocalAlarms.reassert) arrive as duplicates.
        # The monitor may still append (an alarm clearing as the log empties), so the sum is
        # taken once the log is drained again after the center counts were read.
        accounted: list[int] = []

        async def all_accounted() -> bool:
            readings = await center_count(site.hub_js)
            alarm_events = await center_count(site.hub_js, "UP_ALARM")
            copies = forwarder.stats().duplicates_at_center
            final = await forwarder.backlog()
            accounted[:] = [readings + alarm_events + copies + final.dropped, final.last_seq]
            return final.depth == 0 and accounted[0] == accounted[1]

        try:
            await wait_until(all_accounted, 10, "every entry at the center or dropped")
        except AssertionError:
            raise AssertionError(f"accounted for {accounted[0]} of {accounted[1]}") from None
        final = await forwarder.backlog()
        assert forwarder.stats().dropped_seen == final.dropped
        by_device, ids = readings_by_device(await center_events(site.hub_js))
        assert len(ids) == len(set(ids))
        for device, numbers in by_device.items():  # survivors (and the held probe), in order
            assert numbers == sorted(set(numbers)), device
            assert set(numbers) <= set(site.sent[device]), device
            assert numbers[-1] == site.sent[device][-1], device  # the newest survived
        assert forwarder.stats().order_violations == 0
    finally:
        await site.stop_tasks()
        await bus.close()


async def test_max_age_expiry_counts_as_dropped(make_site: SiteFactory) -> None:
    spec = site_replay_stream(
        SITE, max_bytes=1024**2, max_age_s=1.0, policy=ReplayFullPolicy.REFUSE_NEW
    )
    site = await make_site(spec=spec)
    await site.cut()
    forwarder = site.forwarder()
    await site.append(50, devices=2)

    async def expired() -> bool:
        backlog = await forwarder.backlog()
        # All expired; the probe the forwarder holds is not lost: it goes out later.
        return backlog.messages == 0 and backlog.dropped == 49

    await wait_until(expired, 10, "entries expired and counted", interval=0.2)
    await site.restore()
    await site.append(5, devices=1)
    await wait_center(site, 6)
    await asyncio.sleep(0.3)
    assert await center_count(site.hub_js) == 6
    final = await forwarder.backlog()
    assert (final.dropped, final.last_seq, final.depth) == (49, 55, 0)
    assert forwarder.stats().dropped_seen == 49
    by_device, _ = readings_by_device(await center_events(site.hub_js))
    assert by_device == {"d0": [0, 25, 26, 27, 28, 29]}  # the held probe, then the new ones


async def test_refuse_new_counts_refusals_and_alarm_reaches_center_after_space_frees(
    make_site: SiteFactory,
) -> None:
    spec = site_replay_stream(
        SITE, max_bytes=64 * 1024, max_age_s=3600, policy=ReplayFullPolicy.REFUSE_NEW
    )
    site = await make_site(spec=spec)
    await site.cut()
    forwarder = site.forwarder()
    stored = await site.append(1000, devices=5)
    assert 0 < stored < 1000 and site.refused == 1000 - stored
    assert site.log.refused == site.refused
    alarms, monitor, bus = await start_watch(site, forwarder, ReplayFullPolicy.REFUSE_NEW)
    try:

        async def alarmed() -> bool:
            return CAUSE_LOSING in active_causes(alarms) and alarms.pending > 0

        await wait_until(alarmed, 10, "refusing alarm raised, its log entry refused (pending)")
        assert monitor.snapshot()["refused"] >= site.refused
        assert (await forwarder.backlog()).dropped == 0

        await site.restore()

        async def alarm_at_center() -> bool:
            return CAUSE_LOSING in await center_alarm_causes(site.hub_js)

        await wait_until(alarm_at_center, 30, "the refusing alarm at the center", interval=0.2)
        assert alarms.pending == 0
        await wait_center(site, stored)
        await assert_center_has_exactly(site)
        raised = [
            e.data
            for e in map(REGISTRY.decode, await center_events(site.hub_js, "UP_ALARM"))
            if isinstance(e.data, AlarmRaised) and e.data.probable_cause == CAUSE_LOSING
        ]
        assert len(raised) == 1 and raised[0].entity == ENTITY
        assert raised[0].severity == "critical" and "refused" in raised[0].text
        assert forwarder.stats().order_violations == 0
    finally:
        await site.stop_tasks()
        await bus.close()


async def test_missing_consumer_is_retried_without_spinning(edge_topology: EdgeTopology) -> None:
    await asyncio.to_thread(edge_topology.add_site, SITE, mqtt=False)
    nc = await open_connection(NatsConfig.from_url(edge_topology.site(SITE).url, name="x"))
    try:
        forwarder = Forwarder(nc, SITE, FAST)
        with pytest.raises(JsNotFoundError):
            await forwarder.backlog()
        stop = asyncio.Event()
        task = asyncio.create_task(forwarder.run(stop))
        await asyncio.sleep(1.5)
        stats = forwarder.stats()
        assert 1 <= stats.failures <= 6 and "not readable" in (stats.last_error or "")
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        await nc.close()
