"""`CenterSender`: publishes one forwarder batch to the center, results in entry order.

Fresh runs of one kind go as JetStream fast batches (one per kind: a batch feeds one stream),
everything else one by one; a center that takes no fast batches is noticed and not asked again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck
from nats.js.errors import APIError

from bus.fastbatch import BatchAbandoned, FastBatchPublisher, FastBatchUnsupported
from bus.forwarding.config import ForwarderConfig
from bus.jspublish import PipelinedPublisher
from bus.log import get_logger

MSG_ID_HEADER = "Nats-Msg-Id"

Result = PubAck | BaseException


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One entry on its way: where it goes at the center and whether it was ever sent."""

    subject: str
    data: bytes
    event_id: str
    kind: str
    # Never sent to the center by anyone: it cannot be a duplicate there, so it may go in a
    # fast batch, whose acks do not tell stored from duplicate.
    fresh: bool


class CenterSender:
    """`start`, then `send(batch)`... , `close`."""

    def __init__(self, nc: NatsClient, config: ForwarderConfig, site: str) -> None:
        self._config = config
        self._publisher = PipelinedPublisher(nc)
        self._batcher = FastBatchPublisher(nc, flow=config.fast_batch_flow)
        self._unbatched: set[str] = set()  # kinds whose center stream takes no fast batches
        self.batched = 0  # entries sent in fast batches
        self._log = get_logger("forwarder.sender", site=site)

    async def start(self) -> None:
        await self._publisher.start()
        await self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()
        await self._publisher.close()

    async def send(self, batch: Sequence[Outgoing]) -> list[Result]:
        """Publish every entry (concurrently per kind); one result per entry, in order."""
        results: list[Result | None] = [None] * len(batch)
        by_kind: dict[str, list[int]] = {}
        for index, item in enumerate(batch):
            by_kind.setdefault(item.kind, []).append(index)
        batches = [group for kind, group in by_kind.items() if self._batchable(kind, batch, group)]
        in_batches = {index for group in batches for index in group}
        singles = [index for index in range(len(batch)) if index not in in_batches]
        timeout = self._config.publish_timeout_s

        async def one_by_one(indexes: list[int]) -> None:
            futures = []
            for index in indexes:
                item = batch[index]
                headers = {MSG_ID_HEADER: item.event_id}
                futures.append(await self._publisher.publish(item.subject, item.data, headers))
            answers = await self._publisher.wait(futures, timeout)
            for index, answer in zip(indexes, answers, strict=True):
                results[index] = answer

        async def as_batch(indexes: list[int]) -> None:
            messages = [
                (batch[i].subject, batch[i].data, {MSG_ID_HEADER: batch[i].event_id})
                for i in indexes
            ]
            answers = await self._batcher.publish_batch(messages, timeout)
            unsupported = [
                index
                for index, answer in zip(indexes, answers, strict=True)
                if isinstance(answer, FastBatchUnsupported)
            ]
            self.batched += len(indexes) - len(unsupported)
            for index, answer in zip(indexes, answers, strict=True):
                results[index] = answer
            if unsupported:  # e.g. an older center: this kind goes one by one from now on
                kind = batch[indexes[0]].kind
                self._unbatched.add(kind)
                self._log.info("fast_batch_unsupported", kind=kind, detail=str(answers[-1]))
                await one_by_one(unsupported)
            elif any(isinstance(answer, PubAck | APIError) for answer in answers):
                # The center took part of it and ended the batch at a rejected message: the
                # rest is fine, send it now rather than after a failure and a backoff.
                await one_by_one(
                    [
                        i
                        for i, a in zip(indexes, answers, strict=True)
                        if isinstance(a, BatchAbandoned)
                    ]
                )

        await asyncio.gather(one_by_one(singles), *(as_batch(group) for group in batches))
        return [r if r is not None else RuntimeError("not sent") for r in results]

    def _batchable(self, kind: str, batch: Sequence[Outgoing], group: list[int]) -> bool:
        return (
            self._config.fast_batch
            and kind not in self._unbatched
            and len(group) >= self._config.fast_batch_min
            and all(batch[i].fresh for i in group)
        )
