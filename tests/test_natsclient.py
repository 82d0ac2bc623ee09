"""`bus.natsclient`: its header parser gives exactly nats-py's result for any header block, its
protocol parser (`bus.wireparser`) makes exactly nats-py's calls for any byte stream cut any
way, and every `bus` connection uses both."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Coroutine
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.protocol.parser import AWAITING_MSG_PAYLOAD, Parser

from bus.client import open_connection
from bus.config import NatsConfig
from bus.natsclient import _WHITESPACE, EdgebusNatsClient
from bus.natsserver import NatsServerProcess
from bus.wireparser import WireParser

# Names and values mixing what matters: whitespace of every kind, colons, non-ASCII, CR/LF.
_PIECES = st.sampled_from(
    [b"Nats-Msg-Id", b"a", b"X", b" ", b"\t", b"\x0b", b"\x1c", b":", b"\xc3\xa9", b"\xff",
     b"\r", b"\n", b"\r\n", b"", b"0", b"-", b"\x00", b"value with spaces"]
)  # fmt: skip
_LINE = st.lists(_PIECES, max_size=8).map(b"".join)
_BLOCK = st.lists(_LINE, max_size=6).map(b"\r\n".join)


@settings(max_examples=2000)
@given(_BLOCK)
def test_parses_every_header_block_exactly_as_nats_py(raw: bytes) -> None:
    assert EdgebusNatsClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_whitespace_pattern_matches_isspace_on_every_ascii_character() -> None:
    for code in range(128):
        name = f"a{chr(code)}b"
        assert (_WHITESPACE.search(name) is not None) == any(c.isspace() for c in name), code


def test_a_typical_replay_entry_header_block() -> None:
    raw = b"Nats-Msg-Id: 42\r\nEdgebus-Event-Id: 01a2-x\r\n\r\n"
    assert EdgebusNatsClient._parse_header_lines(raw) == {
        "Nats-Msg-Id": "42", "Edgebus-Event-Id": "01a2-x"
    }  # fmt: skip


async def test_bus_connections_use_it_and_headers_arrive(hub: NatsServerProcess) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="natsclient-test"))
    try:
        assert isinstance(nc, EdgebusNatsClient)
        sub = await nc.subscribe("hdr.test")
        await nc.publish("hdr.test", b"x", headers={"Nats-Msg-Id": "1", "B": "two words"})
        msg = await sub.next_msg(timeout=5)
        assert msg.headers == {"Nats-Msg-Id": "1", "B": "two words"}
    finally:
        await nc.close()


# ---------------------------------------------------------------------------
# bus.wireparser.WireParser against nats-py's Parser
# ---------------------------------------------------------------------------


class _RecordingNc:
    """Stands in for the client: records every call the parser makes, never suspends."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.parser: Parser | None = None
        self.reset_on_msg = -1  # reset the parser from inside the n-th _process_msg

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None
    ) -> None:
        args = (sid, subject, reply, data, hdr)
        self.calls.append(("msg", *args, tuple(type(a).__name__ for a in args)))
        if len(self.calls) - 1 == self.reset_on_msg and self.parser is not None:
            self.parser.reset()

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_err(self, emsg: str) -> None:
        self.calls.append(("err", emsg))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Runs a coroutine that never suspends (the recording nc does not), without a loop."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise AssertionError("parser suspended")


def _state(parser: Parser) -> tuple[Any, ...]:
    pending = parser.state == AWAITING_MSG_PAYLOAD
    msg = (parser.needed, parser.header_needed, dict(parser.msg_arg)) if pending else None
    return bytes(parser.buf), parser.state, msg


