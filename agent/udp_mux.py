"""One ``DatagramSessions`` stream: many UDP sockets of the program, one agent socket each.

A ``Datagrams`` stream (udp_relay.py) carries one session: every program socket (every
glibc lookup opens one) then costs a stream start (HTTP/2 headers both ways, the auth check,
the handler's start) and a stream end in both processes. Here one long-lived stream carries
many sessions; every frame names its session (``session``, never 0), and each session still
gets an agent socket of its own with a fresh random source port (RFC 5452; what a pod's
resolver does per lookup).

Client → agent: ``open{family}`` (the session's socket is made; ``opened{local}`` answers,
or ``refused{failure}`` when no socket could be made or a cap is reached: that session
is over, the others go on), ``datagram`` / ``batch`` (to a session refused or closed
already: dropped and counted, as a closed socket's would be), ``close`` (the socket is
closed). Agent → client: ``opened`` / ``refused``, then ``datagram``, ``failure``,
``peer_failure`` as on a ``Datagrams`` stream. Either side sends the frames waiting
together as one ``frames`` message (gRPC's cost is per message; a resolver's A and AAAA
answers, another session's ``opened``, all leave together).

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
import socket
from collections import deque
from dataclasses import dataclass
from typing import NoReturn

import grpc

from . import rpc
from .batching import MAX_BATCH_BYTES, MAX_BATCH_DATAGRAMS
from .errnames import describe, errno_name
from .udp_relay import (
    MAX_DATAGRAM,
    QUEUE_DATAGRAMS,
    AgentSocket,
    PortZero,
    bound_socket,
    protocol_error,
    read_client_frame,
    send_datagram,
)

log = logging.getLogger("ktrace_agent")

# A program's sockets stay open sessions until ktrace sees them closed (its sweep runs after
# every 512 new program sockets, or every 30 s): a program looking names up in a loop has
# hundreds at once. The agent-wide cap keeps its descriptors for TCP too.
MAX_SESSIONS_PER_STREAM = 1024
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
        taken: list[rpc.UdpServerFrame] = []
        size = 0
        while self._frames and len(taken) < MAX_BATCH_DATAGRAMS and size < MAX_BATCH_BYTES:
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
            taken.append(frame)
            size += len(frame.datagram.payload)
        return taken


class _SessionSink:
    """One session's share of the outbox (what its ``AgentSocket`` and ``PortZero`` put to)."""

    def __init__(self, outbox: _Outbox, session: int) -> None:
        self._outbox = outbox
        self._session = session

    def put_nowait(self, item: rpc.UdpServerFrame) -> None:
        item.session = self._session
        if not self._outbox.put(item):
            raise asyncio.QueueFull


class _SessionSocket:
    """A session's agent socket, read and written without an asyncio transport: making one takes
    no loop turn (``create_datagram_endpoint`` awaits one), so the ``open`` frames of one
    message are all answered before the writer runs, in one message, and a session costs less.
    Behaves as the transport did: what the socket receives, and its errors (a send's too), go
    to the ``AgentSocket``; a send that finds the kernel buffer full is dropped and counted."""

    def __init__(self, sock: socket.socket, protocol: AgentSocket) -> None:
        self._sock = sock
        self._protocol = protocol
        self.dropped_out = 0
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, addr = self._sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # IP_RECVERR: an ICMP error reads as one
            self._protocol.error_received(exc)
            return
        self._protocol.datagram_received(data, addr)  # reads what else is queued, too

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped_out += 1
        except OSError as exc:
            self._protocol.error_received(exc)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()


@dataclass
class _Session:
    family: int
    socket: _SessionSocket
    protocol: AgentSocket
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
                if message.WhichOneof("kind") == "frames":
                    for frame in message.frames.frames:
                        await self._handle(frame)
                else:
                    await self._handle(message)
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
        elif kind == "batch":
            for datagram in frame.batch.datagrams:
                await self._send(number, datagram)
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
        if request.family == rpc.FAMILY_INET:
            family = socket.AF_INET
        elif request.family == rpc.FAMILY_INET6:
            family = socket.AF_INET6
        else:
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
            self._refuse(number, errno_name(exc), f"UDP socket: {describe(exc)}")
            return
        host, port = sock.getsockname()[:2]
        sink = _SessionSink(self._outbox, number)
        protocol = AgentSocket(sink, sock)
        try:
            session_socket = _SessionSocket(sock, protocol)
        except BaseException:
            sock.close()
            self._count.give()
            raise
        opened = rpc.UdpOpened(local=rpc.encode_address(host, port))
        self._outbox.put(rpc.UdpServerFrame(opened=opened, session=number), counted=False)
        self._sessions[number] = _Session(family, session_socket, protocol, PortZero(family, sink))

    def _refuse(self, number: int, errno: str, message: str) -> None:
        failure = rpc.Failure(errno_name=errno, message=message)
        self._outbox.put(rpc.UdpServerFrame(refused=failure, session=number), counted=False)

    async def _send(self, number: int, datagram: rpc.Datagram) -> None:
        session = self._sessions.get(number)
        if session is None:
            self.dropped_unknown += 1
            return
        try:
            ip, port = rpc.decode_address(datagram.peer)
        except rpc.AddressError as exc:
            await self._protocol_error(str(exc))
        outcome = send_datagram(session.socket, session.family, session.port_zero, ip, port, datagram.payload)
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
        self.dropped_in += session.protocol.dropped_in
        self.dropped_out += session.socket.dropped_out

    async def _send_back(self) -> None:
        """Network → client, one write at a time; what waits together leaves as one message."""
        while True:
            frames = await self._outbox.take()
            if len(frames) == 1:
                await self._context.write(frames[0])
            else:
                await self._context.write(rpc.UdpServerFrame(frames=rpc.UdpServerFrames(frames=frames)))
