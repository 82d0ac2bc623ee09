"""`bus.fastbatch` against a real nats-server: what each answer of the fast-ingest protocol
turns into, message by message (stored, rejected, abandoned, unsupported, no stream, timeout).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import PubAck, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError

from bus.client import open_connection
from bus.config import NatsConfig
from bus.fastbatch import BatchAbandoned, FastBatchPublisher, FastBatchUnsupported, Message
from bus.forwarder import Outcome, classify
from bus.natsserver import NatsServerProcess


@pytest.fixture
async def nc(hub: NatsServerProcess) -> AsyncIterator[NatsClient]:
    client = await open_connection(NatsConfig.from_url(hub.url, name="fastbatch-test"))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def batcher(nc: NatsClient) -> AsyncIterator[FastBatchPublisher]:
    publisher = FastBatchPublisher(nc, flow=10)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close()


def messages(subject: str, ids: list[str], size: int = 50) -> list[Message]:
    return [(subject, f"{i:>{size}}".encode(), {"Nats-Msg-Id": i}) for i in ids]


async def stored(nc: NatsClient, stream: str) -> list[bytes]:
    js = nc.jetstream()
    total = (await js.stream_info(stream)).state.messages
    return [(await js.get_msg(stream, seq)).data or b"" for seq in range(1, total + 1)]


async def test_a_batch_is_stored_in_order_and_msg_id_dedup_still_applies(
    nc: NatsClient, batcher: FastBatchPublisher
) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="FB", subjects=["fb.>"], allow_batched=True))
    first = [f"e{n}" for n in range(1, 251)]
    results = await batcher.publish_batch(messages("fb.a", first), timeout_s=5)
    assert all(isinstance(r, PubAck) for r in results) and len(results) == 250
    assert [d.decode().strip() for d in await stored(nc, "FB")] == first  # the marker is not

    # A re-sent batch overlapping the first: only the new ids are stored.
    again = first[200:] + [f"e{n}" for n in range(251, 271)]
    results = await batcher.publish_batch(messages("fb.a", again), timeout_s=5)
    assert all(classify(r) is Outcome.STORED for r in results)
    assert [d.decode().strip() for d in await stored(nc, "FB")] == first + again[50:]


async def test_a_rejected_message_stops_the_batch_there(
    nc: NatsClient, batcher: FastBatchPublisher
) -> None:
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name="FBS", subjects=["fbs.>"], allow_batched=True, max_msg_size=200)
    )
    batch = messages("fbs.a", [f"m{n}" for n in range(1, 31)])
    batch[11] = ("fbs.a", b"x" * 500, {"Nats-Msg-Id": "m12"})  # too large for the stream
    results = await batcher.publish_batch(batch, timeout_s=5)

    assert all(isinstance(r, PubAck) for r in results[:11])
    assert isinstance(results[11], APIError) and results[11].err_code == 10054
    assert classify(results[11]) is Outcome.REJECTED  # the forwarder dead-letters this one
    # Not stored, and not the messages' fault: retried, never dead-lettered.
    assert all(isinstance(r, BatchAbandoned) for r in results[12:])
    assert all(classify(r) is Outcome.FAILED for r in results[12:])
    assert len(await stored(nc, "FBS")) == 11


async def test_a_stream_without_fast_batches_stores_nothing_and_says_so(
    nc: NatsClient, batcher: FastBatchPublisher
) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="PLAIN", subjects=["plain.>"]))
    results = await batcher.publish_batch(messages("plain.a", ["a", "b", "c"]), timeout_s=5)
    assert all(isinstance(r, FastBatchUnsupported) for r in results)
    assert classify(results[0]) is Outcome.FAILED
    assert (await js.stream_info("PLAIN")).state.messages == 0


async def test_no_stream_answers_no_responders_and_sends_nothing_more(
    nc: NatsClient, batcher: FastBatchPublisher
) -> None:
    results = await batcher.publish_batch(messages("nowhere.a", ["a", "b", "c"]), timeout_s=5)
    assert isinstance(results[0], NoStreamResponseError)
    assert all(isinstance(r, BatchAbandoned) for r in results[1:])


async def test_nobody_answering_times_out_every_message(
    nc: NatsClient, batcher: FastBatchPublisher
) -> None:
    heard: list[Msg] = []

    async def silent(msg: Msg) -> None:  # a plain subscriber: takes it, never answers
        heard.append(msg)

    await nc.subscribe("silent.>", cb=silent)
    await nc.flush()
    results = await batcher.publish_batch(messages("silent.a", ["a", "b"]), timeout_s=0.5)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert len(heard) == 1  # only the first message went out: no begun batch, no marker
