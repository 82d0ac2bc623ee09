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
