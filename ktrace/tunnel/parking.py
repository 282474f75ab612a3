"""Where a program's redirected TCP socket waits while the agent dials, and how it is then
connected to the agent's stream: the kernel keeps the program's connect() exactly as a
pod's would be, in progress, without ktrace holding the program's thread.

The program's socket is connected (by ktrace on its duplicate, or by the program's own
connect() with the address rewritten) to a *parking* listener on loopback whose accept
queue is full: the kernel drops its SYN (tcp_conn_request drops when sk_acceptq_is_full),
so the socket sits in SYN_SENT like one connecting to a distant host. poll() shows nothing,
SO_ERROR is 0, a blocking connect() sleeps in the kernel where signals reach it (EINTR, or
the restart SA_RESTART asks for), and a non-blocking one returns EINPROGRESS at once.

When the agent has connected, ktrace completes the handshake from the parking address
itself: a socket bound to the same address and port (SO_REUSEPORT, same user) connects to
the program socket's address. The two SYNs cross (a TCP "simultaneous open", RFC 793
3.4): the program socket passes through SYN_RECV to ESTABLISHED, its connect() succeeds
and poll() says writable, and ktrace holds the other end, which it splices to the agent's
stream. When the agent's dial fails, ktrace disconnects the program socket instead
(connect(AF_UNSPEC) on its duplicate): see `ktrace/tracer/tcp.py` for how the program
then gets the agent's errno.

The SYN is retransmitted while parked (after 1, 3, 7... s) and dropped again each time;
nothing leaves loopback. No other user can bind the parking port (SO_REUSEPORT groups are
per user), and a connection from anyone else to the listener is never accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from ktrace_agent.wire.connecting import TCP_SYN_SENT, end_family, meet_parked, relay_leg, until_not_closed

from .types import Connection, TcpStats

log = logging.getLogger("ktrace.tunnel")

OnClosed = Callable[[Connection, TcpStats], None]
# How long attach() waits for a program socket to reach SYN_SENT (a blocking connect whose
# thread has not yet entered the kernel: the agent answered faster than it was scheduled).
ATTACH_WAIT = 30.0


class ProgramSocketGone(Exception):
    """The program's socket left the parking lot before the agent's connection could be handed to it
    (or, ``errno`` ENOBUFS, ktrace had no descriptor left to complete its connect from)."""

    def __init__(self, message: str, err: int = errno.ECONNABORTED) -> None:
        super().__init__(message)
        self.errno = err


class ParkingLot:
    def __init__(self, on_closed: OnClosed | None = None) -> None:
        self._on_closed = on_closed
        self._listeners: dict[int, socket.socket] = {}
        self._fillers: list[socket.socket] = []
        self._splices: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Park on 127.0.0.1 and, where the host has IPv6, on ::1."""
        self._listen(socket.AF_INET, "127.0.0.1")
        try:
            self._listen(socket.AF_INET6, "::1")
        except OSError as exc:
            log.debug("no IPv6 loopback (%s); AF_INET6 sockets park at a v4-mapped address", exc)

    def _listen(self, family: int, host: str) -> None:
        listener = socket.socket(family, socket.SOCK_STREAM)
        filler = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, 0))
            # Backlog 0 holds one connection; the filler takes it and is never accepted, so the
            # queue stays full and every later SYN is dropped.
            listener.listen(0)
            filler.connect(listener.getsockname()[:2])
        except BaseException:
            listener.close()
            filler.close()
            raise
        self._listeners[family] = listener
        self._fillers.append(filler)

    def address(self, family: int) -> tuple[str, int]:
        """Where a program socket of ``family`` waits."""
        if family == socket.AF_INET6:
            if socket.AF_INET6 in self._listeners:
                return "::1", self._listeners[socket.AF_INET6].getsockname()[1]
            return "::ffff:127.0.0.1", self._listeners[socket.AF_INET].getsockname()[1]
        return "127.0.0.1", self._listeners[socket.AF_INET].getsockname()[1]

    async def attach(self, stream: Connection, program: socket.socket) -> None:
        """Complete ``program``'s parked connect towards ktrace and splice it to ``stream``.

        ``program`` is ktrace's duplicate of the program's socket (the caller keeps and
        closes it). Raises ProgramSocketGone when it is not (or no longer) parked here."""
        # CLOSE: its blocking connect() has not reached the kernel yet.
        state = await until_not_closed(program, ATTACH_WAIT, lambda: not self._closing)
        if state != TCP_SYN_SENT:
            raise ProgramSocketGone(f"the program's socket is in TCP state {state}, not parked")
        if self._closing:
            raise ProgramSocketGone("ktrace is shutting down")
        try:
            end = self.end_for(program)
        except OSError as exc:  # EMFILE: the connect fails as one ktrace cannot look at (ENOBUFS)
            raise ProgramSocketGone(f"no socket to complete the program's connect from: {exc}", errno.ENOBUFS) from None
        try:
            await meet_parked(end, program, None)
        except OSError as exc:
            end.close()
            raise ProgramSocketGone(f"completing the program's connect failed: {exc}") from None
        except BaseException:
            end.close()
            raise
        stream.take(end)  # a same-host agent relays it from now, before the splice's task runs
        self._spawn(self._serve(end, stream))

    def end_for(self, program: socket.socket) -> socket.socket:
        """A socket bound to the parking address ``program`` waits at, to complete its handshake
        from (here, or by a same-host agent: ``adopt``)."""
        family = end_family(program.family, socket.AF_INET6 in self._listeners)
        end = relay_leg(family)
        try:
            end.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            end.bind(self._listeners[family].getsockname())
        except BaseException:
            end.close()
            raise
        return end

    def adopt(self, stream: Connection, end: socket.socket) -> None:
        """``end`` completed the program's connect elsewhere (a same-host agent did): carry it."""
        stream.take(end)
        self._spawn(self._serve(end, stream))

    async def _serve(self, sock: socket.socket, stream: Connection) -> None:
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
        """Stop parking and end every splice.

        With ``grace``, splices first get that long to finish by themselves: when the
        program exits, the kernel closes its sockets, and what it wrote just before must
        still reach the remote side."""
        self._closing = True
        for sock in (*self._listeners.values(), *self._fillers):
            sock.close()
        self._listeners.clear()
        self._fillers.clear()
        if grace > 0 and self._splices:
            await asyncio.wait(list(self._splices), timeout=grace)
        for task in list(self._splices):
            task.cancel()
        for task in list(self._splices):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
