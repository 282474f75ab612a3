"""The loopback endpoint: where the tracer connects a program's socket, spliced to a ``TcpStream``.

Pairing is by source port. The tracer connects its duplicate of the program's
socket here, learns the source port, and calls ``expect()`` synchronously, all
before the event loop gets to run the accept callback; so by the time a connection
is accepted, the stream for it is registered. ``expect()`` itself accepts what is
queued (a loopback handshake is done when connect() returns), so the splice is
ready before the program runs on; the listener's reader callback takes the rest
(a non-blocking connect still in progress). A connection nobody expects is
closed at once: any local process could connect here, and must not reach a tunnel
stream meant for someone else.

Keys are (listener family, source port): v4 and v6 source ports are independent.
When IPv6 is unavailable, AF_INET6 sockets are pointed at the IPv4 listener through
a v4-mapped address and are accepted there, so their key uses AF_INET.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from .tcp_stream import TcpStream, reset_socket
from .types import TcpStats

log = logging.getLogger("ktrace.tunnel")

BACKLOG = 4096
ACCEPT_RETRY = 1.0  # seconds without accepting after running out of descriptors or memory
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

OnClosed = Callable[[TcpStream, TcpStats], None]


class LoopbackEndpoint:
    def __init__(self, on_closed: OnClosed | None = None) -> None:
        self._on_closed = on_closed
        self._listeners: dict[int, socket.socket] = {}
        self._ports: dict[int, int] = {}
        self._expected: dict[tuple[int, int], TcpStream] = {}
        self._splices: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Listen on 127.0.0.1:0 and, where the host has IPv6, on [::1]:0."""
        self._listen(socket.AF_INET, "127.0.0.1")
        try:
            self._listen(socket.AF_INET6, "::1")
        except OSError as exc:
            log.debug("no IPv6 loopback (%s); AF_INET6 sockets use v4-mapped addresses", exc)

    def _listen(self, family: int, host: str) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((host, 0))
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._listeners[family] = sock
        self._ports[family] = sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_pending, family)

    def _listener_family(self, family: int) -> int:
        return family if family in self._listeners else socket.AF_INET

    def address(self, family: int) -> tuple[str, int]:
        """Where a socket of ``family`` should be connected."""
        if family == socket.AF_INET6:
            if socket.AF_INET6 in self._listeners:
                return "::1", self._ports[socket.AF_INET6]
            return "::ffff:127.0.0.1", self._ports[socket.AF_INET]
        return "127.0.0.1", self._ports[socket.AF_INET]

    def expect(self, family: int, source_port: int, stream: TcpStream) -> None:
        """Splice the connection that will arrive from ``source_port`` to ``stream``."""
        key = (self._listener_family(family), source_port)
        if key in self._expected:
            # The old socket is gone (its port was reused): its stream has no one to serve.
            stale = self._expected.pop(key)
            self._spawn(stale.abort())
        self._expected[key] = stream
        # A loopback connect has completed its handshake by the time connect() returns: the
        # connection is usually queued already. Taking it now starts the splice before the
        # program is even resumed, instead of a few event-loop turns after its first write.
        self._accept_pending(key[0])

    def forget(self, family: int, source_port: int) -> None:
        """Drop an expectation (the tracer's connect failed); the stream is not touched."""
        self._expected.pop((self._listener_family(family), source_port), None)

    def _accept_pending(self, family: int) -> None:
        listener = self._listeners.get(family)
        while listener is not None:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # The connection stays queued and the listener readable: stop watching it
                    # for a while instead of spinning (what asyncio's own servers do).
                    log.warning("accepting a loopback connection failed: %s; retrying in %ss", exc, ACCEPT_RETRY)
                    self._pause_accepting(family)
                else:  # ECONNABORTED...: that connection is gone, the listener is fine
                    log.debug("accepting a loopback connection failed: %s", exc)
                return
            stream = self._expected.pop((family, peer[1]), None)
            if stream is None or self._closing:
                log.warning("closed an unexpected loopback connection from %s", peer)
                reset_socket(sock)
                sock.close()
                continue
            self._spawn(self._serve(sock, stream))

    def _pause_accepting(self, family: int) -> None:
        listener = self._listeners.get(family)
        if listener is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener.fileno())

        def resume() -> None:
            if self._listeners.get(family) is listener:
                loop.add_reader(listener.fileno(), self._accept_pending, family)

        loop.call_later(ACCEPT_RETRY, resume)

    async def _serve(self, sock: socket.socket, stream: TcpStream) -> None:
        stats = await stream.splice(sock)
        if self._on_closed is not None:
            try:
                self._on_closed(stream, stats)
            except Exception:
                log.exception("on_closed callback failed")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._splices.add(task)
        task.add_done_callback(self._splices.discard)

    async def close(self, grace: float = 0.0) -> None:
        """Stop listening and abort every stream, spliced or still expected.

        With ``grace``, streams first get that long to finish by themselves:
        when the program exits, the kernel closes its sockets, and what it
        wrote just before must still reach the remote side.
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        for listener in self._listeners.values():
            loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()
        expected = list(self._expected.values())
        self._expected.clear()
        for stream in expected:
            await stream.abort()
        if grace > 0 and self._splices:
            await asyncio.wait(list(self._splices), timeout=grace)
        for task in list(self._splices):
            task.cancel()
        for task in list(self._splices):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
