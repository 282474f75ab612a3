"""The program's keepalive and user timeout, carried to the agent's socket to the destination.

A redirected connection's own socket is connected on loopback (``ktrace/tunnel/parking.py``),
so an option the program sets on it after connect() acts on that leg only. Those that matter on
the path to the peer (``ktrace_agent.wire.tcp_options``: keepalive, TCP_USER_TIMEOUT) must act
on the agent's socket. ktrace stops no setsockopt: a stop costs ~60-170 µs here and Go makes
five right after every connect. It reads the options from the program's socket instead, a little
after the connection is established (``READ_AFTER``): Go, and most libraries, set them as soon as
connect() returns; the later read catches a program that sets them after a first exchange (a TLS
handshake, a login). When they differ from what the agent was told (at first: the kernel's
defaults), the agent is told (``Dialled.set_options``). A connection that ended before a read
costs only its place in a queue (``forget``), so short requests pay nothing.

Each read takes a new duplicate of the program's descriptor (pidfd_getfd, from the thread that
connected and by the descriptor number it connected with), checks it is still the same socket
(its inode: the number may have been closed and reused), reads, and closes the duplicate at
once. ktrace never keeps one: the kernel ends a connection (FIN) only when the last descriptor
of its socket closes, so a kept duplicate would stop the program's close() from ending it.

When the agent's socket times out (its keepalive or user timeout found the peer gone), the
program's socket is made to time out too, so the program sees ETIMEDOUT as in a pod rather than
a reset (``time_out``). ktrace's end of the program's connection (loopback) is never read again
and its receive buffer is cut to the kernel's minimum, so the window it offers closes; ktrace then
queues bytes on the program's socket (its duplicate) until some stay unsent, and gives it a 1 s
TCP_USER_TIMEOUT. Zero-window probes are answered, but the user timeout also bounds how long a
sender may probe a closed window (tcp_probe_timer): the program's kernel gives the connection up
with ETIMEDOUT ~1.5 s later, which its next (or blocked) read or write returns. The bytes reach
only ktrace's end, which is closed with a reset ``TIMEOUT_GRACE`` later. All of it works
unprivileged (silencing ktrace's end with a socket filter would not: Linux 6.x asks
CAP_NET_ADMIN to attach one to a TCP socket).

Not followed: a socket the program moved to another descriptor number (dup2, then close), or
whose connecting thread has exited by the time of the read: finding it then would take a scan
of /proc/PID/fd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from ktrace_agent.wire import tcp_options
from ktrace_agent.wire.connecting import reset_at_close
from ktrace_agent.wire.values import TcpOptions

from ktrace.tracer import linux
from ktrace.tracer.ports import Dialled
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import TraceeGone

log = logging.getLogger("ktrace.tcp")

# Seconds after the connection is established at which its options are read. Not sooner: with
# reads at 50 ms, scripts/bench's 1,000 concurrent connections (each lives under a second) took
# ~10 % longer (0.83-0.93 s against 0.75-0.80 s), ktrace reading sockets the program was busy
# with; a connection that ends before its first read costs nothing. Keepalive idle times and user
# timeouts are seconds to minutes (Go's: 15 s), so a second's delay in applying them is noise.
READ_AFTER: Final = (1.0, 5.0)

# The program's socket's TCP_USER_TIMEOUT once the agent's timed out: how long its kernel probes
# the closed window before it gives up (ETIMEDOUT).
GIVE_UP_MS: Final = 1000
# How long ktrace's silent end waits for the program's kernel to give up (~1.5 s) before it is
# closed with a reset (which a program socket still alive then sees: ECONNRESET).
TIMEOUT_GRACE: Final = 5.0
# Queued on the program's socket until its send queue holds bytes its peer's window has no room
# for; bounded (ktrace's end offers at most its largest receive window, a few MiB by default).
_FILL: Final = bytes(65536)
_FILL_LIMIT: Final = 64 << 20
# After a send found the queue full: this long without room means the window is closed (on
# loopback the peer's ACKs free room within microseconds while it has window left).
_STUCK_MS: Final = 5
_SIOCOUTQNSD: Final = 0x894B  # linux/sockios.h: bytes in the send queue not yet sent


@dataclass(eq=False, slots=True)
class _Followed:
    """A connection whose options are read (``reads`` so far), and the handler of its time-out."""

    follower: OptionsFollower
    tid: int  # the thread that connected
    fd: int  # the descriptor it connected
    family: int
    inode: int
    dialled: Dialled | None  # None once the connection ended (``forget``)
    told: TcpOptions = tcp_options.NOTHING
    reads: int = 0

    def __call__(self, end: socket.socket) -> None:
        """``Dialled.when_timed_out``'s handler (an object rather than a closure: one per connection)."""
        self.follower._timed_out(self, end)