class _HandingOverNc(_RecordingNc):
    """Takes messages of an odd sid synchronously (`deliver_now`), as direct deliveries are;
    records them as `_process_msg` calls, so the call list compares with nats-py's."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_over = 0

    def deliver_now(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None
    ) -> bool:
        if sid % 2 == 0:
            return False
        args = (sid, subject, reply, data, hdr)
        self.calls.append(("msg", *args, tuple(type(a).__name__ for a in args)))
        self.handed_over += 1
        return True


def _feed(
    parser_type: type[Parser],
    chunks: list[bytes],
    reset_on_msg: int = -1,
    nc_type: type[_RecordingNc] = _RecordingNc,
) -> Any:
    """Calls made, parser state after each chunk, and the exception type that stopped it."""
    nc = nc_type()
    parser = parser_type(nc)
    nc.parser, nc.reset_on_msg = parser, reset_on_msg
    states = []
    error: type[BaseException] | None = None
    for chunk in chunks:
        try:
            _run(parser.parse(chunk))
        except Exception as exc:
            error = type(exc)
        states.append(_state(parser))
        if error is not None:
            break
    return nc.calls, states, error


_SUBJECT = st.sampled_from([b"a", b"site.s1.telemetry.temp", b"$JS.ACK.ev.c.1.42.42.1700.0"])
_SID = st.integers(1, 300)
_REPLY = st.sampled_from([None, b"_INBOX.abc.1", b"$JS.ACK.ev.c.1.7.7.1700.0", b"7"])
_PAYLOAD = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"", b"\r\n", b"MSG a 1 3\r\n", b"HMSG a 1 0 2\r\n", b"PING\r\n",
                     b"12\r\n", b" 3\r\n", b"\r\n\r\n", b"x" * 5000]),
)  # fmt: skip
_HEADER_NAME = st.sampled_from([b"Nats-Msg-Id", b"Edgebus-Event-Id", b"B", b"Nats-Expected-Stream"])
_HEADER_VALUE = st.sampled_from([b"1", b"01a2-x", b"two words", b"", b"\xc3\xa9"])
_HEADER_BLOCK = st.one_of(
    st.lists(st.tuples(_HEADER_NAME, _HEADER_VALUE), max_size=3).map(
        lambda items: b"NATS/1.0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in items)
        + b"\r\n"
    ),
    st.sampled_from([b"NATS/1.0 503\r\n\r\n", b"NATS/1.0 408 Request Timeout\r\n\r\n", b"",
                     b"12\r\n", b" \r\n"]),
)  # fmt: skip


@st.composite
def _msg(draw: st.DrawFn) -> bytes:
    subject, sid, reply, payload = draw(_SUBJECT), draw(_SID), draw(_REPLY), draw(_PAYLOAD)
    fields = [b"MSG", subject, b"%d" % sid, *([reply] if reply else []), b"%d" % len(payload)]
    return b" ".join(fields) + b"\r\n" + payload + b"\r\n"


@st.composite
def _hmsg(draw: st.DrawFn) -> bytes:
    subject, sid, reply, payload = draw(_SUBJECT), draw(_SID), draw(_REPLY), draw(_PAYLOAD)
    headers = draw(_HEADER_BLOCK)
    total = len(headers) + len(payload)
    fields = [b"HMSG", subject, b"%d" % sid, *([reply] if reply else [])]
    fields += [b"%d" % len(headers), b"%d" % total]
    return b" ".join(fields) + b"\r\n" + headers + payload + b"\r\n"


_CONTROL = st.sampled_from([
    b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'Stale Connection'\r\n", b"-ERR 'x'\r\n",
    b'INFO {"server_id":"NABC","max_payload":1048576,"headers":true}\r\n',
])  # fmt: skip
# Shapes the server does not send but nats-py's regexes accept or reject in their own ways:
# extra whitespace, lines run together, bad numbers, unknown operations, broken INFO and -ERR.
_ODD = st.sampled_from([
    b"MSG  a 1 3\r\nabc\r\n", b"MSG a\t1 3\r\nabc\r\n", b"MSG a 1 3 \r\nabc\r\n",
    b"MSG a 1 r\t3\r\nabc\r\n", b"MSG a 1 r\n3\r\nabc\r\n", b"MSG a 1\r\n3\r\nabc\r\n",
    b"MSG a x 3\r\nabc\r\n", b"MSG a 1 +3\r\nabc\r\n", b"MSG a 1_0 3\r\nabc\r\n",
    b"MSG a 1 2 3 4\r\nab\r\n", b" MSG a 1 3\r\nabc\r\n", b"MSG a 1 r 3\r\nabc\r\n",
    b"HMSG a 1 2 1\r\nab\r\n", b"HMSG a 1 r x 4\r\nabcd\r\n", b"HMSG a 1 4\r\nabcd\r\n",
    b"HMSG a 1 r 12 4\r\nabcd\r\n", b"HMSG a 1 2 4\r\n\r\n2\r\n", b"HMSG a 1  2 4\r\nabcd\r\n",
    b"HMSG a 1 r\r2 4\r\nabcd\r\n", b"HMSG a 1 +2 4\r\nabcd\r\n", b"PING \r\n",
    b"MSG a 1 " + b"9" * 4400 + b"\r\n",
    b"+OK\r\n\r\n", b"PONG\r\n \r\n", b"-ERR\r\n", b"INFO {bad\r\n", b"FOO\r\n", b"\r\n",
    b"MSG\r\n", b"msg a 1 3\r\nabc\r\n",
])  # fmt: skip
_WILD = st.lists(
    st.sampled_from([b"MSG", b"HMSG", b" ", b"\t", b"\r\n", b"\r", b"\n", b"1", b"12", b"a",
                     b"PING", b"+OK"]),
    max_size=10,
).map(b"".join)  # fmt: skip
_FRAME = st.one_of(_msg(), _msg(), _hmsg(), _hmsg(), _CONTROL, _ODD, _WILD)


@st.composite
def _chunked_stream(draw: st.DrawFn) -> list[bytes]:
    stream = b"".join(draw(st.lists(_FRAME, max_size=12)))
    if draw(st.booleans()):  # one byte at a time
        return [stream[i : i + 1] for i in range(len(stream))][:2000] or [b""]
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chunked_stream(), st.integers(-1, 4))
def test_wire_parser_makes_exactly_nats_pys_calls(chunks: list[bytes], reset_on_msg: int) -> None:
    expected = _feed(Parser, chunks, reset_on_msg)
    assert _feed(WireParser, chunks, reset_on_msg) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chunked_stream())
def test_messages_handed_over_synchronously_keep_their_place(chunks: list[bytes]) -> None:
    """Whether a message goes to `deliver_now` or is awaited, the calls, their order and the
    parser's states are nats-py's."""
    assert _feed(WireParser, chunks, nc_type=_HandingOverNc) == _feed(Parser, chunks)


def test_wire_parser_hands_over_what_deliver_now_takes() -> None:
    stream = b"MSG a 1 2\r\nhi\r\nMSG a 2 2\r\nho\r\nMSG a 3 1\r\n"
    nc = _HandingOverNc()
    parser = WireParser(nc)
    _run(parser.parse(stream))
    assert parser.state == AWAITING_MSG_PAYLOAD
    _run(parser.parse(b"x\r\n"))  # the last one's payload comes in a later read
    assert [call[1] for call in nc.calls] == [1, 2, 3]
    assert nc.handed_over == 2  # sids 1 and 3; sid 2 was awaited


def test_wire_parser_takes_a_message_cut_anywhere() -> None:
    headers = b"NATS/1.0\r\nNats-Msg-Id: 42\r\n\r\n"
    stream = (
        b"MSG a.b 7 _INBOX.r 5\r\nhello\r\n"
        + b"HMSG a.c 8 %d %d\r\n" % (len(headers), len(headers) + 3) + headers + b"abc\r\n"
        + b"PING\r\nMSG a.d 9 0\r\n\r\n"
    )  # fmt: skip
    calls = _feed(Parser, [stream])[0]
    assert [call[0] for call in calls] == ["msg", "msg", "ping", "msg"]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            chunks = [stream[:i], stream[i:j], stream[j:]]
            assert _feed(WireParser, chunks)[0] == calls, (i, j)
            for reset_on_msg in (0, 1):  # the client resets the parser while it dispatches
                expected = _feed(Parser, chunks, reset_on_msg)
                assert _feed(WireParser, chunks, reset_on_msg) == expected, (i, j, reset_on_msg)


class _GatedNc(_RecordingNc):
    """Its `_process_msg` suspends until the gate opens, as a real one may."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None
    ) -> None:
        self.calls.append((sid, subject, reply, data, hdr))
        await self.gate.wait()


