"""Fast-ingest batch publishing (JetStream `allow_batched`, nats-server 2.14+): a batch of
publishes to one stream answered by a start ack, a flow ack every `flow` messages and one batch
ack, instead of one PubAck per message. `Nats-Msg-Id` dedup applies as for single publishes.

Wire contract (what nats-server 2.15 does; pinned by tests/test_fastbatch.py): no batch headers,
everything rides in each message's reply subject, `<inbox>.<batch id>.<flow>.fail.<k>.<op>.$FI`
(`k` = 1-based position, op 0 = first, 1 = add, 3 = end of batch, a marker that is not stored).
Frames come back on those reply subjects: `{"type":"ack","seq":N}` (stored through N; N = 0
answers the first message), `{"type":"gap",...}`, a JetStream error reply or a 503 status for
message `k` itself, and the batch ack `{"stream":S,"seq":N,"batch":B,"count":C}` (messages 1..C
stored). In "fail" gap mode the server stops the batch at the first rejected or missing message.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from pydantic_core import from_json

from bus.jspublish import error_from_reply, pub_ack

OP_FIRST, OP_ADD, OP_END = 0, 1, 3
BATCH_DISABLED = 10205  # the stream has no `allow_batched`
# Batch pattern / id invalid, id unknown (the server ended the batch already): not the
# message's fault, so never a rejection that would dead-letter it.
BATCH_ENDED = frozenset({10206, 10207, 10208})
_SUFFIX = "$FI"
_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"

Message = tuple[str, bytes, dict[str, str] | None]
Result = PubAck | BaseException


class FastBatchUnsupported(Exception):
    """The stream (or its server) does not take fast batches: publish one by one instead."""


class BatchAbandoned(Exception):
    """Not stored: the server ended the batch before this message (an earlier one was
    rejected or went missing), or it was never sent. Safe to send again."""


@dataclass
class _Batch:
    """What the server said so far about one batch of `size` messages."""

    size: int
    first: asyncio.Future[Result | None]  # None: the batch began; else message 1's own result
    done: asyncio.Future[None]
    stream: str = ""
    stored_through: int = 0
    errors: dict[int, BaseException] = field(default_factory=dict)
    count: int | None = None  # from the batch ack
    final_error: BaseException | None = None

    def on_frame(self, position: int, op: int, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ack":
            self.stored_through = max(self.stored_through, int(frame.get("seq", 0)))
            self._resolve_first(None)
        elif kind == "gap":  # in "fail" mode the batch ack follows, with the count stored
            return
        elif "batch" in frame:
            self.stream = str(frame.get("stream", ""))
            self.count = int(frame.get("count", 0))
            self._finish()
        elif "error" in frame:
            error = _batch_error(frame["error"])
            if op == OP_END:
                self.final_error = error
                self._finish()
            else:
                self.errors.setdefault(position, error)
                if position == 1:
                    self._resolve_first(error)
        elif "stream" in frame and position == 1:
            # A server without fast ingest took message 1 as a plain publish: its PubAck.
            self._resolve_first(pub_ack(frame))

    def on_no_responders(self, position: int, op: int) -> None:
        if op == OP_END:
            self.final_error = NoStreamResponseError()
            self._finish()
            return
        self.errors.setdefault(position, NoStreamResponseError())
        if position == 1:
            self._resolve_first(NoStreamResponseError())

    def results(self) -> list[Result]:
        """One result per message, in order; what is not known stored is an error."""
        stored = self.count if self.count is not None else self.stored_through
        ack = PubAck(stream=self.stream, seq=0, duplicate=False)
        results: list[Result] = []
        for position in range(1, self.size + 1):
            error = self.errors.get(position)
            if error is not None:
                results.append(error)
            elif position <= stored:
                results.append(ack)
            elif self.done.done():
                reason = f" ({self.final_error})" if self.final_error else ""
                results.append(BatchAbandoned(f"the batch ended before it{reason}"))
            else:
                results.append(TimeoutError("no fast-batch ack in time"))
        return results

    def _resolve_first(self, result: Result | None) -> None:
        if not self.first.done():
            self.first.set_result(result)

    def _finish(self) -> None:
        self._resolve_first(None)
        if not self.done.done():
            self.done.set_result(None)


def _batch_error(error: dict[str, Any]) -> BaseException:
    if error.get("err_code") == BATCH_DISABLED:
        return FastBatchUnsupported(str(error.get("description", "batch publish is disabled")))
    if error.get("err_code") in BATCH_ENDED:
        return BatchAbandoned(str(error.get("description", "batch ended")))
    api_error: APIError = error_from_reply(error)
    return api_error


def _not_begun(first: Result, size: int) -> list[Result]:
    """Results of a batch whose first message was answered on its own (nothing else sent)."""
    if isinstance(first, FastBatchUnsupported):
        return [first] * size
    if isinstance(first, PubAck):  # stored, as a plain publish: the server has no fast ingest
        return [first, *[FastBatchUnsupported("the server took a plain publish")] * (size - 1)]
    return [first, *[BatchAbandoned("not sent: the batch did not begin")] * (size - 1)]


class FastBatchPublisher:
    """Publishes whole batches to one stream each; `start`, `publish_batch`..., `close`."""

    def __init__(self, nc: NatsClient, *, flow: int = 100) -> None:
        if flow < 1:
            raise ValueError("flow must be >= 1")
        self._nc = nc
        self._flow = flow
        self._prefix = ""
        # Batch ids are unique per stream at the server: a random part per publisher.
        self._ids = (f"{os.urandom(6).hex()}{n}" for n in itertools.count())
        self._batches: dict[str, _Batch] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.>", cb=self._on_frame)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for batch in self._batches.values():
            batch._finish()

    async def publish_batch(self, messages: Sequence[Message], timeout_s: float) -> list[Result]:
        """Publish `messages` (all to one stream) as one fast batch; results in order.

        Message 1 goes alone first and its answer is awaited: a server or stream without fast
        ingest then costs one plain publish, and no end-of-batch marker is ever sent to it.
        """
        if self._sub is None:
            raise RuntimeError("FastBatchPublisher.start() was not called")
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        batch_id = next(self._ids)
        inbox = f"{self._prefix}.{batch_id}.{self._flow}.fail"
        batch = _Batch(len(messages), loop.create_future(), loop.create_future())
        self._batches[batch_id] = batch
        try:
            subject, payload, headers = messages[0]
            await self._nc.publish(
                subject, payload, reply=f"{inbox}.1.{OP_FIRST}.{_SUFFIX}", headers=headers
            )
            try:
                first = await asyncio.wait_for(asyncio.shield(batch.first), timeout_s)
            except TimeoutError:
                return [TimeoutError("no answer to the batch's first message")] * len(messages)
            if first is not None:
                return _not_begun(first, len(messages))
            for position, (subject, payload, headers) in enumerate(messages[1:], start=2):
                await self._nc.publish(
                    subject, payload, reply=f"{inbox}.{position}.{OP_ADD}.{_SUFFIX}",
                    headers=headers,
                )  # fmt: skip
            end = f"{inbox}.{len(messages) + 1}.{OP_END}.{_SUFFIX}"
            await self._nc.publish(messages[-1][0], b"", reply=end)
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.wait([batch.done], timeout=remaining)
            return batch.results()
        finally:
            del self._batches[batch_id]

    async def _on_frame(self, msg: Msg) -> None:
        # <prefix>.<batch id>.<flow>.fail.<position>.<op>.$FI
        tokens = msg.subject.rsplit(".", 6)
        if len(tokens) != 7 or tokens[6] != _SUFFIX:
            return
        batch = self._batches.get(tokens[1])
        if batch is None:
            return
        try:
            position, op = int(tokens[4]), int(tokens[5])
        except ValueError:
            return
        if msg.headers and msg.headers.get(_STATUS_HEADER) == _NO_RESPONDERS:
            batch.on_no_responders(position, op)
            return
        try:
            frame = from_json(msg.data)
        except ValueError:
            return
        if isinstance(frame, dict):
            batch.on_frame(position, op, frame)
