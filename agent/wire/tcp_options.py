"""Which options of a program's TCP socket must act on the agent's socket to the destination, and
what the agent sets for them (pure: no I/O; both processes use it).

ktrace connects the program's socket on loopback (to itself, or to a same-host agent that took
that end over), so an option the program sets after connect() acts on that loopback leg only.
Most do not matter there (TCP_NODELAY: the relay's own legs always have it). Keepalive and the
user timeout do: they are how a program notices a peer that vanished without a word (a node
gone, a partition), and on loopback ktrace's end always answers the probes. Go turns keepalive
on for every connection (15 s idle, 15 s interval, 9 probes), right after connect() returns.

ktrace reads ``READ`` from the program's socket a little after the connection is established
(``ktrace/tracer/options_follow.py``) and tells the agent what ``news`` says; the agent makes the
calls ``settings`` lists. The defaults ktrace compares with are those of a fresh TCP socket of
its own: it runs in the program's network namespace, so its kernel's defaults are the program's
(``net.ipv4.tcp_keepalive_*`` are per namespace). A value equal to the default travels as 0,
"the agent's default": getsockopt cannot tell it from a value the program did not set, and in a
pod an unset value is the pod's default.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Final

from .values import TcpOptions

# (level, option) as getsockopt takes them, in the order ``from_readings`` reads the values.
# getsockopt answers the effective value: for TCP_KEEPIDLE/INTVL/CNT the namespace's sysctl
# until the socket sets its own (keepalive_time_when() and friends in include/net/tcp.h).
READ: Final = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
)

# What the agent's socket has before any message: its kernel's defaults, keepalive off.
NOTHING: Final = TcpOptions()


def from_readings(values: Sequence[int]) -> TcpOptions:
    """The options of the getsockopt answers to ``READ``, in its order."""
    keepalive, idle, interval, count, user_timeout = values
    return TcpOptions(bool(keepalive), idle, interval, count, user_timeout)


def on_the_wire(read: TcpOptions, defaults: TcpOptions) -> TcpOptions:
    """What travels for a socket whose options read ``read``: each number equal to the default is
    0 (the agent's default). ``user_timeout_ms``'s default is 0 already (none)."""
    return TcpOptions(
        read.keepalive,
        0 if read.idle_s == defaults.idle_s else read.idle_s,
        0 if read.interval_s == defaults.interval_s else read.interval_s,
        0 if read.count == defaults.count else read.count,
        read.user_timeout_ms,
    )


def news(read: TcpOptions, defaults: TcpOptions, told: TcpOptions = NOTHING) -> TcpOptions | None:
    """What to tell the agent of a connection whose socket's options read ``read`` now, having told
    it ``told`` before (``NOTHING``: never); None when that is nothing new. A program that sets
    nothing never sends a message: its options read as the defaults, which is ``NOTHING``."""
    wire = on_the_wire(read, defaults)
    return None if wire == told else wire


def settings(options: TcpOptions) -> tuple[tuple[int, int, int], ...]:
    """The setsockopt calls (level, option, value) that give the agent's socket ``options``, in
    order. The numbers come first, SO_KEEPALIVE last: switching keepalive on arms the timer with
    the idle time set by then (tcp_set_keepalive), so it is armed once, with the program's."""
    calls: list[tuple[int, int, int]] = []
    for (level, name), value in zip(READ[1:4], (options.idle_s, options.interval_s, options.count), strict=True):
        if value:  # 0: the agent's default (setsockopt refuses 0 for these)
            calls.append((level, name, value))
    calls.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, options.user_timeout_ms))
    calls.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(options.keepalive)))
    return tuple(calls)
