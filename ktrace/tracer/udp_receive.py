"""Receiving on a relayed UDP socket: the datagram came from a loopback relay, and the program
must see the remote peer it stands for as its source.

- ptrace: at the syscall's exit ktrace rewrites the source the kernel wrote (or, for a
  recvfrom() with a datagram already queued, receives it itself at the entry: one stop);
- notify: there is no exit to watch, so ktrace always receives in the program's place, on
  its duplicate of the socket, and writes the data, the true source, the control messages
  and the lengths where the kernel would have; a blocking receive with nothing queued waits
  (interruptibly, in the kernel's notification wait) until a datagram or the socket's
  SO_RCVTIMEO.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ktrace_agent.wire.values import MAX_DATAGRAM

from ktrace.tracer import decide, msghdr, sockaddr, sockops
from ktrace.tracer.decide import SocketInfo
from ktrace.tracer.ports import RelayTable
from ktrace.tracer.sockaddr import InetAddr
from ktrace.tracer.tracee import Complete, Deferred, Memory, Outcome, Resume, Tracee, TraceeGone, WatchExit

# ktrace's own receives into preallocated buffers (only the loop's thread receives here):
# the source comes back as the kernel's sockaddr bytes, as the program would get them.
_libc = ctypes.CDLL(None, use_errno=True)
_libc_recvmsg = _libc.recvmsg
_libc_recvmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc_recvmsg.restype = ctypes.c_ssize_t
_data = ctypes.create_string_buffer(MAX_DATAGRAM)
_name = ctypes.create_string_buffer(128)  # sockaddr_storage
_control = ctypes.create_string_buffer(msghdr.MAX_CONTROL)
MSG_DONTWAIT = socket.MSG_DONTWAIT


@dataclass(frozen=True)
class Received:
    data: bytes
    length: int  # the datagram's length as recvmsg returned it (MSG_TRUNC: may exceed data)
    name: bytes
    control: bytes
    flags: int


def receive(fd: int, size: int, control_size: int, flags: int) -> Received | int:
    """One recvmsg() on ktrace's duplicate, never blocking: what arrived, or the errno."""
    iov = sockops.Iovec(ctypes.addressof(_data), min(size, MAX_DATAGRAM))
    hdr = sockops.Msghdr(
        ctypes.addressof(_name), ctypes.sizeof(_name), ctypes.addressof(iov), 1,
        ctypes.addressof(_control) if control_size else None, min(control_size, msghdr.MAX_CONTROL), 0,
    )  # fmt: skip
    got = int(_libc_recvmsg(fd, ctypes.addressof(hdr), flags | MSG_DONTWAIT))
    if got < 0:
        return ctypes.get_errno() or errno.EIO
    return Received(
        ctypes.string_at(_data, min(got, iov.len)),
        got,
        _name.raw[: min(hdr.namelen, ctypes.sizeof(_name))],
        _control.raw[: hdr.controllen] if control_size else b"",
        hdr.flags,
    )


