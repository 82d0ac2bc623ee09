"""External-broker mode: read `dev/<site>/+/+` from an existing MQTT broker into INGEST.

Persistent session, QoS 1; each message is PUBACKed only after INGEST stored it, so the
broker keeps (and redelivers) anything the agent had not secured when it stopped or crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nats.js.api import PubAck

from bus import subjects
from bus.client import Bus
from bus.jspublish import PipelinedPublisher
from bus.log import get_logger
from bus.mqtt import AsyncMqttClient, MqttConfig, MqttConnectError, MqttMessage
from edge_agent.config import AgentConfig, ExternalBroker

COMPONENT = "bridge"


@dataclass(frozen=True)
class BridgeTuning:
    """Flow control and retry pacing of the bridge."""

    # Messages read from the broker whose INGEST PubAck (hence MQTT PUBACK) is pending.
    max_in_flight: int = 1000
    publish_timeout_s: float = 5.0
    retry_min_s: float = 0.2
    retry_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    session_expiry_s: int = 7 * 24 * 3600


@dataclass(frozen=True)
class BridgeStats:
    received: int = 0
    forwarded: int = 0
    rejected: int = 0
    retained_skipped: int = 0
    publish_retries: int = 0
    connect_attempts: int = 0


@dataclass(slots=True)
class _InFlight:
    """One broker message on its way into INGEST (no subject: dead-lettered, just ack it)."""

    msg: MqttMessage
    subject: str | None
    future: asyncio.Future[PubAck] | None


def bridge_client_config(site: str, broker: ExternalBroker, tuning: BridgeTuning) -> MqttConfig:
    """The MQTT session the bridge opens: stable client id, persistent, QoS 1 flow control."""
    return MqttConfig(
        host=broker.host,
        port=broker.port,
        client_id=broker.client_id or f"edgebus-bridge-{site}",
        username=broker.username,
        password=broker.password,
        protocol="5" if broker.protocol == "5" else "3.1.1",
        persistent_session=True,
        session_expiry_seconds=tuning.session_expiry_s,
        connect_timeout=tuning.connect_timeout_s,
        ack_timeout=tuning.publish_timeout_s * 2,
        inbound_queue=min(tuning.max_in_flight, 65535),
    )


def ingest_subject_for_topic(site: str, topic: str) -> str | None:
    """`dev.<site>.<device>.<channel>` for a topic `dev/<site>/<device>/<channel>`, else None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "dev" or parts[1] != site:
        return None
    try:
        return subjects.device_raw(site, parts[2], parts[3])
    except subjects.SubjectError:
        return None


