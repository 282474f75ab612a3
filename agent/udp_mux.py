"""One ``DatagramSessions`` stream: many UDP sockets of the program, one agent socket each.

A stream per program socket (every glibc lookup opens one) would cost a stream start (HTTP/2
headers both ways, the auth check, the handler's start) and a stream end in both processes,
per lookup. One long-lived stream carries many sessions instead; every frame names its session
(``session``, never 0), and each session still gets an agent socket of its own with a fresh
random source port (udp_socket.py; RFC 5452, what a pod's resolver does per lookup).

Client → agent: ``open{family}`` (the session's socket is made; ``opened{local}`` answers,
or ``refused{failure}`` when no socket could be made or a cap is reached: that session
is over, the others go on), ``datagram`` (to a session refused or closed
already: dropped and counted, as a closed socket's would be), ``close`` (the socket is
closed). Agent → client: ``opened`` / ``refused``, then ``datagram``, ``failure``,
``peer_failure`` (udp_socket.py). Either side sends the frames waiting together as one
``frames`` message (wire/batching.py: a resolver's A and AAAA answers, another session's
``opened``, all leave together).

Bad frames (session 0, an unknown kind, ``open`` for a session that is open, a
malformed address, nested ``frames``) end the stream with INVALID_ARGUMENT: every
session on it ends, its sockets closed, as when the stream is lost; the agent goes on.

Bounds: at most ``MAX_SESSIONS_PER_STREAM`` sessions per stream and ``MAX_SESSIONS`` in
the agent (each is a descriptor); frames for the client wait in one queue per stream, at
most ``QUEUE_DATAGRAMS`` (512) per session and ``QUEUE_FRAMES`` (2,048) per stream (beyond that,
received datagrams and errors are dropped and counted, as a full socket buffer drops
them). The answers to ``open`` (``opened``, ``refused``) are never dropped; a client that
opens sessions while it leaves ``QUEUE_ANSWERS`` (2,048) answers unread has its stream ended
(RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import NoReturn

import grpc

from .udp_socket import (
    QUEUE_DATAGRAMS,
    AgentSocket,
    PortZero,
    bound_socket,
    protocol_error,
    read_client_frame,
    send_datagram,
)
from .wire import MAX_SESSIONS_PER_STREAM, batching, codec, rpc

log = logging.getLogger("ktrace_agent")

# A program's sockets stay open sessions until ktrace sees them closed (its sweep runs after
# every 512 new program sockets, or every 30 s): a program looking names up in a loop has
# hundreds at once (MAX_SESSIONS_PER_STREAM on one stream; ktrace starts another stream
# beyond that). The agent-wide cap keeps its descriptors for TCP too.
MAX_SESSIONS = 16384
QUEUE_FRAMES = 2048
QUEUE_ANSWERS = 2048


class SessionCount:
    """The agent's UDP sessions on all ``DatagramSessions`` streams, against ``MAX_SESSIONS``."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give(self) -> None:
        self.open -= 1


class _Outbox:
    """Frames for the client from every session of one stream, in order, bounded per session
    and in total; ``opened`` / ``refused`` (not counted) always fit, ``answers`` says how many wait."""

    def __init__(self) -> None:
        self._frames: deque[tuple[rpc.UdpServerFrame, bool]] = deque()  # (frame, counted)
        self._waiting: dict[int, int] = {}  # session -> counted frames queued
        self._counted = 0
        self.answers = 0  # frames not counted (answers to open) waiting
        self._ready = asyncio.Event()

    def put(self, frame: rpc.UdpServerFrame, counted: bool = True) -> bool:
        if counted:
            waiting = self._waiting.get(frame.session, 0)
            if waiting >= QUEUE_DATAGRAMS or self._counted >= QUEUE_FRAMES:
                return False
            self._waiting[frame.session] = waiting + 1
            self._counted += 1
        else:
            self.answers += 1
        self._frames.append((frame, counted))
        self._ready.set()
        return True

    async def take(self) -> list[rpc.UdpServerFrame]:
        """The frames waiting now (at least one; at most one message's worth)."""
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        first = self._next()
        assert first is not None
        return batching.gather(first, self._next)

    def _next(self) -> rpc.UdpServerFrame | None:
        if not self._frames:
            return None
        frame, counted = self._frames.popleft()
        if counted:
            self._counted -= 1
            left = self._waiting[frame.session] - 1
            if left:
                self._waiting[frame.session] = left
            else:
                del self._waiting[frame.session]
        else:
            self.answers -= 1
        return frame


class _SessionSink:
    """One session's share of the outbox (what its ``AgentSocket`` and ``PortZero`` put to)."""

    def __init__(self, outbox: _Outbox, session: int) -> None:
        self._outbox = outbox
        self._session = session

    def put_nowait(self, item: rpc.UdpServerFrame) -> None:
        item.session = self._session
        if not self._outbox.put(item):
            raise asyncio.QueueFull


