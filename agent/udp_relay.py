"""One ``Datagrams`` stream: one UDP socket on the agent for one UDP socket of the program.

The client sends ``open{family}``, then ``datagram{peer=destination}`` frames; the
agent answers ``opened{local}``, then ``datagram{peer=source}`` for every datagram
its socket receives, ``peer_failure{peer, failure}`` for an ICMP error about a
datagram sent to ``peer`` (a port unreachable is ECONNREFUSED), and ``failure`` for
errors that name no peer. Datagrams waiting together travel as one ``batch`` frame
(batching.py): the client sends batches when the handshake said the agent accepts
them, the agent when the client's ``open`` said so. Errors never end the stream: a UDP socket survives them too.

Bounded like a socket buffer: received datagrams wait in a queue of fixed size for
the gRPC side; when it is full they are dropped and counted. Outgoing datagrams are
dropped when the kernel send buffer is full (the transport's own buffer is kept
small), which is what a non-blocking sendto with a full buffer amounts to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol

import grpc

from . import rpc
from .batching import gather
from .errnames import describe, errno_name
from .rpc import IPAddress

log = logging.getLogger("ktrace_agent")

QUEUE_DATAGRAMS = 512
MAX_DATAGRAM = 65536
DRAIN_PER_WAKEUP = 63  # datagrams read after the one asyncio read (bounds one wake-up's work)
SEND_BUFFER_LIMIT = 1024 * 1024
PORT_ZERO_SOCKETS = 16  # per stream: peers whose port 0 it sent to lately
PORT_ZERO_LINGER_S = 30.0


# Linux reports ICMP errors on an *unconnected* UDP socket only with IP_RECVERR /
# IPV6_RECVERR (include/uapi/linux/in.h: 11, in6.h: 25). They then also land on the
# socket's error queue, which must be drained: it is charged to the receive buffer
# and keeps epoll reporting EPOLLERR, which would spin the event loop.
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)


def enable_icmp_errors(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)


def bound_socket(family: int) -> socket.socket:
    """A new UDP socket of the agent, bound to a random port of the kernel's choosing (RFC
    5452: a resolver's every socket gets a fresh one), with ICMP errors enabled."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # Bind now rather than on first send so `opened` can tell the source port.
        sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))  # noqa: S104
        enable_icmp_errors(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def extended_errno(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """ee_errno of the ``struct sock_extended_err`` (linux/errqueue.h: u32 ee_errno first)
    in the control messages of an error-queue read."""
    for level, kind, data in ancdata:
        if (level, kind) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)) and len(data) >= 4:
            value: int = struct.unpack_from("=I", data)[0]
            return value
    return None


def drain_error_queue(sock: socket.socket, limit: int = 64) -> list[tuple[tuple[Any, ...], int]]:
    """Read the socket's error queue: (original destination, errno) for each ICMP error."""
    found: list[tuple[tuple[Any, ...], int]] = []
    for _ in range(limit):
        try:
            _data, ancdata, _flags, address = sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
        except OSError:
            break  # EAGAIN: empty
        err = extended_errno(ancdata)
        if address and err:
            found.append((address, err))
    return found


class FrameSink(Protocol):
    """Where a socket's frames for the client wait: ``put_nowait`` raises ``asyncio.QueueFull``
    when full (an ``asyncio.Queue``, or one session's share of a multiplexed stream's)."""

    def put_nowait(self, item: rpc.UdpServerFrame) -> None: ...


