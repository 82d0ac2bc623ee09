"""Asyncio interface over paho-mqtt: the one place in edgebus that touches paho.
Inbound QoS 1 messages are PUBACKed only when the application calls `MqttMessage.ack()`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import structlog
from paho.mqtt.client import (
    MQTT_CLEAN_START_FIRST_ONLY,
    CleanStartOption,
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    error_string,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "AsyncMqttClient",
    "MqttConfig",
    "MqttConnectError",
    "MqttError",
    "MqttMessage",
    "MqttProtocol",
    "MqttTimeoutError",
]

log = structlog.get_logger(__name__)

MqttProtocol = Literal["3.1.1", "5"]
_T = TypeVar("_T")

# How often paho's thread re-checks for shutdown while it waits for a queue slot.
_SLOT_POLL_SECONDS = 0.2
# At most one "inbound queue full" warning per interval under sustained overload.
_FULL_WARNING_INTERVAL = 5.0


class MqttError(Exception):
    """An MQTT operation failed (not connected, refused by the broker, client closed)."""


class MqttConnectError(MqttError):
    """The first connection could not be established (refused, unreachable, timed out)."""


class MqttTimeoutError(MqttError, TimeoutError):
    """The broker did not acknowledge in time (CONNACK, SUBACK or PUBACK)."""


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    """How to reach one broker and how the session behaves."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    protocol: MqttProtocol = "3.1.1"
    # Persistent: 3.1.1 clean_session=False; MQTT 5 clean_start=False plus a session
    # expiry. The broker then keeps subscriptions and queues QoS 1 messages while we
    # are away, and redelivers the ones we never acked.
    persistent_session: bool = False
    session_expiry_seconds: int = 3600
    keepalive_seconds: int = 30
    connect_timeout: float = 10.0
    # Bound on waiting for SUBACK / PUBACK.
    ack_timeout: float = 10.0
    # paho's exponential reconnect backoff, whole seconds (paho's API takes ints).
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 30
    # Our own outgoing QoS>0 messages on the wire without PUBACK yet; paho queues the rest.
    max_inflight: int = 20
    # Inbound messages handed over but not yet taken by the application; also sent as
    # the MQTT 5 Receive Maximum (so it must fit 1..65535).
    inbound_queue: int = 1000
    # Disable Nagle on our socket: PUBACKs and small publishes otherwise wait for the
    # peer's delayed ACK (~40 ms) whenever several are in flight.
    tcp_nodelay: bool = True

    def __post_init__(self) -> None:
        if self.persistent_session and not self.client_id:
            raise ValueError("a persistent session needs a stable, non-empty client_id")
        if self.reconnect_min_delay < 1 or self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("need 1 <= reconnect_min_delay <= reconnect_max_delay")
        if not 1 <= self.inbound_queue <= 65535:
            raise ValueError("inbound_queue must be within 1..65535 (MQTT Receive Maximum)")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(eq=False, kw_only=True)