@contextlib.contextmanager
def _program_socket(
    tid: int, fd: int, family: int, inode: int, thread_group: Callable[[int], int]
) -> Iterator[socket.socket | None]:
    """A new duplicate of the socket thread ``tid``'s descriptor ``fd`` holds, if it still is socket
    ``inode`` (None when it is not: closed, reused, or out of reach), closed as the block ends: a
    kept duplicate would keep the program's close() from ending the connection."""
    try:
        dup = linux.duplicate_fd(tid, fd, thread_group)
    except (OSError, TraceeGone):
        yield None
        return
    try:
        try:
            same = os.fstat(dup).st_ino == inode
        except OSError:
            same = False
        if not same:
            yield None
            return
        # Family, type and protocol given: CPython asks the kernel nothing more of the descriptor.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=dup)
        try:
            yield sock
        finally:
            sock.detach()  # closed below, exactly once
    finally:
        os.close(dup)


def read_options(tid: int, fd: int, family: int, inode: int, thread_group: Callable[[int], int]) -> TcpOptions | None:
    """The options of the socket that thread ``tid``'s descriptor ``fd`` holds, if it still is
    socket ``inode``; None when it is not (closed, reused) or cannot be looked at."""
    with _program_socket(tid, fd, family, inode, thread_group) as sock:
        if sock is None:
            return None
        try:
            return options_of(sock)
        except OSError:
            return None


def time_out(end: socket.socket, tid: int, fd: int, inode: int, thread_group: Callable[[int], int]) -> bool:
    """Make the program's socket (``fd`` of thread ``tid``, if still socket ``inode``), connected to
    ``end`` on loopback, time out as the agent's did (module docstring). False (nothing done that
    matters: ``end`` is to be reset as before) when it cannot be; else ``end`` must stay open, and
    unread, until the program's kernel gave up."""
    try:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    except OSError as exc:
        log.debug("cannot close the window of ktrace's end of a timed-out connection: %s", exc)
        return False
    with _program_socket(tid, fd, end.family, inode, thread_group) as sock:
        if sock is None:
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, GIVE_UP_MS)
            return _fill_until_stuck(sock)
        except OSError as exc:
            log.debug("cannot time the program's socket %d out: %s", inode, exc)
            return False


def _fill_until_stuck(sock: socket.socket) -> bool:
    """Queue bytes on ``sock`` until some stay unsent because its peer's window is closed: True
    then (its kernel probes the window and its user timeout runs). MSG_DONTWAIT per call: the
    duplicate shares the program's file, whose O_NONBLOCK is the program's own."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    sent = 0
    while sent < _FILL_LIMIT:
        try:
            sent += sock.send(_FILL, socket.MSG_DONTWAIT)
            continue
        except BlockingIOError:
            pass
        if not poller.poll(_STUCK_MS):
            break
    unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, struct.pack("i", 0)))[0]
    return bool(unsent > 0)


def kernel_defaults() -> TcpOptions:
    """The options of a fresh TCP socket: this network namespace's defaults, the program's too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return options_of(sock)


def options_of(sock: socket.socket) -> TcpOptions:
    """``sock``'s options that travel to the agent (``tcp_options.READ``), as getsockopt answers them."""
    return tcp_options.from_readings([sock.getsockopt(level, name) for level, name in tcp_options.READ])


