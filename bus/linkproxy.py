"""A cuttable TCP forwarder between a site and the hub, for fault tests and the demo.
It runs its own event loop in its own thread, so it keeps forwarding while the caller blocks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = ["LinkProxy"]

_T = TypeVar("_T")
_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 5.0


class LinkProxy:
    """Forwards 127.0.0.1:<port> to target_host:target_port until cut.

    While cut, open connections are aborted and new ones are accepted and closed at
    once, so the listening port never changes and the far side just sees a dead link.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "link",
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.name = name
        self._port = listen_port
        self._is_cut = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        # Both transports of every forwarded connection; only touched on the loop.
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # -- lifecycle (called from any thread but the proxy's own) ---------------

    def start(self, timeout: float = 5.0) -> None:
        """Bind and start forwarding; a restarted proxy keeps its first port."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} proxy already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(
            target=self._run_loop, args=(loop, ready), name=f"linkproxy-{self.name}", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{self.name} proxy loop did not start within {timeout}s")
        try:
            self._call(self._listen(), timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, end the thread. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._call(self._shutdown(), timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None
        if not thread.is_alive():
            loop.close()

    def cut(self) -> None:
        """Drop every open connection now and refuse new ones until restore()."""
        self._call(self._cut())

    def restore(self) -> None:
        """Forward new connections again (the far side reconnects on its own schedule)."""
        self._is_cut = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state ---------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._is_cut

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError(f"{self.name} proxy has no port until start()")
        return self._port

    @property
    def url(self) -> str:
        """Leaf-node URL of the proxy, to use as a site's remote instead of the hub's."""
        return f"nats-leaf://{self.listen_host}:{self.port}"

    @property
    def active_connections(self) -> int:
        return len(self._links)

    # -- event-loop side -----------------------------------------------------

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 5.0) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} proxy is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LinkProxy methods must not be called from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        # Finish every handler first: from Python 3.12 on, wait_closed() also waits
        # for open connections, and no task should be destroyed while pending.
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _cut(self) -> None:
        self._is_cut = True
        self._abort_all()

    def _abort_all(self) -> None:
        for client, upstream in list(self._links):
            # abort(), not close(): a cut link loses in-flight bytes, like a real one.
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            if self._is_cut:
                return  # accept-and-drop: the listener stays bound while cut
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), _CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                return
            upstream = up_writer
            if self._is_cut:  # cut() ran while we were connecting upstream
                return
            link = (writer, up_writer)
            self._links.add(link)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                self._links.discard(link)
        finally:
            writer.transport.abort()
            if upstream is not None:
                upstream.transport.abort()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy bytes until either side goes away, then tear the pair down.

    NATS never half-closes, so one side ending means the whole link is gone.
    """
    try:
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        sink.transport.abort()
