"""`Bus`: typed publish, subscribe, request/reply and JetStream publish over one NATS connection.

Handlers receive decoded, validated events; anything that fails to decode or to be handled
is dead-lettered with its reason and the subscriber keeps going.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import PubAck

from bus.config import NatsConfig
from bus.deadletter import DeadLetterSink
from bus.log import get_logger
from bus.natsclient import EdgebusNatsClient
from schemas import REGISTRY, Event, EventData, EventDecodeError, EventRegistry, new_event
from schemas.common import ErrorReply
from schemas.wire import encode_new_event

D = TypeVar("D", bound=EventData)
R = TypeVar("R", bound=EventData)

EventHandler = Callable[[Event[D]], Awaitable[None]]
RequestHandler = Callable[[Event[D]], Awaitable[EventData]]

MSG_ID_HEADER = "Nats-Msg-Id"
DRAIN_TIMEOUT_S = 30.0  # nats-py's own default drain timeout


class BusConnectError(ConnectionError):
    """The first connection could not be made within the configured bound."""


class RemoteError(RuntimeError):
    """A request was answered with an `ErrorReply`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def connect_options(config: NatsConfig) -> dict[str, Any]:
    """nats-py keyword arguments for a config (exposed so tests and tools can reuse it)."""
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": config.name,
        "connect_timeout": min(config.connect_timeout_s, 2.0),
        "allow_reconnect": True,
        "max_reconnect_attempts": config.reconnect.max_attempts,
        "reconnect_time_wait": config.reconnect.wait_s,
        "pending_size": 64 * 1024 * 1024,
    }
    if config.credentials is not None:
        options["user_credentials"] = str(config.credentials)
    if config.inbox_prefix is not None:
        options["inbox_prefix"] = config.inbox_prefix
    if config.tls is not None:
        import ssl

        context = ssl.create_default_context(
            cafile=str(config.tls.ca_file) if config.tls.ca_file else None
        )
        if config.tls.cert_file and config.tls.key_file:
            context.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
        options["tls"] = context
    return options


async def open_connection(config: NatsConfig, **callbacks: Any) -> NatsClient:
    """Connect with the first attempt bounded as a whole (nats-py alone may hang).

    nats-py keeps retrying a refused login until the bound; the server's last answer
    (e.g. "Authorization Violation") is kept so the error says why, not only "timeout".
    """
    log = get_logger("bus.connection", connection=config.name)
    errors: list[Exception] = []
    user_error_cb = callbacks.pop("error_cb", None)

    async def remember_error(exc: Exception) -> None:
        errors.append(exc)
        if user_error_cb is not None:
            await user_error_cb(exc)

    try:
        nc = EdgebusNatsClient()
        await asyncio.wait_for(
            nc.connect(**connect_options(config), error_cb=remember_error, **callbacks),
            timeout=config.connect_timeout_s,
        )
        return nc
    except Exception as exc:
        log.error("connect_failed", servers=config.servers, error=repr(exc))
        # wait_for's TimeoutError has an empty message: say what it means.
        reason = (
            f"no connection within {config.connect_timeout_s:g}s"
            if isinstance(exc, TimeoutError)
            else str(exc) or repr(exc)
        )
        if errors:
            reason += f" (last server answer: {errors[-1]})"
        raise BusConnectError(
            f"could not connect to {', '.join(config.servers)}: {reason}"
        ) from exc


class _ConnectionEvents:
    """nats-py connection callbacks; quiet while we are closing on purpose."""

    def __init__(self, name: str) -> None:
        self.closing = False
        self._log = get_logger("bus.connection", connection=name)

    async def on_error(self, exc: Exception) -> None:
        self._log.warning("nats_error", error=repr(exc))

    async def on_disconnect(self) -> None:
        if not self.closing:
            self._log.warning("nats_disconnected")

    async def on_reconnect(self) -> None:
        self._log.info("nats_reconnected")


