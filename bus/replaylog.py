"""The edge-local replay log: a durable, bounded JetStream stream in the site's own domain.

Everything a site owes the center is appended here before it is acknowledged anywhere;
`bus.forwarder.Forwarder` moves it to the center. This module knows nothing of what is owed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from bus import subjects
from bus.jspublish import PipelinedPublisher
from bus.streams import StreamSpec, ensure_stream
from schemas import REGISTRY, Event, EventRegistry

STREAM = "REPLAY"
FORWARDER_CONSUMER = "forwarder"
MSG_ID_HEADER = "Nats-Msg-Id"
EVENT_ID_HEADER = "Edgebus-Event-Id"
# What the center dedups an entry by when it is not the event id (a device's own message key:
# a QoS 1 re-send ingested as a second event must still be the same message at the center).
CENTER_ID_HEADER = "Edgebus-Center-Id"

# JetStream error codes meaning "the stream is at its bound and discards new messages".
_FULL_ERROR_CODES = frozenset({10047, 10077, 10078})
_SUBJECT_CACHE_SIZE = 50_000


class AppendStatus(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # already in the log (a retried append): nothing new stored
    REFUSED = "refused"  # the log is full and its policy refuses new entries


@dataclass(frozen=True)
class AppendResult:
    status: AppendStatus
    seq: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class LogEntry:
    """One thing owed to the center: `kind` picks the center stream, `key` keeps order per key.

    `dedup_id` makes the append itself idempotent (e.g. the raw message's ingest sequence),
    so a crash between append and upstream ack cannot log the same input twice.
    """

    kind: str
    key: str
    event: Event[Any]
    dedup_id: str | None = None
    # The event's bytes if the caller encoded it already (it publishes them too): appended
    # as they are. Must be what `registry.encode(event)` returns.
    encoded: bytes | None = None
    # The center's dedup id if not the event id (see CENTER_ID_HEADER); globally unique.
    center_id: str | None = None


def is_full_error(exc: BaseException) -> bool:
    if not isinstance(exc, APIError):
        return False
    if exc.err_code in _FULL_ERROR_CODES:
        return True
    return "maximum" in (exc.description or "").lower()


class ReplayLog:
    """Append side of the replay log (`declare` once, then `append`/`append_batch`)."""

    def __init__(
        self,
        nc: NatsClient,
        site: str,
        spec: StreamSpec,
        *,
        batch_size: int,
        ack_wait_s: float,
        registry: EventRegistry = REGISTRY,
        timeout_s: float = 5.0,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.site = subjects.site_id(site)
        self.spec = spec
        self.batch_size = batch_size
        self.ack_wait_s = ack_wait_s
        self.registry = registry
        self.timeout_s = timeout_s
        self.refused = 0
        self._publisher: PipelinedPublisher | None = None
        # (kind, key) -> subject: building one validates three tokens, on every append.
        self._subjects: dict[tuple[str, str], str] = {}

    async def declare(self) -> None:
        """Create or update the stream and the forwarder's durable consumer."""
        await ensure_stream(self.js, self.spec)
        await self.js.add_consumer(
            self.spec.name,
            config=ConsumerConfig(
                durable_name=FORWARDER_CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait_s,
                # One batch in flight at most: after a crash the unacked batch must come
                # back (in order) before anything newer is delivered.
                max_ack_pending=self.batch_size,
                max_deliver=-1,
            ),
        )

    async def reshape(self, spec: StreamSpec) -> None:
        """Bring the stream to new bounds (bytes, age, full policy); raises if the server
        refuses them (e.g. more bytes than its storage can reserve), keeping the old ones."""
        if spec.name != self.spec.name or spec.subjects != self.spec.subjects:
            raise ValueError("reshape changes bounds only, not the stream's name or subjects")
        await ensure_stream(self.js, spec)
        self.spec = spec

    def _subject(self, kind: str, key: str) -> str:
        subject = self._subjects.get((kind, key))
        if subject is None:
            if len(self._subjects) >= _SUBJECT_CACHE_SIZE:
                self._subjects.clear()
            subject = subjects.replay(self.site, kind, key)
            self._subjects[(kind, key)] = subject
        return subject

    def _publish_args(self, entry: LogEntry) -> tuple[str, bytes, dict[str, str]]:
        subject = self._subject(entry.kind, entry.key)
        event_id = entry.event.id
        headers = {MSG_ID_HEADER: entry.dedup_id or event_id, EVENT_ID_HEADER: event_id}
        if entry.center_id is not None:
            headers[CENTER_ID_HEADER] = entry.center_id
        payload = entry.encoded if entry.encoded is not None else self.registry.encode(entry.event)
        return subject, payload, headers

    async def append(self, entry: LogEntry) -> AppendResult:
        subject, payload, headers = self._publish_args(entry)
        try:
            ack = await self.js.publish(
                subject, payload, headers=headers, timeout=self.timeout_s, stream=self.spec.name
            )
        except APIError as exc:
            if is_full_error(exc):
                self.refused += 1
                return AppendResult(AppendStatus.REFUSED, detail=exc.description or str(exc))
            raise
        status = AppendStatus.DUPLICATE if ack.duplicate else AppendStatus.STORED
        return AppendResult(status, seq=ack.seq)

    async def append_batch(self, entries: Sequence[LogEntry]) -> list[AppendResult]:
        """Pipelined appends, results in order. Raises only for errors other than 'full'."""
        if self._publisher is None:
            self._publisher = PipelinedPublisher(self.nc)
            await self._publisher.start()
        futures = []
        for entry in entries:
            subject, payload, headers = self._publish_args(entry)
            futures.append(await self._publisher.publish(subject, payload, headers))
        outcomes = await self._publisher.wait(futures, self.timeout_s)
        results = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not is_full_error(outcome):
                    raise outcome
                self.refused += 1
                results.append(AppendResult(AppendStatus.REFUSED, detail=str(outcome)))
            else:
                status = AppendStatus.DUPLICATE if outcome.duplicate else AppendStatus.STORED
                results.append(AppendResult(status, seq=outcome.seq))
        return results
