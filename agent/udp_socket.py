"""One UDP socket of the agent for one UDP socket of the program (a session of udp_mux.py).

The socket is bound to a random port of the kernel's choosing when the session opens (RFC 5452: a
resolver's every socket gets a fresh one), so its ``opened`` frame can tell the port. What it
receives becomes ``datagram{peer=source}`` frames; an ICMP error about a datagram it sent becomes
``peer_failure{peer, failure}`` (a port unreachable is ECONNREFUSED), other errors ``failure``.
Errors never end the session: a UDP socket survives them too.

Bounded like a socket buffer: frames for the client wait in the stream's outbox, which drops (and
counts) what does not fit; a datagram for the network that finds the kernel's send buffer full is
dropped and counted, which is what a non-blocking sendto amounts to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from typing import Any, NoReturn, Protocol

import grpc

from .wire import codec, rpc
from .wire.values import MAX_DATAGRAM, Endpoint, IPAddress

log = logging.getLogger("ktrace_agent")

QUEUE_DATAGRAMS = 512  # frames for the client waiting per session
READS_PER_WAKEUP = 64  # datagrams read when the socket is readable (bounds one wake-up's work)
PORT_ZERO_SOCKETS = 16  # per session: peers whose port 0 it sent to lately
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
    when full (one session's share of its stream's outbox)."""

    def put_nowait(self, item: rpc.UdpServerFrame) -> None: ...


class AgentSocket:
    """One UDP socket of the agent: what it receives, and its errors, go to ``sink``. Read and
    written without an asyncio transport: making one takes no loop turn (``create_datagram_endpoint``
    awaits one), so the ``open`` frames of one message are all answered before the writer runs, in
    one message, and a session costs less."""

    def __init__(self, sock: socket.socket, sink: FrameSink) -> None:
        self.sock = sock
        self._sink = sink
        self.dropped_in = 0
        self.dropped_out = 0
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _put(self, frame: rpc.UdpServerFrame) -> None:
        try:
            self._sink.put_nowait(frame)
        except asyncio.QueueFull:
            self.dropped_in += 1

    def _readable(self) -> None:
        # Everything queued now, not one datagram per wake-up: a resolver's A and AAAA answers
        # arrive together, and read together they meet in the outbox and leave as one message
        # (read one at a time, the writer would send the first alone). IP_RECVERR: an ICMP
        # error reads as an exception.
        for _ in range(READS_PER_WAKEUP):
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
                return
            self._put(rpc.UdpServerFrame(datagram=rpc.Datagram(peer=codec.encode_sockaddr(addr), payload=data)))

    def error_received(self, exc: Exception) -> None:
        # With IP_RECVERR the error queue says which destination the error is about
        # (its msg_name is the original destination), so the client can give it to
        # the program socket that talks to that peer.
        errors = drain_error_queue(self.sock)
        for address, err in errors:
            failure = codec.encode_failure(OSError(err, os.strerror(err)))
            peer = codec.encode_sockaddr(address)
            self._put(rpc.UdpServerFrame(peer_failure=rpc.PeerFailure(peer=peer, failure=failure)))
        if not errors:
            self._put(rpc.UdpServerFrame(failure=codec.encode_failure(exc)))

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped_out += 1
        except OSError as exc:
            self.error_received(exc)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


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
                sock.connect(codec.sockaddr_for(Endpoint(ip, 0), self._family))
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
        peer = codec.encode_address(Endpoint(ip, 0))
        frame = rpc.UdpServerFrame(peer_failure=rpc.PeerFailure(peer=peer, failure=codec.encode_failure(exc)))
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


def send_datagram(
    agent_socket: AgentSocket, family: int, port_zero: PortZero, dest: Endpoint, payload: bytes
) -> bool | rpc.Failure:
    """Send one datagram of the client's from ``agent_socket``: True, False when it had to be
    dropped, or the failure to tell the client (a wrong family)."""
    if family == socket.AF_INET and dest.ip.version == 6:
        return rpc.Failure(errno_name="EAFNOSUPPORT", message=f"IPv6 destination {dest.ip} on an IPv4 socket")
    if dest.port == 0:
        return port_zero.send(dest.ip, payload)
    agent_socket.sendto(payload, codec.sockaddr_for(dest, family))
    return True


async def read_client_frame(context: rpc.UdpContext) -> rpc.UdpClientFrame | None:
    """The client's next message on a ``DatagramSessions`` stream; None at its end."""
    msg: object = await context.read()
    if msg is grpc.aio.EOF:
        return None
    assert isinstance(msg, rpc.UdpClientFrame)
    return msg


async def protocol_error(context: rpc.UdpContext, stream: str, message: str) -> NoReturn:
    """End this stream (only) with INVALID_ARGUMENT: the client broke the protocol."""
    log.warning("%s stream from %s: protocol error: %s", stream, context.peer(), message)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