async def test_wire_parser_drops_a_read_when_reset_while_dispatching() -> None:
    nc = _GatedNc()
    parser = WireParser(nc)
    gate = nc.gate
    task = asyncio.create_task(parser.parse(b"MSG a 1 1\r\nx\r\nMSG a 1 1\r\ny\r\nMSG a 1 "))
    await asyncio.sleep(0)
    parser.reset()  # what the client does on reconnect while the read loop is suspended
    await parser.parse(b"MSG b 2 1")  # the new connection's first bytes
    gate.set()
    await task
    assert nc.calls == [(1, b"a", b"", b"x", None)]
    assert bytes(parser.buf) == b"MSG b 2 1"
    await parser.parse(b"\r\nz\r\n")
    assert nc.calls[-1] == (2, b"b", b"", b"z", None)


async def test_large_and_mixed_messages_arrive_intact_and_in_order(hub: NatsServerProcess) -> None:
    sub_nc = await open_connection(NatsConfig.from_url(hub.url, name="wireparser-sub"))
    pub_nc = await open_connection(NatsConfig.from_url(hub.url, name="wireparser-pub"))
    try:
        assert isinstance(sub_nc, EdgebusNatsClient)
        assert isinstance(sub_nc._ps, WireParser)
        sub = await sub_nc.subscribe("wp.>")
        await sub_nc.flush()
        rng = random.Random(7)
        sent: list[tuple[str, str, bytes, dict[str, str] | None]] = []
        for i in range(400):
            size = 200_000 if i % 25 == 3 else rng.choice([0, 1, 2, 360, rng.randint(0, 5000)])
            payload = rng.randbytes(size)
            if i % 7 == 0:
                payload = b"\r\nMSG wp.fake 1 3\r\nabc\r\n" + payload
            subject = f"wp.{i % 5}.n{i}"
            reply = f"_INBOX.wp.{i}" if i % 3 == 0 else ""
            headers = {"Nats-Msg-Id": str(i), "B": "two words"} if i % 2 else None
            await pub_nc.publish(subject, payload, reply=reply, headers=headers)
            sent.append((subject, reply, payload, headers))
        await pub_nc.flush()
        for subject, reply, payload, headers in sent:
            msg = await sub.next_msg(timeout=10)
            assert (msg.subject, msg.reply, msg.data, msg.headers) == (
                subject, reply, payload, headers
            )  # fmt: skip
        assert sub_nc.stats["in_msgs"] >= len(sent)
    finally:
        await pub_nc.close()
        await sub_nc.close()


