"""Applies the decisions of `decide.py` to a stopped thread.

This is where a syscall snapshot is gathered (registers, the sockaddr bytes,
what the descriptor is) and where the answer is carried out: a redirected
connect() waits for the agent, connects ktrace's duplicate of the program's
socket to the loopback endpoint, and completes the program's syscall without
running it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ktrace.tracer import arch, decide, kernel, sockaddr
from ktrace.tracer.decide import Passthrough, Redirected, RedirectTcp, RoutingPolicy, SocketInfo
from ktrace.tracer.kernel import Registers, TraceeGone
from ktrace.tracer.tracer import Complete, Deferred, Outcome, Resume
from ktrace.tunnel.client import AgentClient, TcpStream
from ktrace.tunnel.endpoint import LoopbackEndpoint
from ktrace.tunnel.types import Endpoint, TunnelError

log = logging.getLogger("ktrace.network")

SYS = arch.SYSCALLS


@dataclass(frozen=True)
class ConnectEvent:
    """One connect() the program made to a remote destination, and its outcome."""

    pid: int
    dest: Endpoint
    outcome: str  # "ok" or an errno name
    local: Endpoint | None = None


@dataclass
class NetworkHandler:
    client: AgentClient
    endpoint: LoopbackEndpoint
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    connect_timeout: float | None = None
    on_event: Callable[[ConnectEvent], None] | None = None
    redirected: dict[int, Redirected] = field(default_factory=dict)
    _streams: dict[int, int] = field(default_factory=dict)  # id(stream) -> inode

    # -- SyscallHandler ------------------------------------------------------------

    def on_syscall(self, tid: int, regs: Registers) -> Outcome:
        nr = regs.nr
        if nr == SYS.connect:
            return self._connect(tid, regs)
        if nr == SYS.getpeername:
            return self._name(tid, regs, decide.peer_name)
        if nr == SYS.getsockname:
            return self._name(tid, regs, decide.sock_name)
        return Resume()

    def on_exec(self, tid: int) -> None:
        pass

    def on_thread_exit(self, tid: int) -> None:
        pass

    def stream_closed(self, stream: TcpStream) -> None:
        inode = self._streams.pop(id(stream), None)
        if inode is not None:
            self.redirected.pop(inode, None)

    # -- connect ----------------------------------------------------------------------

    def _connect(self, tid: int, regs: Registers) -> Outcome:
        fd, addr_ptr, addr_len = regs.arg(0), regs.arg(1), regs.arg(2) & 0xFFFFFFFF
        try:
            raw = kernel.read_memory(tid, addr_ptr, min(addr_len, sockaddr.MAX_SOCKADDR_LEN))
        except OSError as exc:
            if isinstance(exc, TraceeGone):
                raise
            return Resume()  # the kernel reports EFAULT itself
        addr = sockaddr.decode(raw)
        if not isinstance(addr, sockaddr.InetAddr):
            return Resume()
        sock = self._socket(tid, fd)
        if sock is None:
            return Resume()
        info = self._info(sock)
        decision = decide.decide_connect(addr, info, info.inode in self.redirected, self.policy)
        if isinstance(decision, Passthrough):
            sock.close()
            return Resume()
        return Deferred(self._redirect_tcp(tid, sock, info, decision))

    async def _redirect_tcp(self, tid: int, sock: socket.socket, info: SocketInfo, decision: RedirectTcp) -> Complete:
        try:
            try:
                stream = await self.client.open_tcp(decision.dest, self.connect_timeout)
            except TunnelError as exc:
                self._emit(ConnectEvent(tid, decision.dest, exc.errno_name))
                return Complete(-exc.errno)
            host, port = self.endpoint.address(info.family)
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                await stream.abort()
                self._emit(ConnectEvent(tid, decision.dest, errno.errorcode.get(err, str(err))))
                return Complete(-err)
            source_port = sock.getsockname()[1]
            self.endpoint.expect(info.family, source_port, stream)
            self.redirected[info.inode] = Redirected(info.family, decision.original, stream.local)
            self._streams[id(stream)] = info.inode
            self._emit(ConnectEvent(tid, decision.dest, "ok", stream.local))
            return Complete(decide.connect_result(err))
        finally:
            sock.close()

    # -- getpeername / getsockname ------------------------------------------------------

    def _name(self, tid: int, regs: Registers, render: Callable[[Redirected], bytes]) -> Outcome:
        fd, name_ptr, len_ptr = regs.arg(0), regs.arg(1), regs.arg(2)
        inode = socket_inode(tid, fd)
        entry = self.redirected.get(inode) if inode is not None else None
        if entry is None:
            return Resume()
        try:
            buffer_len = kernel.read_int(tid, len_ptr)
        except OSError as exc:
            if isinstance(exc, TraceeGone):
                raise
            return Complete(-errno.EFAULT)
        if buffer_len < 0:
            return Complete(-errno.EINVAL)
        data, full = sockaddr.fill_name_buffer(render(entry), buffer_len)
        try:
            kernel.write_memory(tid, name_ptr, data)
            kernel.write_memory(tid, len_ptr, struct.pack("=i", full))
        except OSError as exc:
            if isinstance(exc, TraceeGone):
                raise
            return Complete(-errno.EFAULT)
        return Complete(0)

    # -- helpers ------------------------------------------------------------------------

    def _socket(self, tid: int, fd: int) -> socket.socket | None:
        if fd > 0x7FFFFFFF:
            return None
        try:
            dup = kernel.duplicate_fd(tid, fd)
        except OSError as exc:
            if isinstance(exc, TraceeGone):
                raise
            return None
        try:
            return socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return None

    @staticmethod
    def _info(sock: socket.socket) -> SocketInfo:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        return SocketInfo(sock.family, kind, os.fstat(sock.fileno()).st_ino)

    def _emit(self, event: ConnectEvent) -> None:
        log.debug("connect %s", event)
        if self.on_event is not None:
            self.on_event(event)


def socket_inode(tid: int, fd: int) -> int | None:
    """The inode of a tracee's socket descriptor, without duplicating it."""
    try:
        target = os.readlink(f"/proc/{tid}/fd/{fd}")
    except OSError:
        return None
    if target.startswith("socket:[") and target.endswith("]"):
        return int(target[8:-1])
    return None
