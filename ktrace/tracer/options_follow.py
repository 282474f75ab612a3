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
costs only its timer, cancelled at its end (``forget``), so short requests pay nothing.

Each read takes a new duplicate of the program's descriptor (pidfd_getfd, from the thread that
connected and by the descriptor number it connected with), checks it is still the same socket
(its inode: the number may have been closed and reused), reads, and closes the duplicate at
once. ktrace never keeps one: the kernel ends a connection (FIN) only when the last descriptor
of its socket closes, so a kept duplicate would stop the program's close() from ending it.

Not followed: a socket the program moved to another descriptor number (dup2, then close), or
whose connecting thread has exited by the time of the read: finding it then would take a scan
of /proc/PID/fd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ktrace_agent.wire import tcp_options
from ktrace_agent.wire.values import TcpOptions

from ktrace.tracer import linux
from ktrace.tracer.ports import Dialled
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import TraceeGone

log = logging.getLogger("ktrace.tcp")

# Seconds after the connection is established at which its options are read.
READ_AFTER: Final = (0.05, 1.0)


@dataclass(eq=False, slots=True)
class _Followed:
    tid: int  # the thread that connected
    fd: int  # the descriptor it connected
    family: int
    inode: int
    dialled: Dialled
    told: TcpOptions = tcp_options.NOTHING
    reads: int = 0  # done so far (an index into READ_AFTER)
    timer: asyncio.TimerHandle | None = None


def read_options(tid: int, fd: int, family: int, inode: int, thread_group: Callable[[int], int]) -> TcpOptions | None:
    """The options of the socket that thread ``tid``'s descriptor ``fd`` holds, if it still is
    socket ``inode``; None when it is not (closed, reused) or cannot be looked at."""
    try:
        dup = linux.duplicate_fd(tid, fd, thread_group)
    except (OSError, TraceeGone):
        return None
    try:
        if os.fstat(dup).st_ino != inode:
            return None
        # Family, type and protocol given: CPython asks the kernel nothing more of the descriptor.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=dup)
        try:
            return tcp_options.from_readings([sock.getsockopt(level, name) for level, name in tcp_options.READ])
        finally:
            sock.detach()  # closed below, exactly once
    except OSError:
        return None
    finally:
        os.close(dup)


def kernel_defaults() -> TcpOptions:
    """The options of a fresh TCP socket: this network namespace's defaults, the program's too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return tcp_options.from_readings([sock.getsockopt(level, name) for level, name in tcp_options.READ])


class OptionsFollower:
    """Connections whose options are read ``read_after`` seconds after ``follow``."""

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

    def follow(self, tid: int, fd: int, family: int, inode: int, dialled: Dialled) -> None:
        """``dialled`` carries the program socket ``inode`` (``fd`` of thread ``tid``) from now on."""
        followed = _Followed(tid, fd, family, inode, dialled)
        self._followed[id(dialled)] = followed
        self._schedule(followed)

    def forget(self, dialled: Dialled) -> None:
        """The connection ended: no more reads."""
        followed = self._followed.pop(id(dialled), None)
        if followed is not None and followed.timer is not None:
            followed.timer.cancel()

    def close(self) -> None:
        for followed in self._followed.values():
            if followed.timer is not None:
                followed.timer.cancel()
        self._followed.clear()

    def _schedule(self, followed: _Followed) -> None:
        if followed.reads >= len(self._read_after):
            self._followed.pop(id(followed.dialled), None)
            return
        wait = self._read_after[followed.reads] - (self._read_after[followed.reads - 1] if followed.reads else 0.0)
        followed.timer = asyncio.get_running_loop().call_later(max(wait, 0.0), self._read_now, followed)

    def _read_now(self, followed: _Followed) -> None:
        followed.timer = None
        followed.reads += 1
        if self._followed.get(id(followed.dialled)) is not followed:
            return
        options = self._read(followed.tid, followed.fd, followed.family, followed.inode, self._threads.of)
        if options is None:
            self._followed.pop(id(followed.dialled), None)  # gone, or out of reach for good
            return
        if self._defaults is None:
            self._defaults = kernel_defaults()
        news = tcp_options.news(options, self._defaults, followed.told)
        if news is not None:
            log.debug("connection of socket %d: the agent sets %s", followed.inode, news)
            followed.told = news
            followed.dialled.set_options(news)
        self._schedule(followed)
