"""The loopback endpoint: where the tracer connects a program's socket, spliced to a ``TcpStream``.

Pairing is by source port. The tracer connects its duplicate of the program's
socket here, learns the source port, and calls ``expect()`` synchronously, all
before the event loop gets to run the accept callback; so by the time a connection
is accepted, the stream for it is registered. A connection nobody expects is
closed at once: any local process could connect here, and must not reach a tunnel
stream meant for someone else.

Keys are (listener family, source port): v4 and v6 source ports are independent.
When IPv6 is unavailable, AF_INET6 sockets are pointed at the IPv4 listener through
a v4-mapped address and are accepted there, so their key uses AF_INET.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from .tcp_stream import TcpStream, reset_writer
from .types import TcpStats

log = logging.getLogger("ktrace.tunnel")

BACKLOG = 4096
_READ_LIMIT = 512 * 1024

OnClosed = Callable[[TcpStream, TcpStats], None]


class LoopbackEndpoint:
    def __init__(self, on_closed: OnClosed | None = None) -> None:
        self._on_closed = on_closed
        self._servers: dict[int, asyncio.Server] = {}
        self._ports: dict[int, int] = {}
        self._expected: dict[tuple[int, int], TcpStream] = {}
        self._splices: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Listen on 127.0.0.1:0 and, where the host has IPv6, on [::1]:0."""
        self._servers[socket.AF_INET] = await asyncio.start_server(
            self._accepted, "127.0.0.1", 0, family=socket.AF_INET, backlog=BACKLOG, limit=_READ_LIMIT
        )
        try:
            self._servers[socket.AF_INET6] = await asyncio.start_server(
                self._accepted, "::1", 0, family=socket.AF_INET6, backlog=BACKLOG, limit=_READ_LIMIT
            )
        except OSError as exc:
            log.debug("no IPv6 loopback (%s); AF_INET6 sockets use v4-mapped addresses", exc)
        for family, server in self._servers.items():
            self._ports[family] = server.sockets[0].getsockname()[1]

    def _listener_family(self, family: int) -> int:
        return family if family in self._servers else socket.AF_INET

    def address(self, family: int) -> tuple[str, int]:
        """Where a socket of ``family`` should be connected."""
        if family == socket.AF_INET6:
            if socket.AF_INET6 in self._servers:
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

    def forget(self, family: int, source_port: int) -> None:
        """Drop an expectation (the tracer's connect failed); the stream is not touched."""
        self._expected.pop((self._listener_family(family), source_port), None)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        family = sock.family if sock is not None else socket.AF_INET
        stream = self._expected.pop((family, peer[1]), None) if peer else None
        if stream is None or self._closing:
            log.warning("closed an unexpected loopback connection from %s", peer)
            reset_writer(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._splices.add(task)
        try:
            stats = await stream.splice(reader, writer)
        except asyncio.CancelledError:
            # This is the top of a task asyncio started for the connection; a
            # cancelled one would be reported as an error by asyncio itself.
            return
        finally:
            self._splices.discard(task)
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
        for server in self._servers.values():
            server.close()
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
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await server.wait_closed()
