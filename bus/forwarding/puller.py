"""`Puller`: long-poll pull requests on the replay log's durable consumer, one batch at a time.

Raw protocol on one inbox subscription, so an idle log costs one request per wait, never a spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

# How long past the server-side expiry a pull request may stay unanswered before we give up.
_FETCH_MARGIN_S = 2.0


class PullError(RuntimeError):
    def __init__(self, status: str, description: str) -> None:
        super().__init__(f"pull request answered {status} {description}".strip())
        self.status = status
        self.description = description


class Puller:
    """One long-poll pull request per batch, on one inbox subscription.

    `no_wait` together with `expires` makes the server answer as soon as anything is available
    (then "404"), or "408" at expiry: an idle log costs one request per `wait_s`, never a spin,
    and "nothing" is an empty list rather than an exception.
    """

    def __init__(self, nc: NatsClient, stream: str, consumer: str) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._tokens = itertools.count()
        self._token = ""
        self._batch = 0
        self._msgs: list[Msg] = []
        self._status: tuple[str, str] | None = None
        self._done = asyncio.Event()
        self.stale = 0  # messages after the request was over: left to expire, never forwarded

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def fetch(self, batch: int, wait_s: float, stop: asyncio.Event) -> list[Msg]:
        self._token = str(next(self._tokens))
        self._batch = batch
        self._msgs = []
        self._status = None
        self._done = asyncio.Event()
        request = {"batch": batch, "expires": int(wait_s * 1e9), "no_wait": True}
        await self._nc.publish(
            self._api, json.dumps(request).encode(), reply=f"{self._inbox}.{self._token}"
        )
        waiters = [asyncio.ensure_future(self._done.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(
                waiters, timeout=wait_s + _FETCH_MARGIN_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        msgs, done, status = self._msgs, self._done.is_set(), self._status
        self._token = ""
        if not done:
            # Abandoned while the server may still deliver to it: a fresh inbox makes sure
            # nothing of it is ever forwarded (such entries expire after ack_wait).
            await self.close()
            await self.start()
            if not stop.is_set():
                raise TimeoutError(f"pull request unanswered after {wait_s + _FETCH_MARGIN_S:.1f}s")
        if status is not None and not msgs:
            raise PullError(*status)
        return msgs

    async def _on_msg(self, msg: Msg) -> None:
        # Deliveries carry the entry's own subject; only status messages carry our token.
        if not self._token:
            if msg.reply:
                self.stale += 1
            return
        if not msg.reply:  # a status message: JetStream deliveries always carry an ack subject
            if msg.subject.rpartition(".")[2] != self._token:
                return
            headers = msg.headers or {}
            status = headers.get("Status", "")
            if status == "100":  # idle heartbeat
                return
            if status not in ("404", "408"):
                self._status = (status, headers.get("Description", ""))
            self._done.set()
            return
        self._msgs.append(msg)
        if len(self._msgs) >= self._batch:
            self._done.set()
