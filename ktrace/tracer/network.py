"""The program's socket syscalls: what socket a call is about, then the handler for it
(`tcp.py`: connect() of TCP and other IP sockets; `udp.py`: UDP; here: names).

The rule that keeps a racing thread from slipping a connection past ktrace: on an IP
socket, no call that names an address runs with the program's own copy of it. ktrace reads
the address once, decides, and either performs the call itself with those bytes (on its
duplicate of the program's socket: the same open file, so the same effect) or, under
ptrace, points the call at a copy the program cannot change. Calls on other sockets
(AF_UNIX, netlink) run as issued: the kernel refuses an IP address for them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from ktrace.tracer import decide, sockaddr
from ktrace.tracer.decide import Redirected, SocketInfo
from ktrace.tracer.tcp import MSG_FASTOPEN, TcpConnects
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import Complete, Outcome, Resume, Tracee, TraceeGone
from ktrace.tracer.udp import UdpRedirector, read_outgoing
from ktrace.tracer.udp_receive import UdpReceiver

log = logging.getLogger("ktrace.network")

BYPASS_RESOLVER_SOCKETS = frozenset(
    {
        b"/var/run/nscd/socket",
        b"/run/nscd/socket",
        b"/run/systemd/resolve/io.systemd.Resolve",
        b"/run/systemd/resolve/io.systemd.Resolve.Monitor",
    }
)


@dataclass
class NetworkHandler:
    tcp: TcpConnects
    udp: UdpRedirector
    threads: ThreadGroups = field(default_factory=ThreadGroups)
    receiver: UdpReceiver | None = None

    def __post_init__(self) -> None:
        if self.receiver is None:
            self.receiver = UdpReceiver(self.udp.relays)

    _warned_no_descriptor: bool = False

    # -- handlers (dispatch keys of syscalls.TABLE) ---------------------------------------

    def on_connect(self, t: Tracee) -> Outcome:
        fd, addr_ptr, addr_len = t.arg(0), t.arg(1), t.arg(2) & 0xFFFFFFFF
        try:
            raw = t.read(addr_ptr, min(addr_len, sockaddr.MAX_SOCKADDR_LEN))
        except TraceeGone:
            raise
        except OSError:
            return Complete(-errno.EFAULT)  # what the kernel's own copy of it would say
        addr = sockaddr.decode(raw)
        if isinstance(addr, sockaddr.OtherFamily) and addr.family == sockaddr.AF_UNIX:
            path = raw[2:].split(b"\0", 1)[0]
            if path in BYPASS_RESOLVER_SOCKETS:
                # Local caching resolvers (nscd, systemd-resolved) answer from this machine's
                # view: refusing them makes glibc ask the nameserver of the resolv.conf it
                # reads, which is the cluster's.
                return Complete(-errno.ECONNREFUSED)
        sock = self._socket(t, fd)
        if not isinstance(sock, socket.socket):
            return sock
        info = socket_info(sock)
        if not info.is_ip:
            sock.close()
            return Resume()  # AF_UNIX and the like: no IP address can leave through them
        if addr_len > sockaddr.MAX_SOCKADDR_LEN:
            sock.close()
            return Complete(-errno.EINVAL)  # the kernel copies no more than a sockaddr_storage
        if info.is_udp:
            with sock:
                return self.udp.connect(t, t.arg(0), sock, info, raw, addr)
        return self.tcp.connect(t, sock, info, raw, addr)

    def on_so_error(self, t: Tracee) -> Outcome:
        return self.tcp.so_error(t)

    def on_names(self, t: Tracee) -> Outcome:
        peer = t.syscall == "getpeername"
        fd, name_ptr, len_ptr = t.arg(0), t.arg(1), t.arg(2)
        inode = t.inode(fd)
        if inode is None:
            return Resume()
        entry: Redirected | None = self.tcp.redirected(inode)
        name: bytes | None = None
        if entry is not None:
            name = decide.peer_name(entry) if peer else decide.sock_name(entry)
        elif peer and (family := self.udp.family_of(inode)) is not None:
            if self.udp.connected_to_port_zero(inode):
                # Linux keeps such a socket "connected" (send works, the source is chosen) but
                # its getpeername() says ENOTCONN: inet_getname() checks the peer port first.
                return Complete(-errno.ENOTCONN)
            name = self.udp.peer_name(inode, family)
        elif not peer and self.udp.connected_peer(inode) is not None:
            name = self.udp.sock_name(inode)
        if name is None:
            return Resume()
        return write_name(t, name_ptr, len_ptr, name)

    def on_receive(self, t: Tracee) -> Outcome:
        inode = t.inode(t.arg(0))
        family = self.udp.family_of(inode) if inode is not None else None
        if inode is None or family is None:
            return Resume()
        info = SocketInfo(family, socket.SOCK_DGRAM, inode)
        receiver = self.receiver
        assert receiver is not None
        if t.syscall == "recvfrom":
            if not (t.arg(4) and t.arg(5) and decide.recvfrom_in_ktrace(t.arg(3) & 0xFFFFFFFF)):
                return receiver.recvfrom(t, info)  # no source asked for, or the exit path
            try:
                dup = t.duplicate(t.arg(0))
            except OSError:
                return receiver.recvfrom(t, info)  # the exit path needs no descriptor
            try:
                return receiver.recvfrom(t, info, dup)
            finally:
                os.close(dup)
        if t.syscall == "recvmsg":
            return receiver.recvmsg(t, info)
        return receiver.recvmmsg(t, info)

    def on_send(self, t: Tracee) -> Outcome:
        try:
            outgoing = read_outgoing(t)
        except TraceeGone:
            raise
        except OSError:
            return Complete(-errno.EFAULT)
        except ValueError:
            return Complete(-errno.EINVAL)  # an iovec count the kernel refuses too
        sock = self._socket(t, t.arg(0))
        if not isinstance(sock, socket.socket):
            return sock
        with sock:
            info = socket_info(sock)
            if not info.is_ip:
                return Resume()
            if info.type == socket.SOCK_STREAM:
                if t.syscall == "sendto" and t.arg(3) & MSG_FASTOPEN:
                    return self.tcp.fast_open(
                        t, socket.socket(fileno=os.dup(sock.fileno())), info, outgoing.destinations[0]
                    )
                # TCP ignores a destination except for a fast open, which the flags (a register,
                # which the program cannot change under the kernel) say.
                return Resume()
            return self.udp.send(t, sock, info, outgoing)

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

    def stream_closed(self, dialled: object) -> None:
        self.tcp.stream_closed(dialled)  # type: ignore[arg-type]

    def finish(self) -> None:
        self.tcp.finish()


def socket_info(sock: socket.socket) -> SocketInfo:
    # socket.socket(fileno=...) read SO_TYPE and SO_PROTOCOL already (CPython asks the
    # kernel for what it is not told): no second getsockopt for each.
    return SocketInfo(sock.family, int(sock.type), os.fstat(sock.fileno()).st_ino, sock.proto)


def write_name(t: Tracee, name_ptr: int, len_ptr: int, name: bytes) -> Complete:
    """Complete getpeername()/getsockname() with ``name``, as the kernel fills the buffer."""
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