class Bus:
    """One NATS connection with typed, dead-lettering helpers. Create with `Bus.connect`."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        scope: str,
        registry: EventRegistry = REGISTRY,
        source: str | None = None,
        connection_events: _ConnectionEvents | None = None,
    ) -> None:
        self.nc = nc
        self._connection_events = connection_events
        self.js: JetStreamContext = nc.jetstream()
        self.scope = scope
        self.registry = registry
        self.source = source or f"/{scope}"
        self.dead_letters = DeadLetterSink(self.js, scope)
        self.handler_errors = 0
        self._subscriptions: list[Subscription] = []  # drained first on close()
        self._log = get_logger("bus", scope=scope)

    @classmethod
    async def connect(
        cls,
        config: NatsConfig,
        *,
        scope: str = "center",
        registry: EventRegistry = REGISTRY,
        source: str | None = None,
    ) -> Bus:
        events = _ConnectionEvents(config.name)
        nc = await open_connection(
            config,
            error_cb=events.on_error,
            disconnected_cb=events.on_disconnect,
            reconnected_cb=events.on_reconnect,
        )
        return cls(nc, scope=scope, registry=registry, source=source, connection_events=events)

    # -- events out ------------------------------------------------------------------

    def event(self, data: EventData, **attributes: Any) -> Event[Any]:
        """A new envelope around `data`, with this bus's `source` unless given."""
        if not attributes:  # the common case, without re-packing the keyword arguments
            return new_event(data, source=self.source)
        attributes.setdefault("source", self.source)
        return new_event(data, **attributes)

    async def publish(self, subject: str, event: Event[Any]) -> None:
        """Core NATS publish: at most once, for live fan-out."""
        await self.nc.publish(subject, self.registry.encode(event))

    async def emit(
        self,
        subject: str,
        data: EventData,
        *,
        event_subject: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Publish a fresh event around `data` (core NATS) and return its id.

        The hot path for producers: the bytes are built directly (`schemas.wire`), with no
        envelope object in between; they decode to the same event `publish` would send.
        """
        event_id, payload = encode_new_event(
            data, source=self.source, subject=event_subject, correlation_id=correlation_id
        )
        await self.nc.publish(subject, payload)
        return event_id

    async def publish_js(self, subject: str, event: Event[Any], *, timeout: float = 5.0) -> PubAck:
        """JetStream publish; `Nats-Msg-Id` = event id makes retries idempotent."""
        return await self.js.publish(
            subject,
            self.registry.encode(event),
            timeout=timeout,
            headers={MSG_ID_HEADER: event.id},
        )

    # -- events in -------------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        model: type[D],
        handler: EventHandler[D],
        *,
        queue: str = "",
        component: str = "subscriber",
    ) -> Subscription:
        """Call `handler` with each decoded event; dead-letter what fails, keep going."""
        decode = self.registry.decoder_for(model)

        async def on_message(msg: Msg) -> None:
            try:
                event = decode(msg.data)
            except EventDecodeError as exc:
                await self._dead_letter(msg, component, exc.reason, exc.message, exc.event_id)
                return
            try:
                await handler(event)
            except Exception as exc:
                await self._handler_failed(msg, component, event, exc)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_message)
        self._subscriptions.append(sub)
        return sub

    async def serve(
        self,
        subject: str,
        model: type[D],
        handler: RequestHandler[D],
        *,
        queue: str = "",
        component: str = "responder",
    ) -> Subscription:
        """Answer requests on `subject`; failures answer with an `ErrorReply`, never silence."""
        decode = self.registry.decoder_for(model)

        async def on_request(msg: Msg) -> None:
            try:
                request = decode(msg.data)
            except EventDecodeError as exc:
                await self._dead_letter(msg, component, exc.reason, exc.message, exc.event_id)
                await self._reply_error(msg, exc.reason, exc.message, None)
                return
            try:
                answer = await handler(request)
            except Exception as exc:
                await self._handler_failed(msg, component, request, exc)
                await self._reply_error(msg, "handler_failed", repr(exc), request.id)
                return
            if msg.reply:
                reply = self.event(answer, correlation_id=request.correlationid or request.id)
                await self.nc.publish(msg.reply, self.registry.encode(reply))

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_request)
        self._subscriptions.append(sub)
        return sub

    async def request(
        self,
        subject: str,
        data: EventData,
        response_model: type[R],
        *,
        timeout: float = 5.0,
        correlation_id: str | None = None,
    ) -> Event[R]:
        """Send a request event, return the typed answer; `RemoteError` on an error reply."""
        request = self.event(data, correlation_id=correlation_id)
        msg = await self.nc.request(subject, self.registry.encode(request), timeout=timeout)
        try:
            return self.registry.decode_as(msg.data, response_model)
        except EventDecodeError:
            error = self.registry.decode_as(msg.data, ErrorReply)
            raise RemoteError(error.data.code, error.data.message) from None

    async def request_all(
        self,
        subject: str,
        data: EventData,
        response_model: type[R],
        *,
        wait_s: float = 1.0,
        expected: int | None = None,
    ) -> list[Event[R]]:
        """Send a request every responder answers (no queue group), and gather the typed
        answers that arrive within `wait_s` (sooner once `expected` came). Answers that do not
        decode as `response_model` (error replies) are left out and logged."""
        answers: asyncio.Queue[Msg] = asyncio.Queue()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=answers.put)
        out: list[Event[R]] = []
        try:
            await self.nc.publish(subject, self.registry.encode(self.event(data)), reply=inbox)
            deadline = asyncio.get_running_loop().time() + wait_s
            while expected is None or len(out) < expected:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(answers.get(), remaining)
                except TimeoutError:
                    break
                try:
                    out.append(self.registry.decode_as(msg.data, response_model))
                except EventDecodeError as exc:
                    self._log.warning("answer_not_decoded", subject=subject, error=str(exc))
        finally:
            await sub.unsubscribe()
        return out

    # -- lifecycle -------------------------------------------------------------------

    async def confirm_subscriptions(self, timeout: float = 5.0) -> None:
        """Return once the server has every subscription made so far.

        Not `nc.flush()`: nats-py 2.16 writes its PING past the pending-command buffer, so
        the PONG can come back before the SUBs went out (measured: ~5% of starts answered
        "no responders" right after). A request to ourselves is queued behind the SUBs.
        """
        echo = self.nc.new_inbox()

        async def answer(msg: Msg) -> None:
            await self.nc.publish(msg.reply, b"")

        sub = await self.nc.subscribe(echo, cb=answer)
        try:
            await self.nc.request(echo, b"", timeout=timeout)
        finally:
            await sub.unsubscribe()

    async def close(self) -> None:
        """Drain: finish in-flight handlers and flush publishes, then close."""
        if self.nc.is_closed:
            return
        if self._connection_events is not None:
            self._connection_events.closing = True
        try:
            await self._drain_subscriptions()
            await self.nc.drain()
        except Exception as exc:  # already closing / connection lost: nothing left to flush
            self._log.debug("drain_failed", error=repr(exc))
            await self.nc.close()

    async def _drain_subscriptions(self) -> None:
        """Drain our subscriptions while the connection's request inbox is still live.

        `nc.drain()` alone drains every subscription at once, the request inbox included:
        a handler that dead-letters meanwhile (a JetStream publish waits for its ack) would
        wait out its whole timeout and count a stored record as a store failure.
        """
        subscriptions, self._subscriptions = self._subscriptions, []
        results = await asyncio.wait_for(
            asyncio.gather(
                *(sub.drain() for sub in subscriptions),  # type: ignore[no-untyped-call]
                return_exceptions=True,
            ),
            timeout=DRAIN_TIMEOUT_S,
        )
        for result in results:
            if isinstance(result, Exception):  # e.g. already unsubscribed by its owner
                self._log.debug("subscription_drain_failed", error=repr(result))

    # -- failure paths ---------------------------------------------------------------

    async def _dead_letter(
        self, msg: Msg, component: str, reason: str, detail: str, event_id: str | None
    ) -> None:
        await self.dead_letters.record(
            component=component,
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            reason=reason,
            detail=detail,
            event_id=event_id,
        )

    async def _handler_failed(
        self, msg: Msg, component: str, event: Event[Any], exc: Exception
    ) -> None:
        self.handler_errors += 1
        self._log.error("handler_failed", subject=msg.subject, event_id=event.id, error=repr(exc))
        await self._dead_letter(msg, component, "handler_failed", repr(exc), event.id)

    async def _reply_error(
        self, msg: Msg, code: str, message: str, correlation_id: str | None
    ) -> None:
        if not msg.reply:
            return
        reply = self.event(
            ErrorReply(code=code, message=message[:4096]), correlation_id=correlation_id
        )
        await self.nc.publish(msg.reply, self.registry.encode(reply))
