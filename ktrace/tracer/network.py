"""Applies the decisions of `decide.py` to a stopped thread.

This is where a syscall snapshot is gathered (registers, the sockaddr bytes,
what the descriptor is) and where the answer is carried out: a redirected
connect() waits for the agent, connects ktrace's duplicate of the program's
socket to the loopback endpoint, and completes the program's syscall without
running it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ktrace.rules import RouteDecision
from ktrace.tracer import decide, sockaddr
from ktrace.tracer.decide import Passthrough, Redirected, RedirectTcp, RoutingPolicy, SocketInfo
from ktrace.tracer.ports import Dialled, TcpTunnel
from ktrace.tracer.sockaddr import InetAddr
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import Complete, Deferred, Memory, Outcome, Resume, Tracee, TraceeGone, WatchExit
from ktrace.tracer.udp import UdpRedirector, read_outgoing
from ktrace.tunnel.types import Endpoint, TunnelError

log = logging.getLogger("ktrace.network")

MSG_FASTOPEN = 0x20000000
BYPASS_RESOLVER_SOCKETS = frozenset(
    {
        b"/var/run/nscd/socket",
        b"/run/nscd/socket",
        b"/run/systemd/resolve/io.systemd.Resolve",
        b"/run/systemd/resolve/io.systemd.Resolve.Monitor",
    }
)


@dataclass(frozen=True)
class ConnectEvent:
    """One connect() the program made to an IP destination, and its outcome."""

    pid: int
    dest: Endpoint
    outcome: str  # "ok", "EINPROGRESS" or an errno name
    local: Endpoint | None = None  # the agent socket's address
    decision: RouteDecision | None = None  # the route and the rule that chose it
    duration: float | None = None  # seconds from the stop to the outcome
    wall: float | None = None  # time.time() when the outcome was known (None: when reported)


MAX_PENDING_LOCAL = 4096


@dataclass(frozen=True)
class _PendingLocal:
    tid: int  # the thread that connected
    dest: Endpoint
    route: RouteDecision
    started: float

    def event(self, outcome: str) -> ConnectEvent:
        return ConnectEvent(self.tid, self.dest, outcome, decision=self.route, duration=time.monotonic() - self.started)


@dataclass
class NetworkHandler:
    tunnel: TcpTunnel
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    connect_timeout: float | None = None
    on_event: Callable[[ConnectEvent], None] | None = None
    udp: UdpRedirector | None = None
    redirected: dict[int, Redirected] = field(default_factory=dict)
    _streams: dict[int, int] = field(default_factory=dict)  # id(dialled) -> inode
    _warned_no_descriptor: bool = False
    _warned_protocols: set[tuple[int, int]] = field(default_factory=set)
    # Non-blocking connect()s kept local, by socket inode, until the program learns
    # how they ended (getsockopt SO_ERROR, or connect() again): for the report only.
    _pending_local: dict[int, _PendingLocal] = field(default_factory=dict)
    threads: ThreadGroups = field(default_factory=ThreadGroups)

    # -- SyscallHandler ------------------------------------------------------------

    def on_connect(self, t: Tracee) -> Outcome:
        return self._connect(t)

    def on_so_error(self, t: Tracee) -> Outcome:
        return self._so_error(t)

    def on_names(self, t: Tracee) -> Outcome:
        if t.syscall == "getpeername":
            return self._name(t, decide.peer_name, peer=True)
        return self._name(t, decide.sock_name, peer=False)

    def on_receive(self, t: Tracee) -> Outcome:
        return self._receive(t) if self.udp is not None else Resume()

    def on_send(self, t: Tracee) -> Outcome:
        return self._send(t) if self.udp is not None else Resume()

    # -- UDP ------------------------------------------------------------------------------

    def _receive(self, t: Tracee) -> Outcome:
        assert self.udp is not None
        inode = t.inode(t.arg(0))
        family = self.udp.sockets.get(inode) if inode is not None else None
        if inode is None or family is None:
            return Resume()
        info = SocketInfo(family, socket.SOCK_DGRAM, inode)
        if t.syscall == "recvfrom":
            if not (t.arg(4) and t.arg(5) and decide.recvfrom_in_ktrace(t.arg(3) & 0xFFFFFFFF)):
                return self.udp.recvfrom(t, info)  # no source asked for, or the exit path
            try:
                dup = t.duplicate(t.arg(0))
            except OSError:
                return self.udp.recvfrom(t, info)  # the exit path needs no descriptor
            try:
                return self.udp.recvfrom(t, info, dup)
            finally:
                os.close(dup)
        if t.syscall == "recvmsg":
            return self.udp.recvmsg(t, info)
        return self.udp.recvmmsg(t, info)

    def _send(self, t: Tracee) -> Outcome:
        assert self.udp is not None
        try:
            outgoing = read_outgoing(t)
        except TraceeGone:
            raise
        except (OSError, ValueError):
            return Resume()  # unreadable arguments: the kernel reports EFAULT/EINVAL itself
        if not outgoing.names_ip:
            # Decided before duplicating the descriptor (two syscalls, then three more to
            # tell what the socket is): most sends name no IP destination (glibc's DNS
            # queries are a sendmmsg on a connected socket; a netlink request by sendmsg
            # names an AF_NETLINK address; by sendto it does not even stop, filter_rules),
            # and every branch below lets those run unchanged.
            return Resume()
        sock = self._socket(t, t.arg(0))
        if not isinstance(sock, socket.socket):
            return sock
        try:
            info = self._info(sock)
            if not info.is_ip:
                return Resume()
            if info.type == socket.SOCK_STREAM:
                if t.syscall == "sendto" and t.arg(3) & MSG_FASTOPEN:
                    return self._fast_open(t, sock, info, outgoing.destinations[0])
                return Resume()
            if not info.is_udp:
                return self._send_uncarried(outgoing.destinations, info)
            if t.syscall == "sendto":
                return self.udp.sendto(t, sock, info, outgoing)
            if t.syscall == "sendmsg":
                return self.udp.sendmsg(t, sock, info, outgoing)
            return self.udp.sendmmsg(t, sock, info, outgoing)
        finally:
            sock.close()

    def _send_uncarried(self, destinations: tuple[sockaddr.Decoded | None, ...], info: SocketInfo) -> Outcome:
        """A send with a destination on an ICMP, raw or UDP-Lite socket: fails for a remote one."""
        for addr in destinations:
            decision = decide.decide_uncarried(addr, info, self.policy)
            if isinstance(decision, decide.Unsupported):
                return self._unsupported(decision)
        return Resume()

    def _unsupported(self, decision: decide.Unsupported) -> Outcome:
        key = (decision.type, decision.protocol)
        if key not in self._warned_protocols:
            self._warned_protocols.add(key)
            log.warning(
                "IP protocol %d (socket type %d) to %s fails with ENETUNREACH: ktrace carries only TCP and UDP "
                "to the cluster (hint: a --local rule sends such traffic from this machine instead)",
                decision.protocol,
                decision.type,
                decision.dest,
            )
        return Complete(-errno.ENETUNREACH)

    def _fast_open(self, t: Tracee, sock: socket.socket, info: SocketInfo, addr: sockaddr.Decoded | None) -> Outcome:
        """sendto(MSG_FASTOPEN) on a TCP socket is connect() followed by send()."""
        try:
            payload = t.read(t.arg(1), min(t.arg(2), 1 << 20))
        except TraceeGone:
            raise
        except OSError:
            return Resume()
        decision = decide.decide_connect(addr, info, info.inode in self.redirected, self.policy)
        if isinstance(decision, decide.Unsupported):
            return self._unsupported(decision)
        if isinstance(decision, Passthrough):
            return Resume()
        kept = socket.socket(fileno=os.dup(sock.fileno()))
        return Deferred(self._redirect_tcp(t.tid, kept, info, decision, payload))

    def stream_closed(self, dialled: Dialled) -> None:
        inode = self._streams.pop(id(dialled), None)
        if inode is not None:
            self.redirected.pop(inode, None)

    # -- connect ----------------------------------------------------------------------

    def _connect(self, t: Tracee) -> Outcome:
        fd, addr_ptr, addr_len = t.arg(0), t.arg(1), t.arg(2) & 0xFFFFFFFF
        try:
            raw = t.read(addr_ptr, min(addr_len, sockaddr.MAX_SOCKADDR_LEN))
        except OSError:
            return Resume()  # the kernel reports EFAULT itself
        addr = sockaddr.decode(raw)
        if not isinstance(addr, sockaddr.InetAddr):
            if isinstance(addr, sockaddr.OtherFamily) and addr.family == sockaddr.AF_UNIX:
                return self._connect_unix(raw)
            if not (isinstance(addr, sockaddr.OtherFamily) and addr.family == sockaddr.AF_UNSPEC):
                return Resume()
        sock = self._socket(t, fd)
        if not isinstance(sock, socket.socket):
            return sock
        info = self._info(sock)
        if info.is_udp and self.udp is not None:
            try:
                return self.udp.connect(t, fd, sock, info, addr)
            finally:
                sock.close()
        decision = decide.decide_connect(addr, info, info.inode in self.redirected, self.policy)
        if isinstance(decision, decide.Unsupported):
            sock.close()
            return self._unsupported(decision)
        if isinstance(decision, Passthrough):
            sock.close()
            # Only destinations a user rule kept local are reported: loopback is the
            # program's own business, and watching it would add a stop to every such connect.
            route = decision.decision
            if route is not None and route.by_user_rule and self.on_event is not None and isinstance(addr, InetAddr):
                return self._watch_local(addr.endpoint, route, info.inode)
            return Resume()
        return Deferred(self._redirect_tcp(t.tid, sock, info, decision))

    def _watch_local(self, dest: Endpoint, route: RouteDecision, inode: int) -> Outcome:
        """A connect() that stays on this machine: report how the kernel answered it."""
        started = time.monotonic()
        pending = self._pending_local.get(inode)

        def at_exit(result: int, memory: Memory) -> None:
            if -516 <= result <= -512 or result == -errno.EALREADY:
                return  # ERESTART*: the restarted connect() stops again; EALREADY: still going
            if pending is not None:  # connect() again to learn the outcome
                self._pending_local.pop(inode, None)
                outcome = "ok" if result in (0, -errno.EISCONN) else errno.errorcode.get(-result, str(-result))
                self._emit(pending.event(outcome))
                return
            if result == -errno.EINPROGRESS:
                self._remember_local(inode, _PendingLocal(memory.tid, dest, route, started))
                return
            outcome = "ok" if result >= 0 else errno.errorcode.get(-result, str(-result))
            self._emit(ConnectEvent(memory.tid, dest, outcome, decision=route, duration=time.monotonic() - started))

        return WatchExit(at_exit)

    def _remember_local(self, inode: int, pending: _PendingLocal) -> None:
        if len(self._pending_local) >= MAX_PENDING_LOCAL:
            # A program that never asks how its connects ended: report the oldest as still pending.
            oldest = next(iter(self._pending_local))
            self._emit(self._pending_local.pop(oldest).event("EINPROGRESS"))
        self._pending_local[inode] = pending

    def _so_error(self, t: Tracee) -> Outcome:
        """getsockopt(SOL_SOCKET, SO_ERROR) (the filter stops only that): the outcome of a
        pending local connect, read at the exit from what the kernel wrote."""
        if not self._pending_local:
            return Resume()
        inode = t.inode(t.arg(0))
        if inode is None or inode not in self._pending_local:
            return Resume()
        value_ptr = t.arg(3)

        def at_exit(result: int, memory: Memory) -> None:
            if result != 0:
                return
            try:
                err = memory.read_int(value_ptr)
            except OSError:
                return
            pending = self._pending_local.pop(inode, None)
            if pending is not None:
                self._emit(pending.event("ok" if err == 0 else errno.errorcode.get(err, str(err))))

        return WatchExit(at_exit)

    def finish(self) -> None:
        """The program ended: local connects whose outcome it never asked for stay "EINPROGRESS"."""
        for pending in self._pending_local.values():
            self._emit(pending.event("EINPROGRESS"))
        self._pending_local.clear()

    def _connect_unix(self, raw: bytes) -> Outcome:
        """Local caching resolvers (nscd, systemd-resolved) would answer from
        this machine's view: refusing their sockets makes glibc ask the
        nameserver of the resolv.conf it reads, which is the cluster's."""
        path = raw[2:].split(b"\0", 1)[0]
        if path in BYPASS_RESOLVER_SOCKETS:
            return Complete(-errno.ECONNREFUSED)
        return Resume()

    async def _redirect_tcp(
        self, tid: int, sock: socket.socket, info: SocketInfo, decision: RedirectTcp, payload: bytes | None = None
    ) -> Complete:
        started = time.monotonic()
        route = decision.decision

        def reported(outcome: str, local: Endpoint | None = None) -> Callable[[], None]:
            """The report of this outcome, to run once the program is on its way (Complete.then)."""
            event = ConnectEvent(tid, decision.dest, outcome, local, route, time.monotonic() - started, time.time())
            return lambda: self._emit(event)

        try:
            try:
                stream = await self.tunnel.dial(decision.dest, self.connect_timeout)
            except TunnelError as exc:
                return Complete(-exc.errno, reported(exc.errno_name))
            host, port = self.tunnel.endpoint_address(info.family)
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                await stream.abort()
                return Complete(-err, reported(errno.errorcode.get(err, str(err))))
            source_port = sock.getsockname()[1]
            self.tunnel.expect(info.family, source_port, stream, decision.dest)
            self.redirected[info.inode] = Redirected(info.family, decision.original, stream.local)
            self._streams[id(stream)] = info.inode
            report = reported("ok", stream.local)
            if payload is not None:
                try:
                    return Complete(sock.send(payload), report)
                except OSError as exc:
                    return Complete(-(exc.errno or errno.EIO), report)
            return Complete(decide.connect_result(err), report)
        finally:
            sock.close()

    # -- getpeername / getsockname ------------------------------------------------------

    def _name(self, t: Tracee, render: Callable[[Redirected], bytes], *, peer: bool) -> Outcome:
        fd, name_ptr, len_ptr = t.arg(0), t.arg(1), t.arg(2)
        inode = t.inode(fd)
        if inode is None:
            return Resume()
        entry = self.redirected.get(inode)
        name: bytes | None = render(entry) if entry is not None else None
        if name is None and peer and self.udp is not None and inode in self.udp.sockets:
            if self.udp.connected_to_port_zero(inode):
                # Linux keeps such a socket "connected" (send works, the source is chosen) but
                # its getpeername() says ENOTCONN: inet_getname() checks the peer port first.
                return Complete(-errno.ENOTCONN)
            name = self.udp.peer_name(inode, self.udp.sockets[inode])
        if name is None and not peer and self.udp is not None and inode in self.udp.connected:
            name = self.udp.sock_name(inode)
        if name is None:
            return Resume()
        return self._write_name(t, name_ptr, len_ptr, name)

    @staticmethod
    def _write_name(t: Tracee, name_ptr: int, len_ptr: int, name: bytes) -> Complete:
        try:
            buffer_len = t.read_int(len_ptr)
        except OSError:
            return Complete(-errno.EFAULT)
        if buffer_len < 0:
            return Complete(-errno.EINVAL)
        data, full = sockaddr.fill_name_buffer(name, buffer_len)
        try:
            t.write(((name_ptr, data), (len_ptr, struct.pack("=i", full))))
        except OSError:
            return Complete(-errno.EFAULT)
        return Complete(0)

    # -- helpers ------------------------------------------------------------------------

    def _socket(self, t: Tracee, fd: int) -> socket.socket | Resume | Complete:
        """ktrace's duplicate of the program's descriptor, or what the syscall should do
        without one: run unchanged when the kernel will refuse it anyway (a bad descriptor,
        not a socket), fail when ktrace cannot look (out of descriptors): a socket ktrace
        cannot see must never connect or send directly from this machine."""
        if fd > 0x7FFFFFFF:
            return Resume()  # not an int: EBADF from the kernel
        try:
            dup = t.duplicate(fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                return Resume()
            if not self._warned_no_descriptor:
                self._warned_no_descriptor = True
                log.warning(
                    "cannot inspect a socket of process %d (%s): its network calls fail with ENOBUFS "
                    "(hint: raise ktrace's descriptor limit, `ulimit -Hn`)",
                    t.tid,
                    exc.strerror or exc,
                )
            return Complete(-errno.ENOBUFS)
        try:
            return socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return Resume()  # not a socket: ENOTSOCK from the kernel

    @staticmethod
    def _info(sock: socket.socket) -> SocketInfo:
        # socket.socket(fileno=...) read SO_TYPE and SO_PROTOCOL already (CPython asks the
        # kernel for what it is not told): no second getsockopt for each.
        return SocketInfo(sock.family, int(sock.type), os.fstat(sock.fileno()).st_ino, sock.proto)

    def _emit(self, event: ConnectEvent) -> None:
        log.debug("connect %s", event)
        if self.on_event is not None:
            # A thread gone by now (reported at exit) is named by its own id.
            self.on_event(dataclasses.replace(event, pid=self.threads.of_or_self(event.pid)))
