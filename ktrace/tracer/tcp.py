"""TCP connect(): what the program sees is what a pod's kernel would show it.

A connect() to a remote destination never waits at a ktrace stop. The program's socket is
*parked* (tunnel/parking.py: connected to a loopback listener that drops its SYN) while
the agent dials, so the kernel holds it in SYN_SENT exactly as it would a connect to a
distant host:
- non-blocking: ktrace parks it on its duplicate and the call returns EINPROGRESS at once;
  poll/epoll/select and SO_ERROR report the outcome when it comes;
- blocking, ptrace: the program's own connect() runs with its address rewritten to the
  parking address (a copy the program cannot change), so it sleeps in the kernel, where
  signals reach it (EINTR, or a restart with SA_RESTART: the restarted call finds the
  socket connecting and waits again, as the kernel's own EALREADY path does);
- blocking, notify: a thread of ktrace's connects the duplicate; the program waits in the
  kernel's notification wait, which a signal interrupts the same way.

Outcomes (`_settle`): the agent connected -> ktrace completes the parked handshake from the
parking address (a simultaneous open) and splices it to the agent's stream: connect()
returns 0, poll says writable, SO_ERROR is 0. The agent failed with errno E -> ktrace
disconnects the parked socket (connect(AF_UNSPEC) on its duplicate), which wakes a blocked
connect() (whose result is rewritten to E) or makes a non-blocking socket report
POLLERR|POLLHUP; the kernel's pending error is then ECONNRESET, so getsockopt(SO_ERROR) and
the next connect() are answered by ktrace with E, as the kernel would have answered them.

Every connect() on an IP socket is decided on ktrace's copy of the address and performed
(or rewritten to a copy): the kernel never reads the program's sockaddr again, so another
thread changing it cannot slip a connection past ktrace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ktrace_agent.wire.connecting import until_not_closed
from ktrace_agent.wire.values import Endpoint, TunnelError

from ktrace.rules import RouteDecision
from ktrace.tracer import decide, sockaddr, sockops
from ktrace.tracer.decide import Passthrough, Redirected, RedirectTcp, RoutingPolicy, SocketInfo
from ktrace.tracer.options_follow import OptionsFollower
from ktrace.tracer.ports import AttachFailed, Dialled, PendingDial, TcpTunnel
from ktrace.tracer.sockaddr import InetAddr
from ktrace.tracer.sockets import Phase, SocketTable, TcpRecord
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import (
    Complete,
    Deferred,
    Memory,
    NeedScratch,
    Outcome,
    Resume,
    Rewrite,
    Tracee,
    TraceeGone,
)
from ktrace.tracer.udp import warn_unsupported
from ktrace.tracer.waiting_threads import WaitingThreads

log = logging.getLogger("ktrace.tcp")

MSG_FASTOPEN = 0x20000000
MSG_DONTWAIT = 0x40
ERESTART_RANGE = range(-516, -511)  # ERESTARTSYS..ERESTART_RESTARTBLOCK: not final, the call runs again
MAX_PENDING_LOCAL = 4096
# Failed connects whose program has not asked yet, or was told (the next connect() on the socket
# says ECONNABORTED): a program that closes such a socket leaves its record; a few hundred bytes
# each, kept for the most recent ones (a soak of refused connects grew ktrace 6 MB at 4,096).
MAX_FAILED_KEPT = 1024
# How long a failed dial waits for a blocking connect() to reach the kernel (tunnel/parking.py's
# ATTACH_WAIT for a successful one).
PARK_WAIT = 30.0


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


@dataclass(frozen=True)
class _PendingLocal:
    tid: int  # the thread that connected
    dest: Endpoint
    route: RouteDecision
    started: float

    def event(self, outcome: str) -> ConnectEvent:
        return ConnectEvent(self.tid, self.dest, outcome, decision=self.route, duration=time.monotonic() - self.started)


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


@dataclass
class TcpConnects:
    tunnel: TcpTunnel
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    connect_timeout: float | None = None
    on_event: Callable[[ConnectEvent], None] | None = None
    threads: ThreadGroups = field(default_factory=ThreadGroups)
    table: SocketTable = field(default_factory=SocketTable)
    # Reads the program's keepalive options after connect, for the agent's socket (None: an agent
    # that does not take them).
    options: OptionsFollower | None = None
    _by_dialled: dict[int, int] = field(default_factory=dict)  # id(dialled) -> inode
    # Non-blocking connect()s kept local, by socket inode, until the program learns how they
    # ended (getsockopt SO_ERROR, or connect() again): for the report only.
    _pending_local: dict[int, _PendingLocal] = field(default_factory=dict)
    # Blocking calls ktrace makes for the program under the notify backend (waiting_threads.py).
    _waiting: WaitingThreads = field(default_factory=lambda: WaitingThreads("ktrace-connect"))
    _failed: dict[int, None] = field(default_factory=dict)  # inodes of FAILED/TOLD records, oldest first

    # -- connect() ---------------------------------------------------------------------

    def connect(
        self, t: Tracee, sock: socket.socket, info: SocketInfo, raw: bytes, addr: sockaddr.Decoded | None
    ) -> Outcome:
        """connect() on a TCP (or other IP, non-UDP) socket; ``sock`` is ktrace's duplicate, which
        this takes over, ``raw`` the address bytes as read."""
        record = self.table.tcp(info.inode)
        if isinstance(addr, sockaddr.OtherFamily) and addr.family == sockaddr.AF_UNSPEC:
            return self._disconnect(sock, record)
        if record is not None:
            return self._again(t, sock, record)
        decision = decide.decide_connect(addr, info, False, self.policy)
        if isinstance(decision, decide.Unsupported):
            sock.close()
            warn_unsupported(decision)
            return Complete(-errno.ENETUNREACH)
        if isinstance(decision, Passthrough):
            return self._local(t, sock, info, raw, addr, decision)
        return self._redirect(t, sock, info, decision)

    def _disconnect(self, sock: socket.socket, record: TcpRecord | None) -> Outcome:
        """connect(AF_UNSPEC): what the kernel does (a connected socket resets its peer, here
        ktrace's end, which resets the agent's), and the record is forgotten."""
        with sock:
            result = sockops.disconnect(sock.fileno())
        if record is not None:
            self._forget(record)
        return Complete(-result)

    def _again(self, t: Tracee, sock: socket.socket, record: TcpRecord) -> Outcome:
        """A connect() on a socket ktrace redirected before: answered from its record."""
        if record.phase is Phase.CONNECTED or (record.phase is Phase.CONNECTING and sockops.nonblocking(sock.fileno())):
            # The kernel's answer is the pod's: the socket really is connecting or connected
            # (EALREADY; 0 once, the first time after a non-blocking connect completed; then
            # EISCONN). It ignores the address in those states; ktrace passes the parking one.
            with sock:
                return Complete(-sockops.connect(sock.fileno(), self._parking_name(record.family)))
        if record.phase in (Phase.FAILED, Phase.TOLD):
            # The kernel's sock_error path: report the pending error (or ECONNABORTED once it
            # was read), and leave the socket unconnected for a fresh connect().
            err = record.error if record.phase is Phase.FAILED else errno.ECONNABORTED
            with sock:
                sockops.take_error(sock)
                sockops.disconnect(sock.fileno())
            self._forget(record)
            return Complete(-err)
        return self._wait_blocking(t, sock, record)  # a blocking connect() on a parked socket

    def _local(
        self,
        t: Tracee,
        sock: socket.socket,
        info: SocketInfo,
        raw: bytes,
        addr: sockaddr.Decoded | None,
        decision: Passthrough,
    ) -> Outcome:
        """A destination that stays on this machine (or an address the kernel refuses): the
        kernel's connect() on ktrace's copy of the address."""
        route = decision.decision
        watched = route is not None and route.by_user_rule and self.on_event is not None and isinstance(addr, InetAddr)
        dest = addr.endpoint if isinstance(addr, InetAddr) else None
        started = time.monotonic()
        blocking = not sockops.nonblocking(sock.fileno())
        if not blocking or route is None:
            # Non-blocking, or refused by the kernel at once (malformed, another family): no wait.
            with sock:
                err = sockops.connect(sock.fileno(), raw)
            if watched and dest is not None and route is not None:
                self._local_result(t.tid, info.inode, dest, route, started, -err)
            return Complete(-err)
        report: Callable[[int], None] | None = None
        if watched and dest is not None:
            tid, inode = t.tid, info.inode

            def reported(result: int) -> None:
                self._local_result(tid, inode, dest, route, started, result)

            report = reported
        if t.can_rewrite:
            sock.close()
            copy = t.stable_copy(raw)
            if copy is None:
                return NeedScratch()
            on_exit = None if report is None else _reporting(report)
            return Rewrite(((1, copy), (2, len(raw))), on_exit)
        return Deferred(self._blocking_local(sock, raw, report))

    async def _blocking_local(self, sock: socket.socket, raw: bytes, report: Callable[[int], None] | None) -> Complete:
        with sock:
            err = await self._in_thread(sock, lambda fd: sockops.connect(fd, raw))
        if report is not None:
            report(-err)
        return Complete(-err)

    def _local_result(
        self, tid: int, inode: int, dest: Endpoint, route: RouteDecision, started: float, result: int
    ) -> None:
        if result in ERESTART_RANGE or result == -errno.EALREADY:
            return  # the restarted connect() stops again; EALREADY: still going
        pending = self._pending_local.pop(inode, None)
        if pending is not None:  # connect() again to learn the outcome
            self._emit(pending.event("ok" if result in (0, -errno.EISCONN) else _errname(-result)))
            return
        if result == -errno.EINPROGRESS:
            self._remember_local(inode, _PendingLocal(tid, dest, route, started))
            return
        outcome = "ok" if result >= 0 else _errname(-result)
        self._emit(ConnectEvent(tid, dest, outcome, decision=route, duration=time.monotonic() - started))

    def _remember_local(self, inode: int, pending: _PendingLocal) -> None:
        if len(self._pending_local) >= MAX_PENDING_LOCAL:
            # A program that never asks how its connects ended: report the oldest as still pending.
            oldest = next(iter(self._pending_local))
            self._emit(self._pending_local.pop(oldest).event("EINPROGRESS"))
        self._pending_local[inode] = pending

    # -- redirected ---------------------------------------------------------------------

    def _parking_name(self, family: int) -> bytes:
        host, port = self.tunnel.parking(family)
        return sockaddr.encode(family, ipaddress.ip_address(host), port)

    def _redirect(self, t: Tracee, sock: socket.socket, info: SocketInfo, decision: RedirectTcp) -> Outcome:
        park = self._parking_name(info.family)
        blocking = not sockops.nonblocking(sock.fileno())
        copy = None
        if blocking and t.can_rewrite:
            copy = t.stable_copy(park)
            if copy is None:
                sock.close()
                return NeedScratch()  # asked again once the backend has the memory
        record = TcpRecord(
            info.inode, info.family, decision.original, decision.dest, decision.decision, t.tid, time.monotonic(), sock
        )
        record.fd = t.arg(0)
        if not blocking:
            err = sockops.connect(sock.fileno(), park)
            if err != errno.EINPROGRESS:
                # A local failure to even park (no port left, no loopback of that family): the
                # program gets the kernel's answer, as for any connect() failing here.
                sock.close()
                return Complete(-err)
        self.table.put(record)
        self._start_settling(record)
        if not blocking:
            return Complete(-errno.EINPROGRESS)
        if copy is not None:
            record.waiters += 1
            return Rewrite(((1, copy), (2, len(park))), self._blocking_exit(record))
        return self._wait_blocking(t, None, record, park)

    def _wait_blocking(
        self, t: Tracee, sock: socket.socket | None, record: TcpRecord, park: bytes | None = None
    ) -> Outcome:
        """A blocking connect() on a parked socket: the kernel waits (ptrace: the program's own
        call, its address rewritten to the parking one) or a thread of ktrace's does (notify)."""
        if sock is not None:
            sock.close()
        park = park if park is not None else self._parking_name(record.family)
        if t.can_rewrite:
            copy = t.stable_copy(park)
            if copy is None:
                return NeedScratch()
            record.waiters += 1
            return Rewrite(((1, copy), (2, len(park))), self._blocking_exit(record))
        record.waiters += 1
        return Deferred(self._blocking_connect(record, park))

    def _blocking_exit(self, record: TcpRecord) -> Callable[[int, Memory], int | None]:
        def at_exit(result: int, memory: Memory) -> int | None:
            record.waiters -= 1
            return self._blocking_result(record, result)

        return at_exit

    def _blocking_result(self, record: TcpRecord, result: int) -> int | None:
        """What a blocking connect() that waited at the parking lot returns, from what the kernel said."""
        if result in ERESTART_RANGE or result in (-errno.EINTR, -errno.EINPROGRESS, 0):
            # Interrupted (restarted, or EINTR: the connect goes on, as the kernel's does), timed out
            # by SO_SNDTIMEO (EINPROGRESS), or connected: the kernel's answer is the pod's.
            return None
        if record.phase is Phase.FAILED:
            # Woken by ktrace's disconnect (EPIPE or ECONNRESET): the agent's errno instead.
            if record.sock is not None:
                sockops.take_error(record.sock)
            self._forget(record)
            return -record.error
        # The kernel gave up on the parked SYN itself (its own SYN retries) before the agent
        # answered: that answer stands, the dial is abandoned.
        self._forget(record)
        return None

    async def _blocking_connect(self, record: TcpRecord, park: bytes) -> Complete:
        """notify: a thread of ktrace's does the program's blocking connect() to the parking lot
        and waits in it until ktrace completes or fails the parked handshake (or the kernel gives
        up). On a socket parked already the kernel says EALREADY and waits the same way."""
        try:
            if record.sock is None:  # settled meanwhile
                err = 0 if record.phase is Phase.CONNECTED else errno.EPIPE
            else:
                err = await self._in_thread(record.sock, lambda fd: sockops.connect(fd, park))
        finally:
            record.waiters -= 1
        replaced = self._blocking_result(record, -err)
        return Complete(replaced if replaced is not None else -err)

    async def _in_thread(self, sock: socket.socket, call: Callable[[int], int]) -> int:
        """``call(fd)`` on a thread of ktrace's, with a descriptor of its own (the caller's may be
        closed meanwhile, and its number reused)."""
        return await self._waiting.call_with_fd(sock.fileno(), call)

    def _start_settling(self, record: TcpRecord) -> None:
        """Start the dial now, in the stop, and the task that settles the connect with its answer."""
        assert record.sock is not None
        dialling = self.tunnel.dial(
            record.dest, self.connect_timeout, record.sock, lambda local: self._opened(record, local)
        )
        task = record.task = asyncio.get_running_loop().create_task(self._settle(record, dialling))

        def closed_unawaited(done: asyncio.Task[None]) -> None:
            if done.cancelled():
                dialling.close()  # a task cancelled before it ran never awaited it

        task.add_done_callback(closed_unawaited)

    def _opened(self, record: TcpRecord, local: Endpoint) -> None:
        """The agent has connected: the program may see its connect() succeed from now on (a
        same-host agent completes it without waiting for ``_settle``)."""
        if self.table.holds(record) and record.phase is Phase.CONNECTING and record.sock is not None:
            record.phase = Phase.CONNECTED
            record.local = local

    async def _settle(self, record: TcpRecord, dialling: PendingDial) -> None:
        """Wait for the dial, then complete or fail the parked connect."""
        try:
            dialled = await dialling
        except TunnelError as exc:
            await self._until_parked(record)
            self._fail(record, exc.errno)
            return
        if not self.table.holds(record) or record.sock is None:
            await dialled.abort()  # the program disconnected or closed meanwhile
            return
        # Connected from here on (if on_opened did not say so already): the program may see its
        # connect() succeed (and ask its names) before attach() returns.
        self._opened(record, dialled.local)
        try:
            await self.tunnel.attach(dialled, record.sock, record.dest)
        except AttachFailed as exc:
            log.debug("connection to %s not handed over: %s", record.dest, exc)
            await dialled.abort()
            if self.table.holds(record):
                record.phase = Phase.CONNECTING
                self._fail(record, exc.errno)
            return
        record.close_sock()
        self._by_dialled[id(dialled)] = record.inode
        if self.options is not None:
            self.options.follow(record.tid, record.fd, record.family, record.inode, dialled)
        if not record.settled.done():
            record.settled.set_result(0)
        self._emit(self._event(record, "ok", dialled.local))

    async def _until_parked(self, record: TcpRecord) -> None:
        """Until a blocking connect() waiting on ``record`` is in the kernel. The agent can answer
        before that thread (the program's under ptrace, ktrace's under notify) has entered it: the
        disconnect that fails the connect would come first, the connect would then park, and wait
        out the kernel's SYN retries (minutes). attach() waits the same way for a success."""
        sock = record.sock
        if sock is not None:
            await until_not_closed(
                sock, PARK_WAIT, lambda: bool(record.waiters) and record.sock is not None and self.table.holds(record)
            )

    def _fail(self, record: TcpRecord, err: int) -> None:
        if not self.table.holds(record) or record.sock is None:
            return
        record.phase = Phase.FAILED
        record.error = err
        # One wake-up of the program's pollers, with POLLOUT|POLLERR|POLLHUP and a pending error,
        # as a failed connect gives. (A pod's also says POLLIN|POLLRDHUP: tcp_done shuts both
        # directions. shutdown() after the disconnect would add them, but with a second wake-up
        # the program can see in between: ktrace leaves them out; README "Limitations".)
        sockops.disconnect(record.sock.fileno())
        if record.waiters == 0:
            # Only a thread waiting in connect() needs it (to clear the disconnect's error): the
            # program's socket must be freed when the program closes it, record or not.
            record.close_sock()
        self._remember_failed(record)
        if not record.settled.done():
            record.settled.set_result(err)
        self._emit(self._event(record, _errname(err)))

    def _remember_failed(self, record: TcpRecord) -> None:
        """A failed connect's record lives until the program asks (SO_ERROR, connect()); one that
        closes its socket without asking would leave it forever: the oldest go past a bound."""
        self._failed[record.inode] = None
        while len(self._failed) > MAX_FAILED_KEPT:
            inode = next(iter(self._failed))
            del self._failed[inode]
            old = self.table.tcp(inode)
            if old is not None and old.phase in (Phase.FAILED, Phase.TOLD) and old.waiters == 0:
                self._forget(old)

    def _event(self, record: TcpRecord, outcome: str, local: Endpoint | None = None) -> ConnectEvent:
        return ConnectEvent(
            record.tid, record.dest, outcome, local, record.route, time.monotonic() - record.started, time.time()
        )

    def _forget(self, record: TcpRecord) -> None:
        if self.table.holds(record):
            self.table.drop(record)
            self._failed.pop(record.inode, None)
        if record.task is not None and not record.task.done():
            record.task.cancel()
        record.close_sock()
        if not record.settled.done():
            record.settled.set_result(errno.ECONNABORTED)

    # -- TCP fast open ------------------------------------------------------------------

    def fast_open(self, t: Tracee, sock: socket.socket, info: SocketInfo, addr: sockaddr.Decoded | None) -> Outcome:
        """sendto(MSG_FASTOPEN) on a TCP socket: connect(), then send() once connected. A pod
        without a cookie for the server sends the data after the handshake too."""
        decision = decide.decide_connect(addr, info, self.table.tcp(info.inode) is not None, self.policy)
        if isinstance(decision, decide.Unsupported):
            sock.close()
            return Complete(-errno.ENETUNREACH)
        if not isinstance(decision, RedirectTcp):
            sock.close()
            return Resume()  # a local destination (or an already connected socket): the kernel's call
        try:
            payload = t.read(t.arg(1), min(t.arg(2), 1 << 20))
        except TraceeGone:
            raise
        except OSError:
            sock.close()
            return Complete(-errno.EFAULT)
        park = self._parking_name(info.family)
        nonblocking = sockops.nonblocking(sock.fileno()) or bool(t.arg(3) & MSG_DONTWAIT)
        record = TcpRecord(
            info.inode, info.family, decision.original, decision.dest, decision.decision, t.tid, time.monotonic(), sock
        )
        record.fd = t.arg(0)
        if nonblocking:
            err = sockops.connect(sock.fileno(), park)
            if err != errno.EINPROGRESS:
                sock.close()
                return Complete(-err)
            self.table.put(record)
            self._start_settling(record)
            return Complete(-errno.EINPROGRESS)
        self.table.put(record)
        self._start_settling(record)
        record.waiters += 1
        return Deferred(self._blocking_fast_open(record, park, payload, t.arg(3) & 0xFFFFFFFF))

    async def _blocking_fast_open(self, record: TcpRecord, park: bytes, payload: bytes, flags: int) -> Complete:
        """A blocking sendto(MSG_FASTOPEN): its connect() waits as a blocking connect() does (on a
        thread of ktrace's under either backend: this is not a connect() the kernel could be asked
        to wait in), then the payload is sent on the connected socket."""
        sock = record.sock
        own = socket.socket(fileno=os.dup(sock.fileno())) if sock is not None else None
        connected = await self._blocking_connect(record, park)
        if own is None:
            return connected
        with own:
            if connected.retval < 0:
                return connected
            sent = await self._in_thread(own, lambda fd: sockops.send(fd, payload, None, b"", flags & ~MSG_FASTOPEN))
        return Complete(sent)

    # -- getsockopt(SO_ERROR) ----------------------------------------------------------

    def so_error(self, t: Tracee) -> Outcome:
        """getsockopt(SOL_SOCKET, SO_ERROR): a redirected connect that failed reports the agent's
        errno; a local one kept by a rule is reported once the program learns its outcome."""
        if not self.table and not self._pending_local:
            return Resume()
        inode = t.inode(t.arg(0))
        if inode is None:
            return Resume()
        record = self.table.tcp(inode)
        pending = inode in self._pending_local
        if (record is None or record.phase is not Phase.FAILED) and not pending:
            return Resume()
        try:
            dup = t.duplicate(t.arg(0))
        except OSError:
            dup = None  # out of descriptors: the kernel keeps its pending error (ktrace's disconnect's)
        if dup is None and not (record is not None and record.phase is Phase.FAILED):
            return Resume()
        err = 0
        if dup is not None:
            with socket.socket(fileno=dup) as sock:
                err = sockops.take_error(sock)
        if record is not None and record.phase is Phase.FAILED:
            err = record.error
            record.phase = Phase.TOLD
            record.task = None  # done: only the phase is needed from here on
        elif pending:
            local = self._pending_local.pop(inode)
            self._emit(local.event("ok" if err == 0 else _errname(err)))
        return _write_int_option(t, err)

    # -- names --------------------------------------------------------------------------

    def redirected(self, inode: int) -> Redirected | None:
        record = self.table.tcp(inode)
        if record is not None and record.phase is Phase.CONNECTING:
            self.tunnel.catch_up()  # an `opened` the program's socket may already show
        return record.redirected() if record is not None else None

    def stream_closed(self, dialled: Dialled) -> None:
        if self.options is not None:
            self.options.forget(dialled)
        inode = self._by_dialled.pop(id(dialled), None)
        if inode is not None:
            record = self.table.tcp(inode)
            if record is not None:
                self.table.drop(record)
                record.close_sock()

    def cancel_dials(self) -> None:
        """The program is gone: dials still going have no one to serve."""
        if self.options is not None:
            self.options.close()
        for record in self.table.tcp_records():
            if record.task is not None and not record.task.done():
                record.task.cancel()

    def finish(self) -> None:
        """The program ended: local connects whose outcome it never asked for stay "EINPROGRESS"."""
        for pending in self._pending_local.values():
            self._emit(pending.event("EINPROGRESS"))
        self._pending_local.clear()
        for record in list(self.table.tcp_records()):
            self._forget(record)

    def _emit(self, event: ConnectEvent) -> None:
        log.debug("connect %s", event)
        if self.on_event is not None:
            # A thread gone by now (reported at exit) is named by its own id.
            self.on_event(dataclasses.replace(event, pid=self.threads.of_or_self(event.pid)))


def _reporting(report: Callable[[int], None]) -> Callable[[int, Memory], int | None]:
    def at_exit(result: int, memory: Memory) -> None:
        report(result)

    return at_exit


def _write_int_option(t: Tracee, value: int) -> Complete:
    """Complete a getsockopt() returning the int ``value`` as the kernel does: as much of it as
    the program's buffer holds, and the length written back."""
    optval, optlen_ptr = t.arg(3), t.arg(4)
    try:
        size = t.read_int(optlen_ptr)
    except OSError:
        return Complete(-errno.EFAULT)
    if size < 0:
        return Complete(-errno.EINVAL)
    data = struct.pack("=i", value)[: min(size, 4)]
    try:
        t.write(((optval, data), (optlen_ptr, struct.pack("=i", len(data)))))
    except OSError:
        return Complete(-errno.EFAULT)
    return Complete(0)
