"""Integration tests of `bus.client.Bus` against a real nats-server (the `hub` fixture).

No mocks: typed pub/sub, queue groups, request/reply, JetStream dedup, dead-lettering of every
kind of bad input into the center's DEADLETTER stream, draining on close, bounded connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import nats.errors
import pytest
from nats.js.api import RawStreamMsg

from bus.client import MSG_ID_HEADER, Bus, BusConnectError, RemoteError
from bus.config import NatsConfig
from bus.deadletter import HEADER_PREFIX, ORIGINAL_HEADER_PREFIX
from bus.natsserver import NatsServerProcess, free_port
from bus.streams import StreamSpec, dead_letter_stream, ensure_stream
from schemas import REGISTRY, Event, new_event_id, schema_uri
from schemas.common import ErrorReply
from schemas.devices import DeviceReading

pytestmark = pytest.mark.timeout(60)

DLQ = "DEADLETTER"
READING = "edgebus.device.reading"


# -- helpers ---------------------------------------------------------------------------------


def reading(i: int = 0, *, device: str = "d1") -> DeviceReading:
    return DeviceReading(site="s1", device=device, channel="temp", payload={"i": i})


def config(url: str, name: str) -> NatsConfig:
    return NatsConfig.from_url(url, name=name, connect_timeout_s=5.0)


BARRIER_SUBJECT = "_test.barrier"


async def synced(bus: Bus) -> None:
    """Return once the server has processed everything `bus` sent so far (SUB, PUB, ...).

    nats-py 2.16's `flush()` writes its PING straight to the socket, ahead of commands still
    in its outgoing buffer, so its PONG proves nothing about them (measured: ~1% of
    subscriptions were not yet registered after `flush()`). A request is queued behind
    them; the server answers "no responders" only after processing what came before.
    """
    with contextlib.suppress(nats.errors.NoRespondersError):
        await bus.nc.request(BARRIER_SUBJECT, b"", timeout=5)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def dead_letters(bus: Bus) -> list[RawStreamMsg]:
    """Every record in the center DEADLETTER stream, oldest first."""
    info = await bus.js.stream_info(DLQ)
    if info.state.messages == 0:
        return []
    return [
        await bus.js.get_msg(DLQ, seq)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


async def dead_letter_count(bus: Bus) -> int:
    return (await bus.js.stream_info(DLQ)).state.messages


async def has_dead_letters(bus: Bus, count: int) -> bool:
    return await dead_letter_count(bus) == count


def raw_event(event_type: str, version: int, data: Any) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": new_event_id(),
            "source": "/test",
            "type": event_type,
            "time": "2026-01-01T00:00:00Z",
            "dataschema": schema_uri(event_type, version),
            "data": data,
        }
    ).encode()


class Collector:
    """A typed handler that records what it was given."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.events: list[Event[DeviceReading]] = []
        self.delay = delay

    async def __call__(self, event: Event[DeviceReading]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.events.append(event)

    @property
    def payload_is(self) -> list[Any]:
        return [e.data.payload["i"] for e in self.events]


@pytest.fixture
async def bus(hub: NatsServerProcess) -> AsyncIterator[Bus]:
    bus = await Bus.connect(config(hub.url, "test-bus"), scope="center")
    await ensure_stream(bus.js, dead_letter_stream("center"))
    try:
        yield bus
    finally:
        await bus.close()


@pytest.fixture
async def publisher(hub: NatsServerProcess) -> AsyncIterator[Bus]:
    """A second, independent connection, as another service would have."""
    bus = await Bus.connect(config(hub.url, "test-publisher"), scope="center")
    try:
        yield bus
    finally:
        await bus.close()


# -- typed publish / subscribe ---------------------------------------------------------------


async def test_typed_publish_reaches_subscriber_as_a_validated_event(
    bus: Bus, publisher: Bus
) -> None:
    received = Collector()
    await bus.subscribe("evt.s1.reading.d1.temp", DeviceReading, received)
    await synced(bus)
    sent = publisher.event(reading(7), subject="d1", correlation_id="c-7")

    await publisher.publish("evt.s1.reading.d1.temp", sent)

    await eventually(lambda: len(received.events) == 1, what="event delivered")
    got = received.events[0]
    assert got == sent
    assert isinstance(got.data, DeviceReading)
    assert got.source == "/center"  # the publishing bus's default source
    assert (got.subject, got.correlationid) == ("d1", "c-7")
    assert await dead_letter_count(bus) == 0


async def test_queue_group_splits_messages_between_subscribers_without_loss(
    bus: Bus, publisher: Bus, hub: NatsServerProcess
) -> None:
    other = await Bus.connect(config(hub.url, "test-bus-2"))
    try:
        first, second = Collector(), Collector()
        await bus.subscribe("work.items", DeviceReading, first, queue="workers")
        await other.subscribe("work.items", DeviceReading, second, queue="workers")
        await synced(bus)
        await synced(other)

        for i in range(400):
            await publisher.publish("work.items", publisher.event(reading(i)))
        await synced(publisher)

        await eventually(
            lambda: len(first.events) + len(second.events) >= 400, what="all 400 handled"
        )
        await asyncio.sleep(0.1)  # nothing more (no duplicates) trickles in afterwards
    finally:
        await other.close()

    assert sorted(first.payload_is + second.payload_is) == list(range(400))
    assert first.events and second.events, (len(first.events), len(second.events))


# -- request / reply -------------------------------------------------------------------------


async def test_request_reply_is_typed_and_correlated(bus: Bus, publisher: Bus) -> None:
    seen: list[Event[DeviceReading]] = []

    async def double(request: Event[DeviceReading]) -> DeviceReading:
        seen.append(request)
        return request.data.model_copy(update={"payload": {"i": request.data.payload["i"] * 2}})

    await bus.serve("ctl.test.double", DeviceReading, double)
    await synced(bus)

    answer = await publisher.request(
        "ctl.test.double", reading(21), DeviceReading, correlation_id="op-1"
    )
    plain = await publisher.request("ctl.test.double", reading(5), DeviceReading)

    assert isinstance(answer.data, DeviceReading)
    assert answer.data.payload == {"i": 42}
    assert answer.correlationid == "op-1"
    assert answer.type == READING
    assert plain.data.payload == {"i": 10}
    # Without a correlation id, the reply is correlated with the request's own id.
    assert plain.correlationid == seen[1].id
    assert seen[0].correlationid == "op-1"


async def test_failing_request_handler_answers_remote_error_and_dead_letters(
    bus: Bus, publisher: Bus
) -> None:
    async def broken(request: Event[DeviceReading]) -> DeviceReading:
        raise ValueError("sensor table missing")

    await bus.serve("ctl.test.broken", DeviceReading, broken, component="broken-svc")
    await synced(bus)

    started = time.monotonic()
    with pytest.raises(RemoteError) as caught:
        await publisher.request("ctl.test.broken", reading(1), DeviceReading, timeout=5)

    assert time.monotonic() - started < 2  # answered, not timed out
    assert caught.value.code == "handler_failed"
    assert "sensor table missing" in str(caught.value)
    await eventually(lambda: has_dead_letters(bus, 1), what="dead letter stored")
    [record] = await dead_letters(bus)
    assert record.subject == "dlq.center.broken-svc.handler_failed"
    assert record.headers is not None
    assert record.headers[f"{HEADER_PREFIX}Reason"] == "handler_failed"
    assert record.headers[f"{HEADER_PREFIX}Subject"] == "ctl.test.broken"
    assert "sensor table missing" in record.headers[f"{HEADER_PREFIX}Detail"]
    assert REGISTRY.decode_as(record.data, DeviceReading).data == reading(1)
    assert bus.handler_errors == 1


async def test_undecodable_request_is_answered_with_its_reason(bus: Bus, publisher: Bus) -> None:
    async def never(request: Event[DeviceReading]) -> DeviceReading:
        raise AssertionError("must not be called")

    await bus.serve("ctl.test.strict", DeviceReading, never)
    await synced(bus)

    reply = await publisher.nc.request("ctl.test.strict", b"{oops", timeout=5)

    error = REGISTRY.decode_as(reply.data, ErrorReply)
    assert error.data.code == "malformed"
    await eventually(lambda: has_dead_letters(bus, 1), what="dead letter stored")


# -- JetStream -------------------------------------------------------------------------------


async def test_publish_js_twice_with_the_same_event_is_stored_once(bus: Bus) -> None:
    await ensure_stream(bus.js, StreamSpec(name="UPTEST", subjects=("up.s1.test.>",)))
    event = bus.event(reading(3))

    first = await bus.publish_js("up.s1.test.readings", event)
    second = await bus.publish_js("up.s1.test.readings", event)
    other = await bus.publish_js("up.s1.test.readings", bus.event(reading(3)))

    assert not first.duplicate
    assert second.duplicate is True
    assert second.seq == first.seq
    assert other.seq == first.seq + 1 and not other.duplicate
    info = await bus.js.stream_info("UPTEST")
    assert info.state.messages == 2
    stored = await bus.js.get_msg("UPTEST", first.seq)
    assert stored.headers is not None and stored.headers[MSG_ID_HEADER] == event.id
    assert REGISTRY.decode_as(stored.data, DeviceReading) == event


# -- dead letters ----------------------------------------------------------------------------


async def test_every_kind_of_bad_input_is_dead_lettered_with_its_reason(
    hub: NatsServerProcess, publisher: Bus
) -> None:
    # The server refuses anything over its max_payload (1 MiB, equal to the registry's
    # default limit), so this consumer reads with a lower limit to see "oversize" over NATS.
    small = dataclasses.replace(REGISTRY, max_event_bytes=32 * 1024)
    bus = await Bus.connect(config(hub.url, "dlq-test"), registry=small)
    try:
        await ensure_stream(bus.js, dead_letter_stream("center"))
        received = Collector()
        await bus.subscribe("evt.s1.reading.>", DeviceReading, received, component="ingest")
        await synced(bus)

        good = REGISTRY.encode(publisher.event(reading(1)))
        oversize = REGISTRY.encode(
            publisher.event(reading(2).model_copy(update={"payload": {"pad": "x" * 40_000}}))
        )
        bad_inputs = [
            ("malformed", b"{not json at all"),
            ("unknown_type", raw_event("edgebus.never.heard.of", 1, {"a": 1})),
            ("unsupported_version", raw_event(READING, 2, {**reading(1).model_dump(), "x": 1})),
            ("schema", raw_event(READING, 1, {**reading(1).model_dump(), "site": "no spaces!"})),
            ("oversize", oversize),
            ("envelope", json.dumps({"specversion": "1.0", "id": "x"}).encode()),
        ]
        subjects = []
        for n, (_, raw) in enumerate(bad_inputs):
            subject = f"evt.s1.reading.dev{n}.temp"
            subjects.append(subject)
            await publisher.nc.publish(subject, raw, headers={"X-Trace": f"trace-{n}"})
        await publisher.nc.publish("evt.s1.reading.after.temp", good)
        await synced(publisher)

        await eventually(
            lambda: has_dead_letters(bus, len(bad_inputs)), what="all dead letters stored"
        )
        await eventually(lambda: len(received.events) == 1, what="good event still handled")
        records = await dead_letters(bus)
    finally:
        await bus.close()

    assert [r.headers[f"{HEADER_PREFIX}Reason"] for r in records if r.headers] == [
        reason for reason, _ in bad_inputs
    ]
    for n, (record, (reason, raw), subject) in enumerate(
        zip(records, bad_inputs, subjects, strict=True)
    ):
        assert record.data == raw  # the original bytes, verbatim
        assert record.subject == f"dlq.center.ingest.{reason}"
        assert record.headers is not None
        assert record.headers[f"{HEADER_PREFIX}Subject"] == subject
        assert record.headers[f"{HEADER_PREFIX}Component"] == "ingest"
        assert record.headers[f"{HEADER_PREFIX}Size"] == str(len(raw))
        assert record.headers[f"{HEADER_PREFIX}Detail"]
        assert record.headers[f"{ORIGINAL_HEADER_PREFIX}X-Trace"] == f"trace-{n}"
    assert bus.dead_letters.counts == {reason: 1 for reason, _ in bad_inputs}
    assert bus.dead_letters.store_failures == 0
    assert received.payload_is == [1]


async def test_handler_exception_is_dead_lettered_and_later_messages_still_handled(
    bus: Bus, publisher: Bus
) -> None:
    handled: list[int] = []

    async def picky(event: Event[DeviceReading]) -> None:
        if event.data.payload["i"] == 2:
            raise RuntimeError("cannot handle 2")
        handled.append(event.data.payload["i"])

    await bus.subscribe("evt.s1.reading.>", DeviceReading, picky, component="picky")
    await synced(bus)
    events = [publisher.event(reading(i)) for i in range(1, 6)]
    for event in events:
        await publisher.publish("evt.s1.reading.d1.temp", event)
    await synced(publisher)

    await eventually(lambda: len(handled) == 4, what="the other four handled")
    await eventually(lambda: has_dead_letters(bus, 1), what="dead letter stored")
    [record] = await dead_letters(bus)
    assert handled == [1, 3, 4, 5]
    assert record.subject == "dlq.center.picky.handler_failed"
    assert record.headers is not None
    assert record.headers[f"{HEADER_PREFIX}Reason"] == "handler_failed"
    assert "cannot handle 2" in record.headers[f"{HEADER_PREFIX}Detail"]
    assert record.data == REGISTRY.encode(events[1])
    assert bus.handler_errors == 1
    assert bus.dead_letters.counts == {"handler_failed": 1}


# -- lifecycle -------------------------------------------------------------------------------


async def test_close_drains_every_message_published_before_it(
    hub: NatsServerProcess, publisher: Bus
) -> None:
    bus = await Bus.connect(config(hub.url, "drain-test"))
    slow = Collector(delay=0.002)  # handlers still busy when close() is called
    await bus.subscribe("evt.s1.reading.>", DeviceReading, slow)
    await synced(bus)
    for i in range(300):
        await publisher.publish("evt.s1.reading.d1.temp", publisher.event(reading(i)))
    await synced(publisher)
    assert len(slow.events) < 300

    await bus.close()

    assert slow.payload_is == list(range(300))
    assert bus.nc.is_closed
    await bus.close()  # idempotent


async def test_close_does_not_stall_on_messages_that_are_dead_lettered_while_draining(
    hub: NatsServerProcess, publisher: Bus
) -> None:
    bus = await Bus.connect(config(hub.url, "drain-dlq-test"))
    await ensure_stream(bus.js, dead_letter_stream("center"))
    slow = Collector(delay=0.002)
    await bus.subscribe("evt.s1.reading.>", DeviceReading, slow)
    await synced(bus)
    for i in range(100):
        await publisher.publish("evt.s1.reading.d1.temp", publisher.event(reading(i)))
        if i % 25 == 0:
            await publisher.nc.publish("evt.s1.reading.d1.temp", b"garbage")
    await synced(publisher)

    started = time.monotonic()
    await bus.close()
    took = time.monotonic() - started

    assert slow.payload_is == list(range(100))
    # Dead-lettering during the drain needs JetStream acks: if the request inbox were
    # drained first, each one would wait out its 5 s publish timeout and count as lost.
    assert took < 3, f"close() took {took:.1f}s"
    assert bus.dead_letters.counts == {"malformed": 4}
    assert bus.dead_letters.store_failures == 0
    assert await dead_letter_count(publisher) == 4


async def test_close_still_drains_when_a_subscription_was_already_unsubscribed(
    hub: NatsServerProcess, publisher: Bus
) -> None:
    bus = await Bus.connect(config(hub.url, "drain-unsub-test"))
    gone, kept = Collector(), Collector(delay=0.002)
    sub = await bus.subscribe("evt.s1.reading.gone.>", DeviceReading, gone)
    await bus.subscribe("evt.s1.reading.kept.>", DeviceReading, kept)
    await sub.unsubscribe()
    await synced(bus)
    for i in range(50):
        await publisher.publish("evt.s1.reading.kept.temp", publisher.event(reading(i)))
        await publisher.publish("evt.s1.reading.gone.temp", publisher.event(reading(i)))
    await synced(publisher)

    await asyncio.wait_for(bus.close(), timeout=10)

    assert kept.payload_is == list(range(50))
    assert gone.events == []
    assert bus.nc.is_closed


async def test_connect_to_a_dead_port_fails_fast_with_bus_connect_error() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()

    with pytest.raises(BusConnectError) as caught:
        await Bus.connect(NatsConfig.from_url(url, connect_timeout_s=1.0))

    took = time.monotonic() - started
    assert took < 3, f"took {took:.1f}s with connect_timeout_s=1"
    assert isinstance(caught.value, ConnectionError)
    assert url in str(caught.value)
    assert not str(caught.value).rstrip().endswith(":"), "the reason for failing is missing"
    # Nothing is left retrying in the background after the failure.
    await asyncio.sleep(0.3)
    leftovers = [
        task
        for task in asyncio.all_tasks()
        if "/nats/" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
    ]
    assert leftovers == []


async def test_raw_nats_client_sees_the_same_bytes_the_bus_encodes(
    hub: NatsServerProcess, bus: Bus
) -> None:
    # The wire format is plain CloudEvents JSON: a non-edgebus client can read it.
    nc = await nats.connect(hub.url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        sub = await nc.subscribe("evt.s1.reading.raw.temp")
        with contextlib.suppress(nats.errors.NoRespondersError):
            await nc.request(BARRIER_SUBJECT, b"", timeout=5)
        event = bus.event(reading(9))
        await bus.publish("evt.s1.reading.raw.temp", event)
        msg = await sub.next_msg(timeout=5)
    finally:
        await nc.close()

    assert msg.data == REGISTRY.encode(event)
    assert json.loads(msg.data)["id"] == event.id
