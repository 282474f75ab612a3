"""ktrace's keyed line to a same-host agent's desk: connections dialled and relayed without gRPC
(the agent's side, and why, in ``agent/desk_line.py``).

``DeskClient.dial`` sends ``open`` and waits for ``opened``; the ``DeskConnection`` it returns
is then attached like a ``TcpStream`` (``parking.py``): its ``splice`` sends ktrace's end of the
program's connection with ``attach`` and waits for ``relayed``. ktrace keeps its copy of that
socket until then, so when the line is lost (the agent died) the program's connection is reset
from here, and a dial waiting on the line fails with ``TunnelLost``: the client then dials
through the tunnel, which waits for an agent that comes back (``AgentClient.open_tcp``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from google.protobuf.message import DecodeError
from ktrace_agent.wire import codec, rpc

from .handover import dial_desk
from .tcp_stream import OPEN_MARGIN, reset_socket
from .types import Connection, Endpoint, TcpStats, TunnelError, TunnelLost

log = logging.getLogger("ktrace.tunnel")

# What a dial lost with the line becomes (the client dials through the tunnel instead).
Fallback = Callable[[TunnelLost], Awaitable[Connection]]

MAX_ANSWER = 512  # a DeskAnswer is ~60 bytes; a relayed outcome's text is short


class _Aborted(Exception):
    """ktrace gave the connection up while it waited for the agent's answer."""


