"""`bus.natsclient`: its header parser gives exactly nats-py's result for any header block,
and every `bus` connection uses it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from bus.client import open_connection
from bus.config import NatsConfig
from bus.natsclient import _WHITESPACE, EdgebusNatsClient
from bus.natsserver import NatsServerProcess

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
