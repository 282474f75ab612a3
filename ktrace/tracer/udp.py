"""UDP through the agent, and faithful sources on the way back.

Outgoing: a datagram for a remote peer is delivered to the loopback relay that
ktrace keeps for (this program socket, that peer); the relay forwards it
through the socket's UDP session in the agent. A connected UDP socket is simply
connected to its relay, so plain send()/write() need no stop at all. For an
unconnected sendto/sendmsg/sendmmsg ktrace sends the payload itself, from its
duplicate of the program's socket (so the source port is the program's own),
and completes the syscall with the byte count: the program's memory is never
edited.

Incoming (`udp_receive.py`): the relay sends the reply to the program's socket,
so it arrives from 127.0.0.1:<relay port>; ktrace shows the program the remote
peer the relay stands for instead (musl and glibc drop DNS answers whose source
is not the server they asked).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ktrace_agent.wire.values import MAX_DATAGRAM, Endpoint

from ktrace.tracer import decide, linux, msghdr, sockaddr, sockops
from ktrace.tracer.decide import AgentSources, Route, RoutingPolicy, SocketInfo
from ktrace.tracer.ports import RelayTable
from ktrace.tracer.sockaddr import InetAddr
from ktrace.tracer.sockets import SocketTable, UdpRecord
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import Complete, Deferred, Outcome, Tracee, TraceeGone

log = logging.getLogger("ktrace.udp")


@dataclass(frozen=True)
class Outgoing:
    """The messages of one sendto/sendmsg/sendmmsg as read from the program's memory, once:
    the tracer decides from their destinations and the redirector sends from the same copy
    (another thread of the program may rewrite a destination meanwhile)."""

    headers: tuple[msghdr.MsgHdr, ...]  # sendmsg: one; sendmmsg: one a message; sendto: none
    # One a message: None for no destination, a malformed one (the kernel's EINVAL) or an
    # unreadable one (the kernel's EFAULT).
    destinations: tuple[sockaddr.Decoded | None, ...]
    # One a message: the name's bytes as the program passed them (at most a sockaddr_storage);
    # None for no name (or a length of 0, which the kernel takes for none) or an unreadable one.
    names: tuple[bytes | None, ...]
    unreadable: int | None = None  # the first message whose destination could not be read


def read_outgoing(t: Tracee) -> Outgoing:
    """The messages of the sendto/sendmsg/sendmmsg ``t`` and where they go; raises OSError or
    ValueError when the message headers themselves cannot be read."""
    headers: tuple[msghdr.MsgHdr, ...] = ()
    if t.syscall == "sendto":
        names = [(t.arg(4), t.arg(5) & 0xFFFFFFFF)]
    else:
        count = 1 if t.syscall == "sendmsg" else min(t.arg(2) & 0xFFFFFFFF, msghdr.IOV_MAX)
        size = msghdr.MSGHDR_SIZE if t.syscall == "sendmsg" else msghdr.MMSGHDR_SIZE
        raw = t.read(t.arg(1), count * size)
        headers = tuple(msghdr.decode_msghdr(raw[i * size : i * size + msghdr.MSGHDR_SIZE]) for i in range(count))
        names = [(h.name, h.namelen) for h in headers]
    destinations: list[sockaddr.Decoded | None] = []
    raw_names: list[bytes | None] = []
    unreadable: int | None = None
    for index, (pointer, length) in enumerate(names):
        raw_name: bytes | None = None
        if pointer:
            try:
                raw_name = t.read(pointer, min(length, sockaddr.MAX_SOCKADDR_LEN))
            except TraceeGone:
                raise
            except OSError:
                if unreadable is None:
                    unreadable = index
        destinations.append(sockaddr.decode(raw_name) if raw_name is not None else None)
        raw_names.append(raw_name or None)
    return Outgoing(headers, tuple(destinations), tuple(raw_names), unreadable)


@dataclass(frozen=True)
class UdpEvent:
    pid: int
    dest: Endpoint
    kind: str  # "connect" | "send"
    sock: int = 0  # the program socket's inode (the relays' key)


@dataclass
class UdpRedirector:
    relays: RelayTable
    policy: RoutingPolicy
    on_event: Callable[[UdpEvent], None] | None = None
    table: SocketTable = field(default_factory=SocketTable)  # shared with tcp.py: one record a socket
    threads: ThreadGroups = field(default_factory=ThreadGroups)
    # The agent's source address per IP version (its handshake): what getsockname() shows.
    sources: AgentSources = field(default_factory=AgentSources)
    # A descriptor of a process's, outside any stop (process id, fd) -> ktrace's duplicate.
    duplicate: Callable[[int, int], int] = field(default=lambda pid, fd: linux.duplicate_fd(pid, fd, lambda t: t))

    # -- connect ---------------------------------------------------------------------

    def connect(
        self, t: Tracee, fd: int, sock: socket.socket, info: SocketInfo, raw: bytes, addr: sockaddr.Decoded | None
    ) -> Outcome:
        """connect() on a UDP socket: to a remote peer means to its relay; anything else is the
        kernel's connect() of ktrace's copy of the address (AF_UNSPEC disconnects)."""
        dest = self._remote(info, addr)
        if dest is None:
            err = sockops.connect(sock.fileno(), raw)
            known = self.table.udp(info.inode)
            if known is not None and not err:
                known.disconnected()  # a connect the kernel refuses keeps the socket's peer
            return Complete(-err)
        assert isinstance(addr, InetAddr)  # _remote found an IP destination in it
        unreachable = decide.udp_no_route(dest, self.sources)
        if unreachable is not None:
            # The agent has no route of this IP version (an IPv4-only pod): its kernel would
            # refuse this connect(), before any relay or sink is involved.
            return Complete(-unreachable)
        if dest.port == 0:
            # glibc connects a socket to port 0 of every address it sorts (RFC 6724), only to
            # read its source address: no relay (nor, later, an agent session) for that.
            err = sock.connect_ex(self.relays.sink_for(info.family))
        else:
            err = sock.connect_ex(self.relays.relay_for(info.inode, info.family, dest))
        if err:
            return Complete(-err)
        own_port = sock.getsockname()[1]
        if dest.port == 0:
            self.relays.connected_to_sink(info.inode, info.family, dest, own_port)
        record = self.table.udp_record(info.inode, info.family)
        record.peer, record.own_port, record.where = addr, own_port, (t.process, fd)
        self._note(t.tid, dest, "connect", record)
        return Complete(0)

    # -- sending -----------------------------------------------------------------------

    def _remote(self, info: SocketInfo, addr: sockaddr.Decoded | None) -> Endpoint | None:
        if not isinstance(addr, InetAddr) or addr.family != info.family:
            return None
        dest = addr.endpoint
        if self.policy.route(dest, "udp") is Route.LOCAL:
            return None
        return dest

    def send(self, t: Tracee, sock: socket.socket, info: SocketInfo, outgoing: Outgoing) -> Outcome:
        """sendto/sendmsg/sendmmsg on a UDP (or ICMP, raw, UDP-Lite) socket, performed by ktrace
        from what it read: to the relay of a remote peer, else to the program's own destination
        bytes (or its connected peer), with its control messages, as the kernel would."""
        messages: list[tuple[bytes, bytes] | int] = []  # (payload, control), or -errno reading it
        if outgoing.unreadable == 0:
            # The kernel copies a destination before anything else: EFAULT, sent nowhere (not to
            # the socket's connected peer, as a send without one would be).
            return Complete(-errno.EFAULT)
        if t.syscall == "sendto":
            flags, length = t.arg(3) & 0xFFFFFFFF, t.arg(2)
            try:
                messages.append((t.read(t.arg(1), min(length, MAX_DATAGRAM)), b""))
            except TraceeGone:
                raise
            except OSError:
                return Complete(-errno.EFAULT)
            if length > MAX_DATAGRAM:
                return Complete(-errno.EMSGSIZE)
        else:
            flags = (t.arg(2) if t.syscall == "sendmsg" else t.arg(3)) & 0xFFFFFFFF
            for index, hdr in enumerate(outgoing.headers):
                if index == outgoing.unreadable:
                    # sendmmsg: the kernel stops at this message; those before it are sent.
                    messages.append(-errno.EFAULT)
                    break
                try:
                    messages.append(sockops.gather(t.read, hdr, MAX_DATAGRAM))
                except TraceeGone:
                    raise
                except OverflowError:
                    messages.append(-errno.EMSGSIZE)
                except ValueError:
                    # More iovecs than UIO_MAXIOV: the kernel's __copy_msghdr says EMSGSIZE.
                    messages.append(-errno.EMSGSIZE)
                except OSError:
                    messages.append(-errno.EFAULT)

        def attempt(fd: int) -> list[int]:
            results: list[int] = []
            for index, message in enumerate(messages):
                result = (
                    message
                    if isinstance(message, int)
                    else self._message(t.tid, fd, info, message, outgoing, index, flags)
                )
                results.append(result)
                if result < 0:
                    break
            return results

        if not messages:
            return Complete(0)  # sendmmsg() of no message
        results = attempt(sock.fileno())
        if results[0] == -errno.EAGAIN and not flags & MSG_DONTWAIT and not sockops.nonblocking(sock.fileno()):
            # A full send buffer on a blocking socket: the kernel would wait for room. Rare for
            # UDP (and never towards a relay, which reads at once): ktrace waits, then sends, on a
            # descriptor of its own (the caller closes ``sock`` when this returns).
            own = socket.socket(fileno=os.dup(sock.fileno()))
            return Deferred(self._when_writable(t, own, attempt))
        return self._complete(t, results)

    def _complete(self, t: Tracee, results: list[int]) -> Complete:
        sent = [result for result in results if result >= 0]
        if t.syscall != "sendmmsg" or not sent:
            return Complete(results[0] if t.syscall != "sendmmsg" or not sent else len(sent))
        base = t.arg(1)
        parts = [
            (base + index * msghdr.MMSGHDR_SIZE + msghdr.MSG_LEN_OFFSET, struct.pack("=I", result))
            for index, result in enumerate(sent)
        ]
        try:
            t.write(parts)
        except OSError:
            return Complete(-errno.EFAULT)
        return Complete(len(sent))

    async def _when_writable(self, t: Tracee, own: socket.socket, attempt: Callable[[int], list[int]]) -> Complete:
        loop = asyncio.get_running_loop()
        with own:
            while True:
                await _writable(loop, own)
                results = attempt(own.fileno())
                if results[0] != -errno.EAGAIN:
                    return self._complete(t, results)

    def _message(
        self,
        tid: int,
        fd: int,
        info: SocketInfo,
        message: tuple[bytes, bytes],
        outgoing: Outgoing,
        index: int,
        flags: int,
    ) -> int:
        (payload, control), addr, name = message, outgoing.destinations[index], outgoing.names[index]
        if not info.is_udp:
            if isinstance(addr, InetAddr):
                decision = decide.decide_uncarried(addr, info, self.policy)
                if isinstance(decision, decide.Unsupported):
                    warn_unsupported(decision)
                    return -errno.ENETUNREACH
            return sockops.send(fd, payload, name, control, flags | MSG_DONTWAIT)
        dest = self._remote(info, addr)
        if dest is None:
            # Not for the cluster (a local destination, one the kernel refuses, or none: the
            # connected peer, a relay when ktrace connected it): the kernel's send of these bytes.
            return sockops.send(fd, payload, name, control, flags | MSG_DONTWAIT)
        unreachable = decide.udp_no_route(dest, self.sources)
        if unreachable is not None:
            return -unreachable
        host, port = self.relays.relay_for(info.inode, info.family, dest)
        self._note(tid, dest, "send", self.table.udp_record(info.inode, info.family))
        relay = sockaddr.encode(info.family, ipaddress.ip_address(host), port)
        return sockops.send(fd, payload, relay, b"", flags | MSG_DONTWAIT)

    def forget(self, inode: int) -> None:
        """The program's socket ``inode`` is gone (found by the relays' sweep)."""
        if self.table.udp(inode) is not None:
            self.table.forget(inode)

    def family_of(self, inode: int) -> int | None:
        """The family of a program socket with relays (None: ktrace has not relayed it)."""
        record = self.table.udp(inode)
        return record.family if record is not None else None

    def connected_peer(self, inode: int) -> InetAddr | None:
        record = self.table.udp(inode)
        return record.peer if record is not None else None

    def peer_error(self, inode: int, peer: Endpoint, errno_name: str) -> None:
        """The agent got an ICMP error from ``peer`` for a datagram of socket ``inode``.

        Only a socket *connected* to that peer hears of it (as on Linux without
        IP_RECVERR), and only ECONNREFUSED can be reproduced locally (see
        ``UdpRelays.refuse``); other ICMP errors leave the program waiting, as if lost.
        """
        record = self.table.udp(inode)
        addr = record.peer if record is not None else None
        where = record.where if record is not None else None
        if errno_name != "ECONNREFUSED" or addr is None or addr.endpoint != peer or where is None:
            return
        tgid, fd = where
        try:
            dup = self.duplicate(tgid, fd)
        except (OSError, TraceeGone):  # the process or its descriptor is gone
            return
        with socket.socket(fileno=dup) as program:
            if os.fstat(program.fileno()).st_ino != inode:
                return  # the descriptor now names another file
            self.relays.refuse(inode, peer, program)

    def connected_to_port_zero(self, inode: int) -> bool:
        peer = self.connected_peer(inode)
        return peer is not None and peer.port == 0

    def peer_name(self, inode: int, family: int) -> bytes | None:
        peer = self.connected_peer(inode)
        if peer is None:
            return None
        return sockaddr.encode(family, peer.ip, peer.port)

    def sock_name(self, inode: int) -> bytes | None:
        """getsockname() of a socket ktrace connected to a relay or the sink: the agent's source
        address for the peer's IP version, as in a pod. The port is the one the peer sees (the
        agent socket's) when the agent has said it, else the program socket's own: a socket
        connected to port 0 has no agent socket of its own, and waiting for the agent's answer
        would cost every Go lookup a round trip (docs/architecture.md, "The resolver view and UDP").
        None: the kernel answers."""
        record = self.table.udp(inode)
        if record is None or record.peer is None or record.own_port is None:
            return None
        peer, family, own_port = record.peer, record.family, record.own_port
        route = self.sources.of(peer.endpoint)
        if route is None or route.source is None or sockaddr.is_loopback(peer.endpoint.ip):
            return None  # an older agent (nothing to show but the kernel's answer), or loopback

        def name(agent_port: int | None) -> bytes | None:
            snapshot = decide.UdpSocketName(family, peer, own_port, agent_port)
            return decide.udp_sock_name(snapshot, self.sources)

        if peer.port == 0:
            return name(None)
        return name(self.relays.agent_port(inode))

    def _note(self, tid: int, dest: Endpoint, kind: str, record: UdpRecord) -> None:
        """Once per (socket, destination): who uses it (the report names flows by process)."""
        if self.on_event is None or dest in record.seen:
            return
        record.seen.add(dest)
        self.on_event(UdpEvent(self.threads.of_or_self(tid), dest, kind, record.inode))


MSG_DONTWAIT = socket.MSG_DONTWAIT
_warned_protocols: set[tuple[int, int]] = set()


def warn_unsupported(decision: decide.Unsupported) -> None:
    key = (decision.type, decision.protocol)
    if key not in _warned_protocols:
        _warned_protocols.add(key)
        log.warning(
            "IP protocol %d (socket type %d) to %s fails with ENETUNREACH: ktrace carries only TCP and UDP "
            "to the cluster (hint: a --local rule sends such traffic from this machine instead)",
            decision.protocol,
            decision.type,
            decision.dest,
        )


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_writer(sock.fileno(), ready)
    try:
        await waiter
    finally:
        loop.remove_writer(sock.fileno())
