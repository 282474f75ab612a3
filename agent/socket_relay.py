"""Relay between two sockets the agent holds: the program's end of a handed-over connection and
the remote's (``handover.py`` says how the program's end gets here).

The same rules as the relay through the tunnel (ktrace's splice and ``tcp_relay``) so a program
cannot tell the two apart: each direction awaits its write before reading again (back-pressure
stays in the kernel's buffers); an EOF becomes ``shutdown(SHUT_WR)`` on the other socket; an
error on one side resets the other (SO_LINGER 0 at close), as the tunnel turns a reset into a
reset. The outcome uses the words of ktrace's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

from .wire.connecting import reset_at_close
from .wire.errnos import errno_name
from .wire.pumps import run_both

CHUNK = 256 * 1024


@dataclass
class Relayed:
    bytes_up: int = 0  # program → remote
    bytes_down: int = 0
    outcome: str = ""  # "" when both directions ended with a FIN


class _Ended(Exception):
    def __init__(self, outcome: str, reset: socket.socket) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.reset = reset  # the socket whose peer must see a reset


async def relay_sockets(program: socket.socket, remote: socket.socket) -> Relayed:
    """Relay until both directions ended or one side failed; the sockets stay open (the caller
    closes them: after a failure, SO_LINGER 0 is set on the one whose peer must see a reset).
    Cancelled, both are set to reset."""
    program.setblocking(False)
    remote.setblocking(False)
    relayed = Relayed()
    try:
        await run_both(
            _pump(program, remote, relayed, up=True),
            _pump(remote, program, relayed, up=False),
        )
    except _Ended as ended:
        relayed.outcome = ended.outcome
        reset_at_close(ended.reset)
    except asyncio.CancelledError:
        reset_at_close(program)
        reset_at_close(remote)
        raise
    return relayed


async def _pump(source: socket.socket, sink: socket.socket, relayed: Relayed, *, up: bool) -> None:
    loop = asyncio.get_running_loop()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while True:
        try:
            count = await loop.sock_recv_into(source, buffer)
        except OSError as exc:
            raise _Ended(_failed(exc, program_side=up), sink) from None
        if not count:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)  # sock_sendall returned: nothing is left to flush
            return
        try:
            await loop.sock_sendall(sink, view[:count])
        except OSError as exc:
            raise _Ended(_failed(exc, program_side=not up), source) from None
        if up:
            relayed.bytes_up += count
        else:
            relayed.bytes_down += count


def _failed(exc: OSError, *, program_side: bool) -> str:
    # ktrace's report words: a failure of the program's socket is "local", the remote's is its errno.
    if program_side:
        return f"reset: local {type(exc).__name__}"
    return f"reset: {errno_name(exc)}"