class DeskClient:
    """The line; ``lost`` is set once it broke (every later call raises ``TunnelLost``)."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[rpc.DeskAnswer]] = {}
        self._outbox: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self.lost: str | None = None
        asyncio.get_running_loop().add_reader(sock, self._readable)

    @classmethod
    async def connect(cls, path: str, desk_id: bytes, key: bytes) -> DeskClient | None:
        """A keyed line to the desk at ``path``, or None when it is not reachable or not that agent."""
        sock = await dial_desk(path, desk_id)
        if sock is None:
            return None
        try:
            sock.send(rpc.DeskRequest(hello=key).SerializeToString())
        except OSError as exc:
            sock.close()
            log.debug("desk: hello failed (%s)", exc)
            return None
        return cls(sock, path)

    def dial(self, dest: Endpoint, timeout: float | None, lost: Fallback) -> DeskDial:
        """Ask the agent, now, to connect to ``dest``; raises ``TunnelLost`` when the line is lost
        (and the dial, when it is lost while waiting, becomes ``lost(why)``'s)."""
        conn_id = next(self._ids) & 0xFFFFFFFF
        timeout_ms = max(1, round(timeout * 1000)) if timeout is not None else 0
        request = rpc.TcpOpen(destination=codec.encode_address(dest), timeout_ms=timeout_ms)
        answer = self._expect(conn_id)
        self._send_for(answer, rpc.DeskRequest(id=conn_id, open=request))
        return DeskDial(self, conn_id, dest, timeout, answer, lost)

    async def opened(
        self, conn_id: int, dest: Endpoint, timeout: float | None, answer: asyncio.Future[rpc.DeskAnswer]
    ) -> DeskConnection:
        """The connection once the agent answered; raises ``TunnelError`` with its errno, or ``TunnelLost``."""
        try:
            reply = await asyncio.wait_for(answer, timeout + OPEN_MARGIN if timeout is not None else None)
        except TimeoutError:
            self.abort(conn_id)
            raise TunnelError("ETIMEDOUT", f"no answer from the agent for {dest} in time") from None
        except BaseException:
            self.abort(conn_id)
            raise
        kind = reply.WhichOneof("kind")
        if kind == "failure":
            raise codec.decode_failure(reply.failure)
        if kind != "opened":
            self.abort(conn_id)
            raise TunnelError("EIO", f"agent answered {kind!r} to open")
        local, peer = codec.decode_address(reply.opened.local), codec.decode_address(reply.opened.peer)
        return DeskConnection(self, conn_id, local, peer)

    def _expect(self, conn_id: int) -> asyncio.Future[rpc.DeskAnswer]:
        if self.lost is not None:
            raise TunnelLost("EIO", self.lost)
        future: asyncio.Future[rpc.DeskAnswer] = asyncio.get_running_loop().create_future()
        self._waiting[conn_id] = future
        return future

    def _send(self, request: rpc.DeskRequest, fd: int | None = None) -> None:
        """One record: now, or after those still waiting. The kernel holds a line's records not
        yet read up to our SO_SNDBUF (a few hundred small ones), which a burst of connects fills
        (1,000 at once in scripts/bench); the rest wait here, in order, each descriptor as a
        duplicate of its own (the caller may close its socket meanwhile, and the number be
        reused)."""
        record = request.SerializeToString()
        if not self._outbox:
            try:
                self._send_now(record, fd)
                return
            except BlockingIOError:
                asyncio.get_running_loop().add_writer(self._sock, self._writable)
        self._outbox.append((record, None if fd is None else os.dup(fd)))

    def _send_now(self, record: bytes, fd: int | None) -> None:
        """Raises BlockingIOError when the agent's queue is full; ``TunnelLost`` when the line failed."""
        try:
            if fd is None:
                self._sock.send(record)
            else:
                socket.send_fds(self._sock, [record], [fd])
        except (BlockingIOError, InterruptedError):
            raise BlockingIOError from None
        except OSError as exc:
            self._lose(f"the agent's desk line failed: {exc}")
            raise TunnelLost("EIO", self.lost or "the agent's desk line failed") from None

    def _writable(self) -> None:
        while self._outbox:
            record, fd = self._outbox[0]
            try:
                self._send_now(record, fd)
            except BlockingIOError:
                return
            except TunnelLost:
                return  # _lose emptied the outbox
            self._outbox.popleft()
            if fd is not None:
                os.close(fd)
        asyncio.get_running_loop().remove_writer(self._sock)

    def _send_for(
        self, answer: asyncio.Future[rpc.DeskAnswer], request: rpc.DeskRequest, fd: int | None = None
    ) -> None:
        """``_send`` a request whose answer is awaited: when the line breaks on it, the answer's
        TunnelLost is the one raised (and so retrieved)."""
        try:
            self._send(request, fd)
        except TunnelLost:
            if answer.done():
                answer.exception()
            raise

    def attach(self, conn_id: int, program: socket.socket) -> asyncio.Future[rpc.DeskAnswer]:
        """Send ``program`` for the connection; its ``relayed`` (or ``failure``) answer."""
        answer = self._expect(conn_id)
        self._send_for(answer, rpc.DeskRequest(id=conn_id, attach=True), program.fileno())
        return answer

    def abort(self, conn_id: int) -> None:
        future = self._waiting.pop(conn_id, None)
        if future is not None and not future.done():
            future.set_exception(_Aborted())
            future.exception()  # retrieved: nobody may be waiting (a dial given up unawaited)
        if self.lost is None:
            with contextlib.suppress(TunnelLost):
                self._send(rpc.DeskRequest(id=conn_id, abort=True))

    def _readable(self) -> None:
        while self.lost is None:
            try:
                record = self._sock.recv(MAX_ANSWER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(f"the agent's desk line failed: {exc}")
                return
            if not record:
                self._lose("the agent closed its desk line")
                return
            try:
                answer = rpc.DeskAnswer.FromString(record)
            except DecodeError:
                self._lose("a malformed answer on the agent's desk line")
                return
            future = self._waiting.pop(answer.id, None)
            if future is not None and not future.done():
                future.set_result(answer)

    def _lose(self, why: str) -> None:
        if self.lost is not None:
            return
        self.lost = why
        log.debug("desk: %s", why)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self._sock)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_writer(self._sock)
        for _, fd in self._outbox:
            if fd is not None:
                os.close(fd)
        self._outbox.clear()
        self._sock.close()
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(TunnelLost("EIO", why))

    def close(self) -> None:
        self._lose("closed")


class DeskDial:
    """A dial sent on the line (``PendingDial``): ``await`` it for the connection; ``close()``
    gives up one never awaited (the agent resets what it dialled)."""

    def __init__(
        self,
        line: DeskClient,
        conn_id: int,
        dest: Endpoint,
        timeout: float | None,
        answer: asyncio.Future[rpc.DeskAnswer],
        lost: Fallback,
    ) -> None:
        self._lost = lost
        self._line = line
        self._id = conn_id
        self._dest = dest
        self._timeout = timeout
        self._answer = answer
        self._awaited = False

    def __await__(self) -> Generator[Any, None, Connection]:
        self._awaited = True
        return self._result().__await__()

    async def _result(self) -> Connection:
        try:
            return await self._line.opened(self._id, self._dest, self._timeout, self._answer)
        except TunnelLost as lost:
            return await self._lost(lost)

    def close(self) -> None:
        if not self._awaited:
            self._awaited = True
            self._line.abort(self._id)


class DeskConnection:
    """A connection the agent dialled on the line; ``local``: its socket's address there."""

    def __init__(self, line: DeskClient, conn_id: int, local: Endpoint, peer: Endpoint) -> None:
        self._line = line
        self._id = conn_id
        self._relayed: asyncio.Future[rpc.DeskAnswer] | None = None  # once taken
        self._lost: TunnelLost | None = None  # the line broke as it was taken
        self.local = local
        self.peer = peer
        self.opened_at = time.monotonic()  # for the report: how long the connection lived

    async def abort(self) -> None:
        """Give the connection up: the agent resets it (and the program's end, once attached)."""
        self._line.abort(self._id)

    def take(self, sock: socket.socket) -> None:
        """Hand ``sock`` (ktrace's end of the program's connection) to the agent now."""
        try:
            self._relayed = self._line.attach(self._id, sock)
        except TunnelLost as lost:
            self._lost = lost

    async def splice(self, sock: socket.socket) -> TcpStats:
        """Wait until the agent relayed ``sock`` (handed over by ``take``, or now); ``sock`` is
        closed on return, with RST when the connection was reset."""
        if self._relayed is None and self._lost is None:
            self.take(sock)
        stats = TcpStats()
        outcome = ""  # empty: both directions ended with a FIN
        try:
            if self._lost is not None:
                raise self._lost
            assert self._relayed is not None
            answer = await self._relayed
            kind = answer.WhichOneof("kind")
            if kind == "relayed":
                stats.bytes_up, stats.bytes_down = answer.relayed.bytes_up, answer.relayed.bytes_down
                outcome = answer.relayed.outcome
            elif kind == "failure":
                outcome = f"error: {codec.decode_failure(answer.failure)}"
            else:
                outcome = f"error: unexpected {kind!r} from the agent's desk"
        except TunnelLost as lost:
            outcome = f"error: {lost.message}"
        except _Aborted:
            outcome = "aborted"
        except asyncio.CancelledError:
            stats.outcome = "aborted"
            self._line.abort(self._id)
            reset_socket(sock)
            sock.close()
            raise
        if outcome:
            stats.outcome = outcome
            reset_socket(sock)  # the agent set it on the shared socket already when it reset
        sock.close()
        return stats
