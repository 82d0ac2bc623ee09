"""The nats-py client every `bus` connection uses: nats-py's own, with a cheaper header parser,
a cheaper protocol parser (`bus.wireparser.WireParser`), and direct delivery for readers that
buffer messages themselves (`deliver_directly`: `bus.pullfeed`).

nats-py 2.16 checks each header name for whitespace one character at a time in Python:
measured 1.54 µs per two-header block (a replay-log entry's) against 0.86 µs here. Its protocol
parser regex-matches every MSG line and trims its buffer twice per message: measured 5.1 µs per
362-byte MSG (6.9 µs per HMSG) in 64 KB reads, against 2.7 µs (3.6 µs) with `WireParser`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.wireparser import WireParser

DirectHandler = Callable[[Msg], None]
_CRLF = b"\r\n"
# On an ASCII-decoded name, `\s` matches exactly what `str.isspace` does (checked for all
# 128 characters in tests/test_natsclient.py).
_WHITESPACE = re.compile(r"\s")
_HEADER_LINE = b"NATS/1.0\r\n"
_STATUS_AT = len(b"NATS/1.0")  # a space there: an inline status ("NATS/1.0 408 ...")
_SPACE = ord(" ")
_NOT_DIRECT: tuple[DirectHandler | None, bool] = (None, True)
_new_object = object.__new__


class DeliveredMsg(Msg):
    """A message whose header block is parsed when `headers` is first read (a JetStream
    delivery's `Nats-Msg-Id` is seldom read by its consumer): the value nats-py's
    `_process_headers` gives a block without an inline status."""

    _raw_headers: bytes | None = None
    _headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        raw = self._raw_headers
        if raw is not None:
            self._raw_headers = None
            if len(raw) > len(_HEADER_LINE):
                self._headers = EdgebusNatsClient._parse_header_lines(raw[len(_HEADER_LINE) :])
            self._headers = self._headers or None
        return self._headers

    @headers.setter
    def headers(self, value: dict[str, str] | None) -> None:
        self._raw_headers = None
        self._headers = value

    @classmethod
    def parsed(
        cls, client: Client, subject: str, reply: str, data: bytes, raw: bytes, sid: int
    ) -> DeliveredMsg:
        """`DeliveredMsg(client, subject, reply, data, _sid=sid)` holding header block `raw`,
        built without the dataclass `__init__` (and its trip through the `headers` setter):
        the other fields keep their class defaults, as `__init__` would set them (tested)."""
        msg = _new_object(cls)
        msg.__dict__ = {
            "_client": client,
            "subject": subject,
            "reply": reply,
            "data": data,
            "_sid": sid,
            "_raw_headers": raw,
        }
        return msg


class EdgebusNatsClient(Client):
    """nats-py's `Client`; `_parse_header_lines` and the protocol parser give the same results
    as nats-py's own; subscriptions handed to `deliver_directly` skip nats-py's queue."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = WireParser(self)
        self._direct: dict[int, tuple[DirectHandler, bool]] = {}

    def deliver_directly(
        self, sub: Subscription, handler: DirectHandler | None, *, replies_only: bool = True
    ) -> None:
        """Give `sub`'s messages that carry a reply subject (JetStream deliveries) to `handler`
        as soon as they are parsed, in order, instead of through the subscription's queue and
        task (under cProfile in the alarm storm: 59 -> 21 µs a delivery after parsing).
        `handler` must not block: it only takes the message. Messages without a reply (a pull
        request's status: 408, 409, heartbeats) still go to the subscription's callback,
        unless not `replies_only` (an inbox of replies: all go to `handler`). None: stop."""
        if handler is None:
            self._direct.pop(sub._id, None)
        else:
            self._direct[sub._id] = (handler, replies_only)
        # Only a connection with direct subscriptions pays for the look-up: the instance
        # attribute shadows nats-py's `_process_msg`, which the parser calls per message.
        if self._direct:
            vars(self)["_process_msg"] = self._process_msg_or_deliver
        else:
            vars(self).pop("_process_msg", None)

    def deliver_now(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> bool:
        """Hand a parsed message to its direct handler without a coroutine (the protocol
        parser calls this first); False if it is not one to hand over so: the parser then
        awaits `_process_msg`, as for any other message."""
        handler, replies_only = self._direct.get(sid, _NOT_DIRECT)
        if handler is None or (replies_only and not reply):
            return False
        if headers:
            if len(headers) <= _STATUS_AT or headers[_STATUS_AT] == _SPACE:
                return False  # an inline status: nats-py's own (awaited) header parsing
            msg: Msg = DeliveredMsg.parsed(
                self, subject.decode(), reply.decode(), data, headers, sid
            )
        else:
            msg = self._build_message(sid, subject, reply, data, None)
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        handler(msg)
        return True

    async def _process_msg_or_deliver(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if self.deliver_now(sid, subject, reply, data, headers):
            return
        handler, replies_only = self._direct.get(sid, _NOT_DIRECT)
        if handler is None or (replies_only and not reply):
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        headers_dict = await self._process_headers(headers)  # an inline status (see above)
        handler(self._build_message(sid, subject, reply, data, headers_dict))

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, sep, value = line.partition(b":")
            if not sep:  # also an empty line
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if _WHITESPACE.search(key) is not None:
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out