class MqttBridge:
    """Subscribes to the external broker and feeds INGEST; the IngestWorker does the rest."""

    def __init__(self, bus: Bus, config: AgentConfig, tuning: BridgeTuning | None = None) -> None:
        if config.external_broker is None:
            raise ValueError("MqttBridge needs config.external_broker")
        self.bus = bus
        self.site = subjects.site_id(config.site)
        self.broker = config.external_broker
        self.tuning = tuning or BridgeTuning()
        self.mqtt_config = bridge_client_config(self.site, self.broker, self.tuning)
        self._counts: dict[str, int] = dict.fromkeys(BridgeStats.__dataclass_fields__, 0)
        self._log = get_logger(
            "edge_agent.bridge",
            site=self.site,
            broker=f"{self.broker.host}:{self.broker.port}",
            protocol=self.broker.protocol,
        )

    def stats(self) -> BridgeStats:
        return BridgeStats(**self._counts)

    async def run(self, stop: asyncio.Event) -> None:
        """Bridge until `stop` is set; the broker keeps un-acked messages for the next run."""
        client = await self._connect(stop)
        if client is None:
            return
        publisher = PipelinedPublisher(self.bus.nc)
        await publisher.start()
        try:
            await client.subscribe(subjects.mqtt_device_filter(self.site), qos=1)
            self._log.info("bridge_started", client_id=self.mqtt_config.client_id)
            await self._pump(client, publisher, stop)
        finally:
            await client.disconnect()
            await publisher.close()
            self._log.info("bridge_stopped", **self._counts)

    # -- connection ------------------------------------------------------------------

    async def _connect(self, stop: asyncio.Event) -> AsyncMqttClient | None:
        """Connect, retrying with backoff while the broker is unreachable; None if stopped."""
        delay = self.tuning.retry_min_s
        while not stop.is_set():
            self._counts["connect_attempts"] += 1
            client = AsyncMqttClient(self.mqtt_config)  # single use: a new one per attempt
            try:
                await client.connect()
                return client
            except MqttConnectError as exc:
                self._log.warning("broker_unreachable", error=str(exc), retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, self.tuning.retry_max_s)
        return None

    # -- message flow ----------------------------------------------------------------

    async def _pump(
        self, client: AsyncMqttClient, publisher: PipelinedPublisher, stop: asyncio.Event
    ) -> None:
        """Reader publishes to INGEST as messages arrive; acker PUBACKs them in arrival order."""
        in_flight: asyncio.Queue[_InFlight] = asyncio.Queue(self.tuning.max_in_flight)
        halt = asyncio.Event()  # stop, or the pump is ending for another reason
        reader = asyncio.create_task(self._read(client, publisher, in_flight), name="reader")
        acker = asyncio.create_task(self._ack_in_order(publisher, in_flight, halt), name="acker")
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reader, acker, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.set()
            stopped.cancel()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            # Settle what was already handed to INGEST (bounded by the publish timeout), so
            # it is PUBACKed now rather than redelivered by the broker next session.
            while not acker.done():
                with contextlib.suppress(asyncio.QueueFull):
                    in_flight.put_nowait(_SENTINEL)
                    break
                await asyncio.wait({acker}, timeout=0.05)
            await asyncio.gather(acker, return_exceptions=True)
        for task in (reader, acker):
            if not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"bridge {task.get_name()} failed") from task.exception()
        if not stop.is_set():
            raise RuntimeError("MQTT message stream ended while the bridge was running")

    async def _read(
        self,
        client: AsyncMqttClient,
        publisher: PipelinedPublisher,
        in_flight: asyncio.Queue[_InFlight],
    ) -> None:
        async with contextlib.aclosing(client.messages()) as stream:
            async for msg in stream:
                self._counts["received"] += 1
                await in_flight.put(await self._dispatch(msg, publisher))

    async def _dispatch(self, msg: MqttMessage, publisher: PipelinedPublisher) -> _InFlight:
        if msg.retain:
            # A retained copy is the broker's "last value", re-sent on every subscribe,
            # not a new reading: ingesting it would repeat it after each restart.
            self._counts["retained_skipped"] += 1
            self._log.info("retained_message_skipped", topic=msg.topic)
            return _InFlight(msg, None, None)
        subject = ingest_subject_for_topic(self.site, msg.topic)
        if subject is None:
            await self._reject(msg, "topic", f"not dev/{self.site}/<device>/<channel>")
            return _InFlight(msg, None, None)
        if len(msg.payload) > self.bus.nc.max_payload:
            await self._reject(
                msg, "oversize", f"{len(msg.payload)} bytes exceeds NATS max_payload"
            )
            return _InFlight(msg, None, None)
        return _InFlight(msg, subject, await publisher.publish(subject, msg.payload))

    async def _reject(self, msg: MqttMessage, reason: str, detail: str) -> None:
        self._counts["rejected"] += 1
        await self.bus.dead_letters.record(
            component=COMPONENT,
            subject=msg.topic,
            data=msg.payload,
            reason=reason,
            detail=detail,
            site=self.site,
        )

    async def _ack_in_order(
        self,
        publisher: PipelinedPublisher,
        in_flight: asyncio.Queue[_InFlight],
        halt: asyncio.Event,
    ) -> None:
        while True:
            batch = [await in_flight.get()]
            while not in_flight.empty():
                batch.append(in_flight.get_nowait())
            last = batch[-1] is _SENTINEL
            items = [item for item in batch if item is not _SENTINEL]
            if not await self._settle(publisher, items, halt) or last:
                return

    async def _settle(
        self, publisher: PipelinedPublisher, items: Sequence[_InFlight], stop: asyncio.Event
    ) -> bool:
        """PUBACK each item once INGEST has it, in order; False if stopped before all were."""
        futures = [item.future for item in items if item.future is not None]
        outcomes = iter(await publisher.wait(futures, self.tuning.publish_timeout_s))
        for item in items:
            if item.future is not None:
                outcome = next(outcomes)
                if isinstance(outcome, BaseException) and not await self._retry(
                    publisher, item, outcome, stop
                ):
                    return False
                self._counts["forwarded"] += 1
            item.msg.ack()
        return True

    async def _retry(
        self,
        publisher: PipelinedPublisher,
        item: _InFlight,
        error: BaseException,
        stop: asyncio.Event,
    ) -> bool:
        """Publish one message again until INGEST takes it (full, server down); False if stopped.

        Later messages wait behind it un-acked, so the broker's in-flight window stalls and
        nothing is read that cannot be stored.
        """
        delay = self.tuning.retry_min_s
        while True:
            self._counts["publish_retries"] += 1
            self._log.warning(
                "ingest_publish_failed", topic=item.msg.topic, error=repr(error), retry_in_s=delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, self.tuning.retry_max_s)
            assert item.subject is not None
            future = await publisher.publish(item.subject, item.msg.payload)
            outcome: Any = (await publisher.wait([future], self.tuning.publish_timeout_s))[0]
            if not isinstance(outcome, BaseException):
                return True
            error = outcome


# Pushed by `_pump` on stop: tells the acker to settle what it has and return.
_SENTINEL: Any = object()