class AgentSocket(asyncio.DatagramProtocol):
    """One UDP socket of the agent: what it receives, and its errors, go to ``queue``."""

    def __init__(self, queue: FrameSink, sock: socket.socket) -> None:
        self.queue = queue
        self.sock = sock
        self.dropped_in = 0

    def _put(self, frame: rpc.UdpServerFrame) -> None:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.dropped_in += 1

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._put_datagram(data, addr)
        # asyncio's transport reads one datagram per wake-up, and the writer (_send_back) runs
        # before the next read: a resolver's A and AAAA answers, arriving together, would go
        # as two frames (two gRPC writes here, two reads in ktrace). Read what else is queued
        # now, so they meet in the queue and leave as one batch. Errors are the transport's
        # usual path (IP_RECVERR: an ICMP error reads as an exception).
        for _ in range(DRAIN_PER_WAKEUP):
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
                return
            self._put_datagram(data, addr)

    def _put_datagram(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        host, port = str(addr[0]), int(addr[1])
        self._put(rpc.UdpServerFrame(datagram=rpc.Datagram(peer=rpc.encode_address(host, port), payload=data)))

    def error_received(self, exc: Exception) -> None:
        # With IP_RECVERR the error queue says which destination the error is about
        # (its msg_name is the original destination), so the client can give it to
        # the program socket that talks to that peer.
        errors = drain_error_queue(self.sock)
        for (host, port, *_rest), err in errors:
            exc_for_peer = OSError(err, os.strerror(err))
            failure = rpc.Failure(errno_name=errno_name(exc_for_peer), message=describe(exc_for_peer))
            peer = rpc.encode_address(str(host), int(port))
            self._put(rpc.UdpServerFrame(peer_failure=rpc.PeerFailure(peer=peer, failure=failure)))
        if not errors:
            self._put(rpc.UdpServerFrame(failure=rpc.Failure(errno_name=errno_name(exc), message=describe(exc))))


class PortZero:
    """Datagrams to port 0 of a peer. Linux refuses ``sendto()`` to port 0 (EINVAL), yet a
    socket *connected* to port 0 sends, and the peer's port unreachable then makes a program's
    socket connected there fail with ECONNREFUSED. A program under ktrace (connected through
    ktrace's sink, see ktrace/tunnel/udp_relay.py) must see the same, so such datagrams leave
    from a socket of their own connected to the peer's port 0, one per peer, closed after a
    while. glibc connects to port 0 to sort addresses (RFC 6724) but never sends: this path is
    rare and bounded."""

    def __init__(self, family: int, queue: FrameSink) -> None:
        self._family = family
        self._queue = queue
        self._sockets: dict[IPAddress, tuple[socket.socket, asyncio.TimerHandle]] = {}

    def send(self, ip: IPAddress, payload: bytes) -> bool:
        """Send ``payload`` to port 0 of ``ip``; False when it had to be dropped."""
        loop = asyncio.get_running_loop()
        entry = self._sockets.get(ip)
        if entry is None:
            if len(self._sockets) >= PORT_ZERO_SOCKETS:
                return False
            sock = socket.socket(self._family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect(rpc.sockaddr_for(ip, 0, self._family))
            except OSError as exc:
                sock.close()
                self._failed(ip, exc)
                return True
            loop.add_reader(sock.fileno(), self._readable, ip, sock)
        else:
            sock, timer = entry
            timer.cancel()
        self._sockets[ip] = (sock, loop.call_later(PORT_ZERO_LINGER_S, self._close, ip))
        try:
            sock.send(payload)
        except BlockingIOError:
            return False
        except OSError as exc:  # an earlier datagram's port unreachable surfaces here too
            self._failed(ip, exc)
        return True

    def _readable(self, ip: IPAddress, sock: socket.socket) -> None:
        try:
            sock.recv(1)  # nothing can answer from port 0; an error is what wakes this
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._failed(ip, exc)

    def _failed(self, ip: IPAddress, exc: OSError) -> None:
        failure = rpc.Failure(errno_name=errno_name(exc), message=describe(exc))
        frame = rpc.UdpServerFrame(peer_failure=rpc.PeerFailure(peer=rpc.encode_address(ip, 0), failure=failure))
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(frame)

    def _close(self, ip: IPAddress) -> None:
        entry = self._sockets.pop(ip, None)
        if entry is not None:
            sock, timer = entry
            timer.cancel()
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def close(self) -> None:
        for ip in list(self._sockets):
            self._close(ip)


class DatagramSender(Protocol):
    """What ``send_datagram`` sends through: an asyncio datagram transport, or udp_mux's own."""

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...


def send_datagram(
    transport: DatagramSender, family: int, port_zero: PortZero, ip: IPAddress, port: int, payload: bytes
) -> bool | rpc.Failure:
    """Send one datagram of the client's from the socket of ``transport``: True, False when it
    had to be dropped (buffer full), or the failure to tell the client (a wrong family)."""
    if family == socket.AF_INET and ip.version == 6:
        return rpc.Failure(errno_name="EAFNOSUPPORT", message=f"IPv6 destination {ip} on an IPv4 socket")
    if port == 0:
        return port_zero.send(ip, payload)
    if _buffered(transport) >= SEND_BUFFER_LIMIT:
        return False
    transport.sendto(payload, rpc.sockaddr_for(ip, port, family))
    return True


def _buffered(transport: DatagramSender) -> int:
    """Bytes the transport holds because the kernel buffer was full (selector transports expose it)."""
    size = getattr(transport, "get_write_buffer_size", None)
    return int(size()) if callable(size) else 0


async def read_client_frame(context: rpc.UdpContext) -> rpc.UdpClientFrame | None:
    """The client's next frame on a ``Datagrams`` or ``DatagramSessions`` stream; None at its end."""
    msg: object = await context.read()
    if msg is grpc.aio.EOF:
        return None
    assert isinstance(msg, rpc.UdpClientFrame)
    return msg


async def protocol_error(context: rpc.UdpContext, stream: str, message: str) -> NoReturn:
    """End this stream (only) with INVALID_ARGUMENT: the client broke the protocol."""
    log.warning("%s stream from %s: protocol error: %s", stream, context.peer(), message)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class UdpRelay:
    def __init__(self, context: rpc.UdpContext) -> None:
        self._context = context
        self.dropped_out = 0
        self._port_zero: PortZero | None = None

    async def run(self) -> None:
        first = await read_client_frame(self._context)
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            await self._protocol_error(f"first frame must be 'open', got {first.WhichOneof('kind')!r}")
        if first.open.family == rpc.FAMILY_INET:
            family = socket.AF_INET
        elif first.open.family == rpc.FAMILY_INET6:
            family = socket.AF_INET6
        else:
            await self._protocol_error(f"unknown address family {first.open.family}")
        try:
            sock = bound_socket(family)
        except OSError as exc:
            failure = rpc.Failure(errno_name=errno_name(exc), message=f"UDP socket: {describe(exc)}")
            await self._context.write(rpc.UdpServerFrame(failure=failure))
            return
        queue: asyncio.Queue[rpc.UdpServerFrame] = asyncio.Queue(QUEUE_DATAGRAMS)
        # `opened` is the first frame the one writer (_send_back) sends; datagrams the client
        # sent right behind its open frame are forwarded meanwhile, not one write later.
        host, port = sock.getsockname()[:2]
        queue.put_nowait(rpc.UdpServerFrame(opened=rpc.UdpOpened(local=rpc.encode_address(host, port))))
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: AgentSocket(queue, sock), sock=sock)
        self._port_zero = PortZero(family, queue)
        try:
            sender = asyncio.create_task(self._send_back(queue, first.open.batches))
            try:
                await self._forward(transport, family, queue)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        finally:
            transport.close()
            self._port_zero.close()
            if protocol.dropped_in or self.dropped_out:
                log.info(
                    "Datagrams stream from %s: dropped %d incoming, %d outgoing datagrams",
                    self._context.peer(),
                    protocol.dropped_in,
                    self.dropped_out,
                )

    async def _protocol_error(self, message: str) -> NoReturn:
        await protocol_error(self._context, "Datagrams", message)

    async def _forward(
        self, transport: asyncio.DatagramTransport, family: int, replies: asyncio.Queue[rpc.UdpServerFrame]
    ) -> None:
        """Client → network, until the client closes its side."""
        while (frame := await read_client_frame(self._context)) is not None:
            kind = frame.WhichOneof("kind")
            if kind == "datagram":
                await self._send(transport, family, replies, frame.datagram)
            elif kind == "batch":
                for datagram in frame.batch.datagrams:
                    await self._send(transport, family, replies, datagram)
            else:
                await self._protocol_error(f"unexpected {kind!r} frame after open")

    async def _send(
        self,
        transport: asyncio.DatagramTransport,
        family: int,
        replies: asyncio.Queue[rpc.UdpServerFrame],
        datagram: rpc.Datagram,
    ) -> None:
        try:
            ip, port = rpc.decode_address(datagram.peer)
        except rpc.AddressError as exc:
            await self._protocol_error(str(exc))
        assert self._port_zero is not None
        outcome = send_datagram(transport, family, self._port_zero, ip, port, datagram.payload)
        if isinstance(outcome, rpc.Failure):
            await replies.put(rpc.UdpServerFrame(failure=outcome))  # through the one writer
        elif not outcome:
            self.dropped_out += 1

    async def _send_back(self, queue: asyncio.Queue[rpc.UdpServerFrame], batches: bool) -> None:
        """Network → client, one write at a time (the queue absorbs bursts, then drops);
        with ``batches``, the datagrams waiting together go as one frame."""
        while True:
            frame = await queue.get()
            for out in gather(frame, queue, _batch) if batches else (frame,):
                await self._context.write(out)


def _batch(datagrams: Sequence[rpc.Datagram]) -> rpc.UdpServerFrame:
    return rpc.UdpServerFrame(batch=rpc.DatagramBatch(datagrams=datagrams))