class MqttMessage:
    """One inbound message. Call `ack()` once it is durably stored (no-op for QoS 0)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False
    _acker: Callable[[MqttMessage], None] | None = field(default=None, repr=False)
    _connection: int = field(default=0, repr=False)
    _acked: bool = field(default=False, repr=False)

    def ack(self) -> None:
        """Send PUBACK (QoS 1) / PUBCOMP (QoS 2). Thread-safe and idempotent."""
        if self._acker is not None:
            self._acker(self)


def _paho_protocol(protocol: MqttProtocol) -> MQTTProtocolVersion:
    return MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311


def _set_tcp_nodelay(client: Client, userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _resolve(future: asyncio.Future[Any] | None, error: BaseException | None, result: Any) -> None:
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class AsyncMqttClient:
    """One MQTT connection with automatic reconnects. Single use: connect once, close once.

    Use as `async with AsyncMqttClient(cfg) as client:` or call `connect()`/`disconnect()`.

    Threading: paho runs its network loop in its own thread (`loop_start()`); every paho
    callback only hands data to the asyncio loop via `loop.call_soon_threadsafe`.
    Application code sees coroutines, an async iterator and dataclasses, never paho.

    Inbound flow control (why nothing is ever dropped):
    - QoS 1/2 messages stay un-acknowledged until `msg.ack()`, so the broker caps how
      many it sends: MQTT 5 honours our Receive Maximum (= `inbound_queue`); MQTT 3.1.1
      relies on the broker's own window (mosquitto `max_inflight_messages`, default 20;
      NATS `mqtt.max_ack_pending`). With `inbound_queue` >= that window, QoS 1 traffic
      alone never fills the queue.
    - If it fills anyway (QoS 0 floods, a small queue, redelivered duplicates), paho's
      network thread waits for a free slot: it stops reading the socket, TCP pushes back
      on the broker, and the broker queues for us (persistent session) or applies its own
      QoS 0 policy. While it waits it sends no PINGREQ and reads no PUBACK for our own
      publishes: do not leave a full queue unread for longer than the keepalive.

    Acknowledgement: `ack()` is thread-safe and idempotent. A message from a connection
    that has since been lost (or a closed client) is not acked, because its packet id
    belonged to that connection; the broker redelivers it and the copy gets acked.
    MQTT asks for PUBACKs in arrival order; brokers tolerate other orders.
    """

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self._log = log.bind(client_id=config.client_id, broker=config.address)
        self._paho = self._build_paho()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future[None] | None = None
        # One slot per message paho may hand over; +1 queue slot reserved for the
        # end-of-stream sentinel so closing never blocks.
        self._slots = threading.BoundedSemaphore(config.inbound_queue)
        self._inbound: asyncio.Queue[MqttMessage | None] = asyncio.Queue(config.inbound_queue + 1)
        self._subscriptions: dict[str, int] = {}
        self._subscriptions_lock = threading.Lock()
        self._ack_lock = threading.Lock()
        # Bumped on every CONNACK (paho thread); packet ids are only valid within one.
        self._connection = 0
        self._closing = False
        self._closed = False
        self._tcp_failures = 0
        self._last_full_warning = -_FULL_WARNING_INTERVAL
        # Keyed by packet id; only touched on the event loop thread.
        self._pending_publishes: dict[int, asyncio.Future[None]] = {}
        self._pending_subscribes: dict[int, asyncio.Future[list[ReasonCode]]] = {}

    # -- setup ---------------------------------------------------------------

    def _build_paho(self) -> Client:
        cfg = self.config
        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            # paho rejects clean_session for MQTT 5, which uses clean_start instead.
            clean_session=None if cfg.protocol == "5" else not cfg.persistent_session,
            protocol=_paho_protocol(cfg.protocol),
            manual_ack=True,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        if cfg.tcp_nodelay:
            client.on_socket_open = _set_tcp_nodelay
        return client

    def _clean_start(self) -> CleanStartOption:
        if self.config.protocol != "5":
            return MQTT_CLEAN_START_FIRST_ONLY  # the only value paho accepts for 3.1.1
        return not self.config.persistent_session

    def _connect_properties(self) -> Properties | None:
        if self.config.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped __init__
        # Broker-side flow control: never more un-acked QoS>0 messages than we can queue.
        props.ReceiveMaximum = self.config.inbound_queue
        if self.config.persistent_session:
            props.SessionExpiryInterval = self.config.session_expiry_seconds
        return props

    # -- lifecycle -----------------------------------------------------------

    async def connect(self) -> None:
        """Connect, bounded by `connect_timeout`; later drops reconnect automatically."""
        if self._loop is not None:
            raise MqttError("connect() may only be called once per client")
        self._loop = asyncio.get_running_loop()
        self._connack = self._loop.create_future()
        cfg = self.config
        self._paho.connect_async(
            cfg.host,
            cfg.port,
            cfg.keepalive_seconds,
            clean_start=self._clean_start(),
            properties=self._connect_properties(),
        )
        self._paho.loop_start()
        try:
            await asyncio.wait_for(self._connack, cfg.connect_timeout)
        except BaseException as exc:
            # Refused, timed out or cancelled: do not leave paho retrying in the background.
            await self._shutdown(graceful=False)
            if isinstance(exc, TimeoutError):
                raise MqttConnectError(self._connect_timeout_message()) from None
            raise

    def _connect_timeout_message(self) -> str:
        cfg = self.config
        why = (
            f"{self._tcp_failures} TCP connection attempts failed: broker down or unreachable"
            if self._tcp_failures
            else "connected but got no CONNACK: wrong MQTT version or a stalled broker"
        )
        return f"no CONNACK from {cfg.address} within {cfg.connect_timeout:.1f}s ({why})"

    async def disconnect(self) -> None:
        """Send DISCONNECT and stop. Un-acked messages stay with the broker's session."""
        await self._shutdown(graceful=True)

    async def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crashed process would.

        For fault drills and tests: the broker keeps the session, redelivers un-acked
        messages to the next connection with this client id and fires any will.
        """
        await self._shutdown(graceful=False)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def _shutdown(self, *, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True  # releases paho's thread if it waits for a queue slot
        if graceful:
            # Also valid while reconnecting: marks paho's state so its loop exits.
            self._paho.disconnect()
        else:
            self._drop_socket()
        # loop_stop() joins paho's thread (up to ~1 s); keep the event loop free meanwhile.
        await asyncio.to_thread(self._paho.loop_stop)
        self._fail_pending(MqttError("client closed"))
        self._inbound.put_nowait(None)
        self._log.info("mqtt.closed", graceful=graceful)

    def _drop_socket(self) -> None:
        # paho waits >= reconnect_min_delay (>= 1 s) before reconnecting, so the
        # loop_stop() that follows cannot race with a new connection.
        sock = self._paho.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _fail_pending(self, error: MqttError) -> None:
        for pending in (self._pending_publishes, self._pending_subscribes):
            for future in pending.values():
                _resolve(future, error, None)
            pending.clear()

    @property
    def is_connected(self) -> bool:
        return self._paho.is_connected()

    # -- operations ----------------------------------------------------------

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and wait for the SUBACK; returns the granted QoS.

        The filter is remembered and subscribed again after any reconnect on which the
        broker had no session for us.
        """
        loop = self._require_open()
        with self._subscriptions_lock:
            self._subscriptions[topic_filter] = qos
        rc, mid = self._paho.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            with self._subscriptions_lock:
                self._subscriptions.pop(topic_filter, None)
            raise MqttError(f"subscribe {topic_filter!r} failed: {error_string(rc)}")
        # Registering after the call is race-free: the SUBACK can only be delivered by a
        # call_soon_threadsafe callback, which runs after this coroutine step.
        future: asyncio.Future[list[ReasonCode]] = loop.create_future()
        self._pending_subscribes[mid] = future
        reasons = await self._await_ack(future, mid, self._pending_subscribes, "SUBACK")
        granted = reasons[0]
        if granted.is_failure:
            raise MqttError(f"broker refused subscription {topic_filter!r}: {granted}")
        return int(granted.value)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> None:
        """Publish. QoS 1/2 return once the broker acknowledged (PUBACK/PUBCOMP).

        While disconnected, paho keeps QoS 1/2 messages and sends them after
        reconnecting; this call still waits at most `ack_timeout`. QoS 0 needs a
        connection and returns once the message is queued for the socket.
        """
        loop = self._require_open()
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise MqttError(f"QoS 0 publish to {topic!r} not sent: {error_string(info.rc)}")
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic!r} failed: {error_string(info.rc)}")
        # Same race-free registration argument as in subscribe().
        future: asyncio.Future[None] = loop.create_future()
        self._pending_publishes[info.mid] = future
        await self._await_ack(future, info.mid, self._pending_publishes, "PUBACK")

    async def messages(self) -> AsyncGenerator[MqttMessage, None]:
        """Inbound messages in arrival order; ends when the client is closed.

        Meant for one consumer. Remember to `ack()` each QoS 1 message once stored.
        """
        while True:
            item = await self._inbound.get()
            if item is None:
                self._inbound.put_nowait(None)  # let any other iterator end as well
                return
            self._slots.release()
            yield item

    def _require_open(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._closed:
            raise MqttError("client is not connected (call connect() first) or already closed")
        return self._loop

    async def _await_ack(
        self,
        future: asyncio.Future[_T],
        mid: int,
        pending: dict[int, asyncio.Future[_T]],
        what: str,
    ) -> _T:
        try:
            return await asyncio.wait_for(future, self.config.ack_timeout)
        except TimeoutError:
            raise MqttTimeoutError(
                f"no {what} for packet {mid} within {self.config.ack_timeout:.1f}s"
            ) from None
        finally:
            pending.pop(mid, None)

    def _ack(self, msg: MqttMessage) -> None:
        with self._ack_lock:
            if msg._acked or msg.qos == 0:
                return
            msg._acked = True
            if self._closed or msg._connection != self._connection:
                # The packet id belonged to a lost connection; the broker redelivers.
                self._log.debug("mqtt.stale_ack_skipped", topic=msg.topic, mid=msg.mid)
                return
            rc = self._paho.ack(msg.mid, msg.qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._log.warning("mqtt.ack_failed", mid=msg.mid, error=error_string(rc))

    # -- paho callbacks (paho's network thread) --------------------------------

    def _on_connect(
        self,
        client: Client,
        userdata: Any,
        flags: ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._log.warning("mqtt.connect_refused", reason=str(reason))
            error = MqttConnectError(f"{self.config.address} refused the connection: {reason}")
            self._to_loop(_resolve, self._connack, error, None)
            return
        with self._ack_lock:
            self._connection += 1
        if not flags.session_present:
            self._resubscribe(client)
        self._log.info("mqtt.connected", session_present=flags.session_present)
        self._to_loop(_resolve, self._connack, None, None)

    def _resubscribe(self, client: Client) -> None:
        with self._subscriptions_lock:
            filters = list(self._subscriptions.items())
        if filters:
            # SUBACKs for these have no waiter and are ignored by _on_subscribe.
            client.subscribe(filters)
            self._log.info("mqtt.resubscribed", filters=[f for f, _ in filters])

    def _on_connect_fail(self, client: Client, userdata: Any) -> None:
        self._tcp_failures += 1
        self._log.debug("mqtt.tcp_connect_failed", attempts=self._tcp_failures)

    def _on_disconnect(
        self,
        client: Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._closing:
            self._log.warning("mqtt.connection_lost", reason=str(reason))
        # Subscribes in flight are not resent by paho; fail them instead of timing out.
        self._to_loop(self._fail_subscribes, MqttError(f"connection lost: {reason}"))

    def _fail_subscribes(self, error: MqttError) -> None:
        for future in self._pending_subscribes.values():
            _resolve(future, error, None)

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # A broker bug; raising here would kill paho's thread. It can never be
            # processed, so ack it rather than have it redelivered forever.
            self._log.error("mqtt.invalid_topic_dropped", mid=message.mid)
            client.ack(message.mid, message.qos)
            return
        if not self._wait_for_slot():
            return  # closing: not acked, so the broker keeps it for the next session
        msg = MqttMessage(
            topic=topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            mid=message.mid,
            dup=bool(message.dup),
            _acker=self._ack,
            _connection=self._connection,
        )
        if not self._to_loop(self._inbound.put_nowait, msg):
            self._slots.release()

    def _wait_for_slot(self) -> bool:
        """Backpressure: block paho's reader until the application frees a slot."""
        if self._slots.acquire(blocking=False):
            return True
        now = time.monotonic()
        if now - self._last_full_warning >= _FULL_WARNING_INTERVAL:
            self._last_full_warning = now
            self._log.warning("mqtt.inbound_queue_full", bound=self.config.inbound_queue)
        while not self._closing:
            if self._slots.acquire(timeout=_SLOT_POLL_SECONDS):
                return True
        return False

    def _on_publish(
        self, client: Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        error = MqttError(f"broker rejected publish {mid}: {reason}") if reason.is_failure else None
        self._to_loop(self._settle, self._pending_publishes, mid, error, None)

    def _on_subscribe(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._to_loop(self._settle, self._pending_subscribes, mid, None, reasons)

    @staticmethod
    def _settle(
        pending: dict[int, asyncio.Future[Any]], mid: int, error: MqttError | None, result: Any
    ) -> None:
        _resolve(pending.get(mid), error, result)

    def _to_loop(self, func: Callable[..., object], *args: Any) -> bool:
        """Run `func(*args)` on the event loop thread; False once the loop is gone."""
        if self._loop is None:
            return False
        try:
            self._loop.call_soon_threadsafe(func, *args)
        except RuntimeError:  # loop closed: nobody is left to tell
            return False
        return True