@dataclass
class UdpReceiver:
    relays: RelayTable

    # -- the true source ------------------------------------------------------------

    def true_source(self, family: int, raw: bytes) -> bytes | None:
        addr = sockaddr.decode(raw)
        if not isinstance(addr, InetAddr) or not sockaddr.is_loopback(addr.ip):
            return None
        peer = self.relays.peer_of(family, addr.port)
        if peer is None:
            return None
        return sockaddr.encode(family, peer.ip, peer.port)

    def _true_source_of_prefix(self, family: int, written: bytes) -> bytes | None:
        """``true_source`` for a name buffer shorter than a sockaddr: the kernel wrote only the
        first bytes. The family and port are enough to find the relay when what is there of the
        address is a loopback address a relay sends from."""
        if len(written) < 4:
            return None
        port = struct.unpack_from("!H", written, 2)[0]
        peer = self.relays.peer_of(family, port)
        if peer is None:
            return None
        loopback = ("127.0.0.1",) if family == socket.AF_INET else ("::1", "::ffff:127.0.0.1")
        if not any(sockaddr.encode(family, ipaddress.ip_address(host), port).startswith(written) for host in loopback):
            return None
        return sockaddr.encode(family, peer.ip, peer.port)

    def _rewrite_name(
        self, memory: Memory, family: int, name_ptr: int, buffer_len: int, len_ptr: int, len_size: int
    ) -> None:
        written = memory.read(name_ptr, min(buffer_len, sockaddr.MAX_SOCKADDR_LEN))
        true = self.true_source(family, written) or self._true_source_of_prefix(family, written)
        if true is None:
            return
        data, full = sockaddr.fill_name_buffer(true, buffer_len)
        memory.write(((name_ptr, data), (len_ptr, full.to_bytes(len_size, "little"))))

    # -- recvfrom -------------------------------------------------------------------

    def recvfrom(self, t: Tracee, info: SocketInfo, fd: int | None = None) -> Outcome:
        """``fd``: ktrace's duplicate of the program's socket, to receive in its place; given
        only when its flags allow that (``decide.recvfrom_in_ktrace``, checked by the caller
        before it duplicates the descriptor)."""
        name_ptr, len_ptr = t.arg(4), t.arg(5)
        if not name_ptr or not len_ptr:
            return Resume()
        try:
            buffer_len = t.read_int(len_ptr)
        except TraceeGone:
            raise
        except OSError:
            return Resume() if t.can_rewrite else Complete(-errno.EFAULT)
        if fd is not None and buffer_len >= 0:
            done = self._recvfrom_now(t, info, fd, buffer_len)
            if done is not None:
                return done
            if not t.can_rewrite:
                return self._wait(t, fd, lambda own: self._recvfrom_now(t, info, own, buffer_len))
        if not t.can_rewrite:
            return Resume()  # flags ktrace cannot reproduce (MSG_ERRQUEUE...): the kernel's source

        def at_exit(result: int, memory: Memory) -> None:
            if result >= 0 and buffer_len > 0:
                self._rewrite_name(memory, info.family, name_ptr, buffer_len, len_ptr, 4)

        return WatchExit(at_exit)

    def _recvfrom_now(self, t: Tracee, info: SocketInfo, fd: int, buffer_len: int) -> Complete | None:
        """The program's recvfrom() done by ktrace on the same socket (``fd``), when a datagram
        (or a pending error) is there already: the resolver polled first, so it usually is.
        None: nothing queued."""
        length, flags = t.arg(2), t.arg(3) & 0xFFFFFFFF
        got = receive(fd, length, 0, flags)
        if isinstance(got, int):
            if got in (errno.EAGAIN, errno.EINTR):
                return None
            # A pending error (ICMP, IP_RECVERR): reporting it clears it, as the program's
            # own call would have.
            return Complete(-got)
        name = self.true_source(info.family, got.name) or got.name
        stored, full = sockaddr.fill_name_buffer(name, buffer_len)
        try:
            t.write(((t.arg(1), got.data), (t.arg(4), stored), (t.arg(5), struct.pack("=I", full))))
        except TraceeGone:
            raise
        except OSError:
            return Complete(-errno.EFAULT)  # the kernel too drops the datagram it could not copy
        return Complete(got.length if flags & socket.MSG_TRUNC else len(got.data))

    # -- recvmsg, recvmmsg ----------------------------------------------------------

    def recvmsg(self, t: Tracee, info: SocketInfo) -> Outcome:
        hdr_ptr = t.arg(1)
        try:
            hdr = msghdr.decode_msghdr(t.read(hdr_ptr, msghdr.MSGHDR_SIZE))
        except TraceeGone:
            raise
        except (OSError, ValueError):
            return Resume() if t.can_rewrite else Complete(-errno.EFAULT)
        if t.can_rewrite:
            if not hdr.name or not hdr.namelen:
                return Resume()

            def at_exit(result: int, memory: Memory) -> None:
                if result >= 0:
                    self._rewrite_name(memory, info.family, hdr.name, hdr.namelen, hdr_ptr + msghdr.NAMELEN_OFFSET, 4)

            return WatchExit(at_exit)
        flags = t.arg(2) & 0xFFFFFFFF
        if not decide.recvfrom_in_ktrace(flags & ~socket.MSG_CMSG_CLOEXEC):
            return Resume()
        return self._performed(t, info, lambda fd: self._recvmsg_now(t, info, fd, hdr_ptr, hdr, flags))

    def recvmmsg(self, t: Tracee, info: SocketInfo) -> Outcome:
        base, vlen = t.arg(1), min(t.arg(2) & 0xFFFFFFFF, msghdr.IOV_MAX)
        try:
            raw = t.read(base, vlen * msghdr.MMSGHDR_SIZE)
            headers = [msghdr.decode_msghdr(raw[i * 64 : i * 64 + 56]) for i in range(vlen)]
        except TraceeGone:
            raise
        except (OSError, ValueError):
            return Resume() if t.can_rewrite else Complete(-errno.EFAULT)
        if t.can_rewrite:

            def at_exit(result: int, memory: Memory) -> None:
                for index in range(max(0, min(result, vlen))):
                    hdr = headers[index]
                    if hdr.name and hdr.namelen:
                        entry = base + index * msghdr.MMSGHDR_SIZE
                        self._rewrite_name(memory, info.family, hdr.name, hdr.namelen, entry + msghdr.NAMELEN_OFFSET, 4)

            return WatchExit(at_exit)
        flags = t.arg(3) & 0xFFFFFFFF
        if not decide.recvfrom_in_ktrace(flags & ~(socket.MSG_CMSG_CLOEXEC | MSG_WAITFORONE)) or not vlen:
            return Resume()

        def many(fd: int) -> Complete | None:
            # The first message as a recvmsg() of its own; then what is queued already (what
            # MSG_WAITFORONE asks; without it the kernel would wait for all of them or the timeout).
            received = 0
            for index, hdr in enumerate(headers):
                entry = base + index * msghdr.MMSGHDR_SIZE
                done = self._recvmsg_now(t, info, fd, entry, hdr, flags, entry + msghdr.MSG_LEN_OFFSET)
                if done is None or done.retval < 0:
                    if received:
                        return Complete(received)
                    return done
                received += 1
            return Complete(received)

        return self._performed(t, info, many)

    def _recvmsg_now(
        self,
        t: Tracee,
        info: SocketInfo,
        fd: int,
        hdr_ptr: int,
        hdr: msghdr.MsgHdr,
        flags: int,
        length_ptr: int | None = None,
    ) -> Complete | None:
        if hdr.iovlen > msghdr.IOV_MAX:
            return Complete(-errno.EMSGSIZE)  # the kernel's __copy_msghdr; the count sizes no read
        try:
            iovecs = msghdr.decode_iovecs(t.read(hdr.iov, hdr.iovlen * msghdr.IOVEC_SIZE), hdr.iovlen)
        except (OSError, ValueError):
            return Complete(-errno.EFAULT)
        capacity = sum(length for _base, length in iovecs)
        got = receive(fd, capacity, hdr.controllen if hdr.control else 0, flags & ~socket.MSG_CMSG_CLOEXEC)
        if isinstance(got, int):
            return None if got in (errno.EAGAIN, errno.EINTR) else Complete(-got)
        parts: list[tuple[int, bytes]] = []
        offset = 0
        for base, length in iovecs:
            if offset >= len(got.data):
                break
            parts.append((base, got.data[offset : offset + length]))
            offset += length
        namelen = 0
        if hdr.name and hdr.namelen:
            name = self.true_source(info.family, got.name) or got.name
            stored, namelen = sockaddr.fill_name_buffer(name, hdr.namelen)
            parts.append((hdr.name, stored))
        if hdr.control and got.control:
            parts.append((hdr.control, got.control))
        # msg_namelen, msg_controllen, msg_flags, as the kernel updates them.
        parts.append((hdr_ptr + msghdr.NAMELEN_OFFSET, struct.pack("=I", namelen)))
        parts.append((hdr_ptr + msghdr.CONTROLLEN_OFFSET, struct.pack("=Q", len(got.control))))
        parts.append((hdr_ptr + msghdr.FLAGS_OFFSET, struct.pack("=i", got.flags)))
        result = got.length if flags & socket.MSG_TRUNC else len(got.data)
        if length_ptr is not None:
            parts.append((length_ptr, struct.pack("=I", result)))
        try:
            t.write(parts)
        except TraceeGone:
            raise
        except OSError:
            return Complete(-errno.EFAULT)
        return Complete(result)

    # -- waiting --------------------------------------------------------------------

    def _performed(self, t: Tracee, info: SocketInfo, attempt: Callable[[int], Complete | None]) -> Outcome:
        try:
            dup = t.duplicate(t.arg(0))
        except OSError:
            return Resume()
        try:
            done = attempt(dup)
            if done is not None:
                return done
            return self._wait(t, dup, attempt)
        finally:
            os.close(dup)

    def _wait(self, t: Tracee, fd: int, attempt: Callable[[int], Complete | None]) -> Outcome:
        """Nothing queued: a non-blocking receive says EAGAIN; a blocking one waits until a
        datagram arrives (or SO_RCVTIMEO ends the wait with EAGAIN, as the kernel would)."""
        flags = t.arg(3 if t.syscall in ("recvfrom", "recvmmsg") else 2) & 0xFFFFFFFF
        if flags & MSG_DONTWAIT or sockops.nonblocking(fd):
            return Complete(-errno.EAGAIN)
        own = socket.socket(fileno=os.dup(fd))
        return Deferred(_when_readable(own, attempt))


MSG_WAITFORONE = 0x10000


async def _when_readable(sock: socket.socket, attempt: Callable[[int], Complete | None]) -> Complete:
    timeval = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    seconds, micros = struct.unpack("=qq", timeval)
    timeout = seconds + micros / 1e6 if seconds or micros else None
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else time.monotonic() + timeout
    with sock:
        while True:
            waiter: asyncio.Future[None] = loop.create_future()

            def ready(waiter: asyncio.Future[None] = waiter) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            loop.add_reader(sock.fileno(), ready)
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return Complete(-errno.EAGAIN)
            finally:
                loop.remove_reader(sock.fileno())
            done = attempt(sock.fileno())
            if done is not None:
                return done