# ---------------------------------------------------------------------------
# Direct delivery: lazily parsed headers equal nats-py's
# ---------------------------------------------------------------------------


@settings(max_examples=1000)
@given(_BLOCK)
def test_a_delivered_message_reads_its_headers_as_nats_py_would(lines: bytes) -> None:
    from bus.natsclient import DeliveredMsg

    for raw in (b"NATS/1.0\r\n" + lines, b"NATS/1.0\r\n" + lines + b"\r\n\r\n", b"NATS/1.0\r\n"):
        client = EdgebusNatsClient()
        coro = Client._process_headers(client, raw)
        try:
            coro.send(None)
        except StopIteration as done:
            expected = done.value
        msg = DeliveredMsg(client, "s", "r", b"", None)
        msg._raw_headers = raw
        assert msg.headers == expected
        assert msg.headers == expected  # parsed once, kept
        quick = DeliveredMsg.parsed(client, "s", "r", b"", raw, 7)
        assert quick.headers == expected
        assert quick == DeliveredMsg(client, "s", "r", b"", expected, _sid=7)
        assert (quick._metadata, quick._ackd, quick._sid) == (None, False, 7)


async def test_pull_deliveries_arrive_directly_with_their_headers(hub: NatsServerProcess) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    from bus.natsclient import DeliveredMsg
    from bus.pullfeed import PullFeed
    from bus.streams import StreamSpec, ensure_stream

    nc = await open_connection(NatsConfig.from_url(hub.url, name="direct-test"))
    try:
        js = nc.jetstream()
        await ensure_stream(js, StreamSpec(name="DIRECT", subjects=("direct.>",)))
        for n in range(5):
            await js.publish("direct.x", str(n).encode(), headers={"Nats-Msg-Id": f"id-{n}"})
        await js.publish("direct.x", b"5")  # no headers at all
        await js.add_consumer("DIRECT", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.ALL))
        feed = PullFeed(nc, "DIRECT", "c", batch=10, expires_s=1.0)
        await feed.start()
        got: list[Any] = []
        while len(got) < 6:
            got += await feed.next_batch(10, timeout_s=5)
        assert [m.data for m in got] == [str(n).encode() for n in range(6)]
        assert all(isinstance(m, DeliveredMsg) for m in got[:5])
        assert [m.headers for m in got] == [{"Nats-Msg-Id": f"id-{n}"} for n in range(5)] + [None]
        assert got[0].metadata.sequence.stream == 1
        await asyncio.sleep(1.5)  # the pull request expires: its 408 status takes the callback
        await got[-1].ack()
        await js.publish("direct.x", b"6", headers={"Nats-Msg-Id": "id-6"})
        [late] = await feed.next_batch(10, timeout_s=5)
        assert late.data == b"6" and late.headers == {"Nats-Msg-Id": "id-6"}
        assert "_process_msg" in vars(nc)  # this connection looks up direct subscriptions ...
        await feed.stop()
        assert "_process_msg" not in vars(nc)  # ... and, with none left, no longer does
    finally:
        await nc.close()
