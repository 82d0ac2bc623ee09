"""`PipelinedPublisher`: `wait` gives results in order whatever order the replies come back in,
and a timeout for what never comes, within one `timeout_s` in all; `publish_batch` frames
messages exactly as nats-py would and fails a bad one alone (checked on a real JetStream).
"""

from __future__ import annotations

import asyncio
import string
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.errors import BadHeaderError, BadSubjectError
from nats.js.api import PubAck
from nats.js.errors import APIError

from bus.client import Bus
from bus.config import NatsConfig
from bus.jspublish import PipelinedPublisher, publish_frame
from bus.natsserver import NatsServerProcess


def _ack(seq: int) -> PubAck:
    return PubAck(stream="S", seq=seq)


async def test_wait_gives_results_in_order_when_replies_come_back_out_of_order() -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(5)]
    # The newest resolves first, an older one fails, the oldest comes last.
    for delay, n in ((0.01, 4), (0.02, 2), (0.03, 3), (0.04, 1), (0.05, 0)):
        loop.call_later(delay, futures[n].set_result, _ack(n))
    futures[2].cancel()  # replaced below by a failure
    futures[2] = loop.create_future()
    loop.call_later(0.02, futures[2].set_exception, ValueError("bad reply"))
    results = await PipelinedPublisher(nc=None).wait(futures, 5.0)  # type: ignore[arg-type]
    assert [r.seq if isinstance(r, PubAck) else repr(r) for r in results] == [
        0,
        1,
        "ValueError('bad reply')",
        3,
        4,
    ]


async def test_wait_times_out_what_never_comes_within_one_timeout_in_all() -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(4)]
    loop.call_later(0.05, futures[0].set_result, _ack(0))
    loop.call_later(0.05, futures[3].set_result, _ack(3))
    # 1 and 2 never get a reply.
    started = time.monotonic()
    results = await PipelinedPublisher(nc=None).wait(futures, 0.3)  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert isinstance(results[0], PubAck) and isinstance(results[3], PubAck)
    assert isinstance(results[1], TimeoutError) and isinstance(results[2], TimeoutError)
    assert futures[1].cancelled() and futures[2].cancelled()
    assert 0.3 <= took < 0.6  # not one timeout per unanswered future


async def test_wait_with_nothing_pending_returns_at_once() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    done.set_result(_ack(7))
    publisher = PipelinedPublisher(nc=None)  # type: ignore[arg-type]
    assert await publisher.wait([], 1.0) == []
    assert await publisher.wait([done], 0.0) == [_ack(7)]


# -- publish_batch: frames as nats-py's, on a real JetStream ---------------------------------

_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "_-$", min_size=1, max_size=12)
_NAMES = st.one_of(
    st.sampled_from(["Nats-Msg-Id", "Nats-Expected-Last-Subject-Sequence", "KV-Operation"]),
    st.text(alphabet=string.ascii_letters + "-_.!#", min_size=1, max_size=10),
    st.sampled_from(["", "  ", " Padded-Name "]),  # left out / stripped, as nats-py does
)
_VALUES = st.text(alphabet=string.ascii_letters + " \r\n:0123456789", max_size=20)


class _Captured(Client):
    """nats-py's client with its command buffer replaced by a list: what it would send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(cmd)


def _nats_py_frame(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    client = _Captured()
    asyncio.run(client._send_publish(subject, reply, payload, len(payload), headers))
    (frame,) = client.sent
    return frame


@given(
    subject=st.lists(_TOKEN, min_size=1, max_size=4).map(".".join),
    reply=st.one_of(st.just(""), _TOKEN.map(lambda t: f"_INBOX.{t}.1")),
    payload=st.binary(max_size=64),
    headers=st.one_of(st.none(), st.dictionaries(_NAMES, _VALUES, max_size=4)),
)
@settings(max_examples=300, deadline=None)
def test_publish_frame_is_the_command_nats_py_sends(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> None:
    assert publish_frame(subject, reply, payload, headers) == _nats_py_frame(
        subject, reply, payload, headers
    )


def test_publish_frame_refuses_what_nats_py_refuses() -> None:
    with pytest.raises(BadHeaderError):
        publish_frame("a.b", "", b"x", {"Bad Name": "v"})
    with pytest.raises(BadHeaderError):
        _nats_py_frame("a.b", "", b"x", {"Bad Name": "v"})
    for subject, reply in (("a b", ""), ("a.b\r\nPUB x 1", ""), ("", ""), ("a.b", "in box")):
        with pytest.raises(BadSubjectError):
            publish_frame(subject, reply, b"x", None)


async def test_publish_batch_stores_in_order_and_fails_each_bad_message_alone(
    hub: NatsServerProcess,
) -> None:
    bus = await Bus.connect(NatsConfig.from_url(hub.url, name="test-publish-batch"))
    publisher = PipelinedPublisher(bus.nc)
    try:
        await bus.js.add_stream(name="BATCH", subjects=["batch.>"])
        await publisher.start()
        messages: list[tuple[str, bytes, dict[str, str] | None]] = [
            (f"batch.k{n % 7}", f"v{n}".encode(), {"Nats-Msg-Id": f"id-{n}"})
            for n in range(1200)  # more than one frame batch
        ]
        messages[5] = ("batch.bad subject", b"x", None)  # refused here, before sending
        messages[6] = ("batch.k1", b"dup", {"Nats-Msg-Id": "id-0"})  # a duplicate: acked
        # Compare-and-set that must fail: batch.k3 has been written since sequence 1.
        messages[900] = ("batch.k3", b"late", {"Nats-Expected-Last-Subject-Sequence": "1"})
        results = await publisher.wait(await publisher.publish_batch(messages), 10)
        assert isinstance(results[5], BadSubjectError)
        assert isinstance(results[6], PubAck) and results[6].duplicate
        assert isinstance(results[900], APIError) and results[900].err_code == 10071
        stored = [r for n, r in enumerate(results) if n not in (5, 6, 900)]
        assert all(isinstance(r, PubAck) for r in stored)
        seqs = [r.seq for r in stored if isinstance(r, PubAck)]
        assert seqs == list(range(1, len(messages) - 2))  # in order, none lost
        last = await bus.js.get_msg("BATCH", seqs[-1])
        assert last.data == b"v1199" and last.headers and last.headers["Nats-Msg-Id"] == "id-1199"
    finally:
        await publisher.close()
        await bus.close()
