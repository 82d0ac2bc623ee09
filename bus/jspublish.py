"""Pipelined JetStream publishing whose every future resolves: ack, error, or timeout.

nats-py's `publish_async` leaves a future pending for ever when the server answers with a
JetStream error (e.g. a full stream): its reply handler raises instead of failing the future.
`publish_batch` writes many messages to the connection at once, framed as nats-py would.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

from nats.aio.client import _HEADER_KEY_RE, _HEADER_VALUE_NEWLINES, _SUBJECT_INVALID_RE
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from pydantic_core import from_json

from bus.natsclient import EdgebusNatsClient

_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"
# The fields of a plain PubAck; anything else (batch, counter value) takes nats-py's path.
_PLAIN_ACK_KEYS = frozenset({"stream", "seq", "domain", "duplicate"})
_HEADER_LINE = b"NATS/1.0\r\n"
_CRLF = b"\r\n"
_SKIP = b""  # a header name that is blank once stripped: nats-py leaves it out
_KNOWN_NAMES_MAX = 256
_known_names: dict[str, bytes] = {}  # header name -> b"<name>: ", checked once
# Messages per write to the connection's buffer in `publish_batch` (nats-py force-flushes a
# buffer past its 2 MiB limit; a few hundred KV records stay well under it).
BATCH_FRAMES = 500

Message = tuple[str, bytes, dict[str, str] | None]  # subject, payload, headers


def _header_name(name: str) -> bytes:
    known = _known_names.get(name)
    if known is None:
        key = name.strip()
        if key and not _HEADER_KEY_RE.fullmatch(key):
            raise BadHeaderError(key)
        known = f"{key}: ".encode() if key else _SKIP
        if len(_known_names) < _KNOWN_NAMES_MAX:
            _known_names[name] = known
    return known


def publish_frame(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    """The PUB or HPUB command nats-py's `Client.publish` sends for this message, byte for
    byte (a test holds them equal), with its checks: no whitespace in the subjects, header
    names of token characters, no line breaks in header values."""
    if not subject or _SUBJECT_INVALID_RE.search(subject):
        raise BadSubjectError
    if reply and _SUBJECT_INVALID_RE.search(reply):
        raise BadSubjectError
    if headers is None:
        return b"".join((f"PUB {subject} {reply} {len(payload)}\r\n".encode(), payload, _CRLF))
    block = [_HEADER_LINE]
    for name, value in headers.items():
        key = _header_name(name)
        if key is not _SKIP:
            block += (key, value.strip().translate(_HEADER_VALUE_NEWLINES).encode(), _CRLF)
    block.append(_CRLF)
    header = b"".join(block)
    size = len(header)
    line = f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode()
    return b"".join((line, header, payload, _CRLF))


def pub_ack(response: dict[str, Any]) -> PubAck:
    """The PubAck of one reply; built directly on the hot path (`from_response` costs 2x)."""
    if response.keys() <= _PLAIN_ACK_KEYS:
        return PubAck(
            stream=response["stream"],
            seq=response["seq"],
            domain=response.get("domain"),
            duplicate=response.get("duplicate"),
        )
    return PubAck.from_response(response)


def error_from_reply(error: dict[str, Any]) -> APIError:
    """The nats-py exception for a JetStream error reply, built (not raised)."""
    try:
        APIError.from_error(error)
    except APIError as exc:
        return exc
    return APIError(code=error.get("code"), description=error.get("description"))


class PipelinedPublisher:
    """Many JetStream publishes in flight on one connection; results come back as futures."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._tokens = itertools.count()
        self._pending: dict[str, asyncio.Future[PubAck]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)
        if isinstance(self._nc, EdgebusNatsClient):  # replies taken as parsed, not queued
            self._nc.deliver_directly(self._sub, self._take_reply, replies_only=False)

    async def close(self) -> None:
        if self._sub is not None:
            if isinstance(self._nc, EdgebusNatsClient):
                self._nc.deliver_directly(self._sub, None)
            await self._sub.unsubscribe()
            self._sub = None
        self.fail_pending(ConnectionError("publisher closed"))

    def fail_pending(self, exc: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[PubAck]:
        """Send one message; the returned future holds its PubAck or its error."""
        if self._sub is None:
            raise RuntimeError("PipelinedPublisher.start() was not called")
        token = str(next(self._tokens))
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            await self._nc.publish(
                subject, payload, reply=f"{self._prefix}.{token}", headers=headers
            )
        except Exception as exc:
            self._pending.pop(token, None)
            future.set_exception(exc)
        return future

    async def publish_batch(self, messages: Sequence[Message]) -> list[asyncio.Future[PubAck]]:
        """`publish` for many messages: framed here and handed to the connection a few hundred
        at a time, not one coroutine, subject check and header loop each through nats-py
        (the alarm table's checkpoint: 10,000 records a flush). Futures in message order."""
        nc = self._nc
        if self._sub is None:
            raise RuntimeError("PipelinedPublisher.start() was not called")
        if not nc.is_connected or nc.is_draining_pubs:  # nats-py's own buffering and errors
            return [await self.publish(*message) for message in messages]
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[PubAck]] = []
        for start in range(0, len(messages), BATCH_FRAMES):
            frames: list[bytes] = []
            tokens: list[str] = []
            size = 0
            for subject, payload, headers in messages[start : start + BATCH_FRAMES]:
                future: asyncio.Future[PubAck] = loop.create_future()
                futures.append(future)
                token = str(next(self._tokens))
                try:
                    if len(payload) > nc.max_payload:
                        raise MaxPayloadError
                    frames.append(
                        publish_frame(subject, f"{self._prefix}.{token}", payload, headers)
                    )
                except Exception as exc:
                    future.set_exception(exc)
                    continue
                self._pending[token] = future
                tokens.append(token)
                size += len(payload)
            if not frames:
                continue
            try:
                await nc._send_command(b"".join(frames))
                await nc._flush_pending()
            except Exception as exc:
                for token in tokens:
                    failed = self._pending.pop(token, None)
                    if failed is not None and not failed.done():
                        failed.set_exception(exc)
                continue
            nc.stats["out_msgs"] += len(frames)
            nc.stats["out_bytes"] += size
        return futures

    async def wait(
        self, futures: list[asyncio.Future[PubAck]], timeout_s: float
    ) -> list[PubAck | BaseException]:
        """Results in order; a future unanswered after `timeout_s` becomes a TimeoutError.

        Waits for one future at a time, newest first: replies come back in about the order
        sent, so a whole batch takes a handful of waits, where `asyncio.wait` would hang a
        callback on every future and schedule each one as it resolves."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for future in reversed(futures):
            if not future.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait((future,), timeout=remaining)
        results: list[PubAck | BaseException] = []
        for future in futures:
            if future.done():
                exc = future.exception()
                results.append(exc if exc is not None else future.result())
            else:
                future.cancel()
                results.append(TimeoutError(f"no JetStream ack within {timeout_s}s"))
        self._forget_done()
        return results

    def _forget_done(self) -> None:
        for token in [t for t, f in self._pending.items() if f.done()]:
            del self._pending[token]

    async def _on_reply(self, msg: Msg) -> None:
        self._take_reply(msg)

    def _take_reply(self, msg: Msg) -> None:
        """Resolve the future of the publish this reply answers."""
        token = msg.subject.rsplit(".", 1)[-1]
        future = self._pending.pop(token, None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get(_STATUS_HEADER) == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
            return
        try:
            # pydantic-core's parser: one C call, ~5x cheaper than json.loads for a PubAck.
            response = from_json(msg.data)
            if not isinstance(response, dict):
                raise ValueError(f"JetStream reply is not an object: {msg.data[:80]!r}")
            if "error" in response:
                future.set_exception(error_from_reply(response["error"]))
            else:
                future.set_result(pub_ack(response))
        except (ValueError, KeyError, TypeError) as exc:
            future.set_exception(exc)