@dataclass
class _Session:
    family: int
    socket: AgentSocket
    port_zero: PortZero

    def close(self) -> None:
        self.socket.close()
        self.port_zero.close()


class UdpSessions:
    def __init__(self, context: rpc.UdpContext, count: SessionCount) -> None:
        self._context = context
        self._count = count
        self._sessions: dict[int, _Session] = {}
        self._outbox = _Outbox()
        self.dropped_in = 0
        self.dropped_out = 0
        self.dropped_unknown = 0  # datagrams for sessions refused or closed already

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_back())
        try:
            while (message := await read_client_frame(self._context)) is not None:
                for frame in batching.unpack(message):
                    await self._handle(frame)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            for number in list(self._sessions):
                self._close(number)
            if self.dropped_in or self.dropped_out or self.dropped_unknown:
                log.info(
                    "DatagramSessions stream from %s: dropped %d incoming, %d outgoing datagrams, "
                    "%d for sessions no longer open",
                    self._context.peer(),
                    self.dropped_in,
                    self.dropped_out,
                    self.dropped_unknown,
                )

    async def _protocol_error(self, message: str) -> NoReturn:
        await protocol_error(self._context, "DatagramSessions", message)

    async def _handle(self, frame: rpc.UdpClientFrame) -> None:
        kind = frame.WhichOneof("kind")
        number = frame.session
        if number == 0:
            await self._protocol_error(f"{kind!r} frame without a session")
        if kind == "open":
            await self._open(number, frame.open)
        elif kind == "datagram":
            await self._send(number, frame.datagram)
        elif kind == "close":
            self._close(number)
        else:
            await self._protocol_error(f"unexpected {kind!r} frame in a session")

    async def _open(self, number: int, request: rpc.UdpOpen) -> None:
        if self._outbox.answers >= QUEUE_ANSWERS:
            message = f"{QUEUE_ANSWERS} answers to open frames not read yet"
            log.warning("DatagramSessions stream from %s: %s", self._context.peer(), message)
            await self._context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        if number in self._sessions:
            await self._protocol_error(f"session {number} is open already")
        family = codec.socket_family(request.family)
        if family is None:
            await self._protocol_error(f"unknown address family {request.family}")
        if len(self._sessions) >= MAX_SESSIONS_PER_STREAM:
            self._refuse(number, "EMFILE", f"too many UDP sessions on one stream ({MAX_SESSIONS_PER_STREAM})")
            return
        if not self._count.take():
            self._refuse(number, "EMFILE", f"too many UDP sessions in the agent ({self._count.limit})")
            return
        try:
            sock = bound_socket(family)
        except OSError as exc:
            self._count.give()
            self._refuse(number, codec.encode_failure(exc, "UDP socket"))
            return
        local = sock.getsockname()
        sink = _SessionSink(self._outbox, number)
        try:
            agent_socket = AgentSocket(sock, sink)
        except BaseException:
            sock.close()
            self._count.give()
            raise
        opened = rpc.UdpOpened(local=codec.encode_sockaddr(local))
        self._outbox.put(rpc.UdpServerFrame(opened=opened, session=number), counted=False)
        self._sessions[number] = _Session(family, agent_socket, PortZero(family, sink))

    def _refuse(self, number: int, errno: str | rpc.Failure, message: str = "") -> None:
        failure = errno if isinstance(errno, rpc.Failure) else rpc.Failure(errno_name=errno, message=message)
        self._outbox.put(rpc.UdpServerFrame(refused=failure, session=number), counted=False)

    async def _send(self, number: int, datagram: rpc.Datagram) -> None:
        session = self._sessions.get(number)
        if session is None:
            self.dropped_unknown += 1
            return
        try:
            dest = codec.decode_address(datagram.peer)
        except codec.AddressError as exc:
            await self._protocol_error(str(exc))
        outcome = send_datagram(session.socket, session.family, session.port_zero, dest, datagram.payload)
        if isinstance(outcome, rpc.Failure):
            if not self._outbox.put(rpc.UdpServerFrame(failure=outcome, session=number)):
                self.dropped_in += 1
        elif not outcome:
            self.dropped_out += 1

    def _close(self, number: int) -> None:
        session = self._sessions.pop(number, None)
        if session is None:
            return  # refused, or closed before: nothing to do
        session.close()
        self._count.give()
        self.dropped_in += session.socket.dropped_in
        self.dropped_out += session.socket.dropped_out

    async def _send_back(self) -> None:
        """Network → client, one write at a time; what waits together leaves as one message."""
        while True:
            await self._context.write(batching.pack_server(await self._outbox.take()))