class OptionsFollower:
    """Connections whose options are read ``read_after`` seconds after ``follow``.

    One timer for all of them: the delays are the same for every connection, so each read of a
    connection waits in a queue per read (FIFO: in the order the connections were followed), and
    the timer is set for the earliest head. A burst of connections costs no timer each."""

    def __init__(
        self,
        threads: ThreadGroups,
        read_after: tuple[float, ...] = READ_AFTER,
        read: Callable[[int, int, int, int, Callable[[int], int]], TcpOptions | None] = read_options,
    ) -> None:
        self._threads = threads
        self._read_after = read_after
        self._read = read
        self._defaults: TcpOptions | None = None
        self._followed: dict[int, _Followed] = {}  # id(dialled) -> (the dialled is held: its id stays its own)
        self._queues: list[collections.deque[tuple[float, _Followed]]] = [collections.deque() for _ in read_after]
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._silent: dict[socket.socket, asyncio.TimerHandle] = {}  # ktrace's ends of timed-out connections

    def follow(self, tid: int, fd: int, family: int, inode: int, dialled: Dialled) -> None:
        """``dialled`` carries the program socket ``inode`` (``fd`` of thread ``tid``) from now on."""
        followed = _Followed(self, tid, fd, family, inode, dialled)
        dialled.when_timed_out(followed)
        if self._read_after:
            self._followed[id(dialled)] = followed
            self._enqueue(followed)

    def forget(self, dialled: Dialled) -> None:
        """The connection ended: no more reads (its queued ones are skipped)."""
        followed = self._followed.pop(id(dialled), None)
        if followed is not None:
            followed.dialled = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for queue in self._queues:
            queue.clear()
        for followed in self._followed.values():
            followed.dialled = None
        self._followed.clear()
        for end, timer in list(self._silent.items()):
            timer.cancel()
            self._close_silent(end)

    # -- reads ------------------------------------------------------------------------------

    def _enqueue(self, followed: _Followed) -> None:
        """Queue ``followed``'s next read, or let it go after its last."""
        step = followed.reads
        if step >= len(self._read_after):
            self._followed.pop(id(followed.dialled), None)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + self._read_after[step] - (self._read_after[step - 1] if step else 0.0)
        self._queues[step].append((due, followed))
        if self._timer is None or due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(due, self._run)
            self._timer_at = due

    def _run(self) -> None:
        """Every read due by now, then the timer for the next one."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for queue in self._queues:
            while queue and queue[0][0] <= now:
                self._read_now(queue.popleft()[1])
        heads = [queue[0][0] for queue in self._queues if queue]
        if heads and self._timer is None:
            self._timer_at = min(heads)
            self._timer = loop.call_at(self._timer_at, self._run)

    def _read_now(self, followed: _Followed) -> None:
        followed.reads += 1
        dialled = followed.dialled
        if dialled is None:
            return  # ended meanwhile
        options = self._read(followed.tid, followed.fd, followed.family, followed.inode, self._threads.of)
        if options is None:
            self._followed.pop(id(dialled), None)  # gone, or out of reach for good
            return
        if self._defaults is None:
            self._defaults = kernel_defaults()
        news = tcp_options.news(options, self._defaults, followed.told)
        if news is not None:
            log.debug("connection of socket %d: the agent sets %s", followed.inode, news)
            followed.told = news
            dialled.set_options(news)
        self._enqueue(followed)

    # -- time-outs ----------------------------------------------------------------------------

    def _timed_out(self, followed: _Followed, end: socket.socket) -> None:
        """The agent's connection timed out: ``end`` (ktrace's end of the program's connection) is
        ours; the program's socket is timed out too, else reset as before."""
        if not time_out(end, followed.tid, followed.fd, followed.inode, self._threads.of):
            reset_at_close(end)
            end.close()
            return
        log.debug("connection of socket %d timed out: so does the program's", followed.inode)
        self._silent[end] = asyncio.get_running_loop().call_later(TIMEOUT_GRACE, self._close_silent, end)

    def _close_silent(self, end: socket.socket) -> None:
        self._silent.pop(end, None)
        reset_at_close(end)
        end.close()
