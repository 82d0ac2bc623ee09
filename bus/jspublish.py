"""Pipelined JetStream publishing whose every future resolves: ack, error, or timeout.

nats-py's `publish_async` leaves a future pending for ever when the server answers with a
JetStream error (e.g. a full stream): its reply handler raises instead of failing the future.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from pydantic_core import from_json

_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"
# The fields of a plain PubAck; anything else (batch, counter value) takes nats-py's path.
_PLAIN_ACK_KEYS = frozenset({"stream", "seq", "domain", "duplicate"})


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

    async def close(self) -> None:
        if self._sub is not None:
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

    async def wait(
        self, futures: list[asyncio.Future[PubAck]], timeout_s: float
    ) -> list[PubAck | BaseException]:
        """Results in order; a future unanswered after `timeout_s` becomes a TimeoutError."""
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)
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
