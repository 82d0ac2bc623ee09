"""`bus.pullfeed.PullFeed` on a real server: a reader slower than its stream holds at most
`max_buffered` (+ one batch) deliveries, and still gets every message once, in order."""

from __future__ import annotations

import asyncio

from nats.js.api import AckPolicy, ConsumerConfig

from bus.client import open_connection
from bus.config import NatsConfig
from bus.natsserver import NatsServerProcess
from bus.pullfeed import PullFeed
from bus.streams import StreamSpec, ensure_stream

STREAM, CONSUMER, TOTAL = "FEEDTEST", "reader", 3000


async def test_a_slow_reader_holds_a_bounded_buffer_and_misses_nothing(
    hub: NatsServerProcess,
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="pullfeed-test"))
    try:
        js = nc.jetstream()
        await ensure_stream(js, StreamSpec(name=STREAM, subjects=("feedtest.>",)))
        for n in range(TOTAL):
            await js.publish(f"feedtest.{n % 7}", str(n).encode())
        await js.add_consumer(
            STREAM, ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.ALL)
        )
        feed = PullFeed(nc, STREAM, CONSUMER, batch=100, max_buffered=300)
        await feed.start()
        first = await feed.next_batch(10, timeout_s=5)
        await asyncio.sleep(0.5)  # the stream could deliver everything meanwhile
        assert 0 < feed.buffered <= 300 + 100, feed.buffered
        seen = [int(m.data) for m in first]
        while len(seen) < TOTAL:
            batch = await feed.next_batch(50, timeout_s=5)
            assert batch, f"stalled after {len(seen)}"
            assert feed.buffered <= 300 + 100
            seen += [int(m.data) for m in batch]
            await batch[-1].ack()
        assert seen == list(range(TOTAL))
        await feed.stop()
    finally:
        await nc.close()


async def test_two_requests_stay_in_flight_and_an_expired_one_is_accounted(
    hub: NatsServerProcess,
) -> None:
    """The next pull request goes out while the one before still delivers; an idle feed's
    expired requests (408, with what they left undelivered) leave nothing counted as due
    that will never come, so a message published later arrives at once."""
    nc = await open_connection(NatsConfig.from_url(hub.url, name="pullfeed-test"))
    try:
        js = nc.jetstream()
        await ensure_stream(js, StreamSpec(name="FEEDTWO", subjects=("feedtwo.>",)))
        for n in range(1000):
            await js.publish("feedtwo.x", str(n).encode())
        await js.add_consumer(
            "FEEDTWO", ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.ALL)
        )
        feed = PullFeed(nc, "FEEDTWO", CONSUMER, batch=100, expires_s=0.5)
        due_after_claims: list[int] = []
        expired_left: list[str | None] = []
        claim, on_status = feed._claim_request, feed._on_status

        def spy_claim() -> bool:
            claimed = claim()
            due_after_claims.append(feed._outstanding)
            return claimed

        async def spy_status(status: str, description: str, pending: str | None) -> None:
            if status == "408":
                expired_left.append(pending)
            await on_status(status, description, pending)

        feed._claim_request = spy_claim  # type: ignore[method-assign]
        feed._on_status = spy_status  # type: ignore[method-assign]
        await feed.start()
        seen: list[int] = []
        loop = asyncio.get_running_loop()
        reading_since = loop.time()
        while len(seen) < 1000:
            batch = await feed.next_batch(50, timeout_s=5)
            assert batch, f"stalled after {len(seen)}"
            seen += [int(m.data) for m in batch]
        assert seen == list(range(1000))
        # Deliveries wake a waiting reader at once: no `next_batch` sat out its timeout.
        assert loop.time() - reading_since < 4.0
        assert max(due_after_claims) > 100  # a second request went out before the first ended
        assert max(due_after_claims) <= 200
        await batch[-1].ack()

        await asyncio.sleep(1.6)  # idle: each request in flight expires, and is renewed
        assert expired_left and all(p is not None and p.isdigit() for p in expired_left)
        assert 0 < feed._outstanding <= 200
        await js.publish("feedtwo.x", b"late")
        started = asyncio.get_running_loop().time()
        late = await feed.next_batch(10, timeout_s=5)
        assert [m.data for m in late] == [b"late"]
        assert asyncio.get_running_loop().time() - started < 0.4  # not after an expiry
        await feed.stop()
    finally:
        await nc.close()
