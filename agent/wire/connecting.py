"""A non-blocking connect() whose answer is taken at once when it is there (both processes).

A connect to a nearby host (the same node, often; loopback always) has its answer by the time
connect() returns EINPROGRESS: the kernel ran the handshake in the same call. Waiting for the
event loop to report the socket writable costs a turn of the loop (~50 to 150 µs here) on the path
of the program's connect(); a poll() with no timeout costs ~2 µs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Callable


def relay_leg(family: int) -> socket.socket:
    """A non-blocking TCP socket for a relay's own leg of a program's connection: the agent's to the
    destination, or ktrace's end of the program's loopback connection.

    With TCP_NODELAY: the relay reads whatever the program (or the server) has written so far and
    sends it on at once, so Nagle's algorithm on its legs adds nothing but waiting. With Nagle on,
    a second small write that follows an unacknowledged first one (a request's head then its body,
    an answer's two parts) waited for the peer's delayed ACK, ~40 ms, where the program in a pod,
    whose own socket decides (Go's, curl's, asyncio's have TCP_NODELAY), sees no wait. The
    program's and the server's own sockets keep their own setting.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def reset_at_close(sock: socket.socket) -> None:
    """Make ``sock``'s close send RST rather than FIN (SO_LINGER on, timeout 0): how a relay passes
    a reset on, in either process."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def connect_now(sock: socket.socket, address: tuple[str, int] | tuple[str, int, int, int]) -> int:
    """connect() ``sock`` (non-blocking): 0 when connected, ``errno.EINPROGRESS`` while the
    answer is still to come (then ``loop.sock_connect`` with the same address waits for it), or
    the errno it failed with."""
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS and _writable_now(sock):
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return err


def _writable_now(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


# -- the parking lot's handshake (ktrace/tunnel/parking.py), completed by ktrace or by a same-host
# agent (agent/desk_line.py) --------------------------------------------------------------------

TCP_SYN_SENT = 2  # include/net/tcp_states.h
TCP_CLOSE = 7
# Event-loop turns taken at once before waiting by the clock: a blocking connect() that ktrace
# has just resumed is on its way into the kernel (microseconds), and the loop's timers round a
# sleep up to a millisecond (epoll's resolution).
_TURNS_AT_ONCE = 200


def tcp_state(sock: socket.socket) -> int:
    """The TCP state of ``sock`` (``tcpi_state``, the first byte of struct tcp_info)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def until_not_closed(sock: socket.socket, wait: float, waiting: Callable[[], bool]) -> int:
    """The TCP state of ``sock`` once it has left CLOSE (a blocking connect() that had not reached
    the kernel yet has parked it), or CLOSE after ``wait`` seconds or once ``waiting()`` is false."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    turns, delay = 0, 0.0005
    while True:
        state = tcp_state(sock)
        if state != TCP_CLOSE or not waiting() or loop.time() >= deadline:
            return state
        if turns < _TURNS_AT_ONCE:
            turns += 1
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


def end_family(program_family: int, has_ipv6_loopback: bool) -> int:
    """The family of the socket that completes a parked program socket's handshake: its own, but
    an AF_INET6 socket parks at ``::ffff:127.0.0.1`` where there is no IPv6 loopback."""
    if program_family == socket.AF_INET or has_ipv6_loopback:
        return program_family
    return socket.AF_INET


async def meet_parked(end: socket.socket, program: socket.socket, timeout: float | None) -> None:
    """Complete the parked ``program``'s handshake from ``end`` (a non-blocking socket bound to
    the parking address): the two SYNs cross. On loopback they meet within connect(), as a rule;
    otherwise this waits, up to ``timeout`` (None: as long as it takes). Raises OSError or
    TimeoutError."""
    target = handshake_target(program, end.family)
    err = connect_now(end, target)
    if err == errno.EINPROGRESS:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(end, target)
    elif err:
        raise OSError(err, os.strerror(err))


def handshake_target(program: socket.socket, family: int) -> tuple[str, int]:
    """Where a socket of ``family`` (``end_family``) connects to meet the parked ``program``: the
    program socket's own address, seen from that family. (Its peer cannot be asked: getpeername()
    says ENOTCONN in SYN_SENT.)"""
    own = program.getsockname()
    if family == program.family:
        return own[0], own[1]
    # An AF_INET6 socket at ::ffff:127.0.0.1: its own address is v4-mapped too.
    mapped = ipaddress.IPv6Address(own[0].split("%", 1)[0]).ipv4_mapped
    return str(mapped or "127.0.0.1"), own[1]
