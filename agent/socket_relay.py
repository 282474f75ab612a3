"""Relay between two sockets the agent holds: the program's end of a handed-over connection and
the remote's (``handover.py`` says how the program's end gets here).

The same rules as the relay through the tunnel (ktrace's splice and ``tcp_relay``) so a program
cannot tell the two apart: each direction sends what it read before reading again (back-pressure
stays in the kernel's buffers); an EOF becomes ``shutdown(SHUT_WR)`` on the other socket; an
error on one side resets the other (SO_LINGER 0 at close), as the tunnel turns a reset into a
reset. The outcome uses the words of ktrace's report.

Each direction is driven by the event loop's reader and writer callbacks, not by a task awaiting
``sock_recv_into`` and ``sock_sendall``: a byte then crosses in the callback that saw it arrive,
where a task took a second loop turn (the future's wake-up) and two ``epoll_ctl`` per read (the
reader added and removed around each wait). On this path that is a program's request and its
answer, each crossing once (docs/performance.md, "Local agent").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .wire.errnos import errno_name

CHUNK = 256 * 1024
READS_PER_WAKE = 4


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


def reset_at_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def relay_sockets(program: socket.socket, remote: socket.socket) -> Relayed:
    """Relay until both directions ended or one side failed; the sockets stay open (the caller
    closes them: after a failure, SO_LINGER 0 is set on the one whose peer must see a reset).
    Cancelled, both are set to reset."""
    program.setblocking(False)
    remote.setblocking(False)
    loop = asyncio.get_running_loop()
    relayed = Relayed()
    done: asyncio.Future[None] = loop.create_future()
    finished: list[bool] = []

    def one_finished() -> None:
        finished.append(True)
        if len(finished) == 2 and not done.done():
            done.set_result(None)

    directions = (
        _Direction(loop, program, remote, relayed, done, one_finished, up=True),
        _Direction(loop, remote, program, relayed, done, one_finished, up=False),
    )
    try:
        for direction in directions:
            direction.start()
        await done
    except _Ended as ended:
        relayed.outcome = ended.outcome
        reset_at_close(ended.reset)
    except asyncio.CancelledError:
        reset_at_close(program)
        reset_at_close(remote)
        raise
    finally:
        # Neither socket may stay registered once the caller can close it: a descriptor number
        # closed while registered could be reused by a new socket.
        for direction in directions:
            direction.stop()
    return relayed


class _Direction:
    """One direction: read ``source`` while nothing is waiting to be sent, send to ``sink``; a
    send the kernel takes only in part waits for ``sink`` to be writable before reading again."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: socket.socket,
        sink: socket.socket,
        relayed: Relayed,
        done: asyncio.Future[None],
        finished: Callable[[], None],
        *,
        up: bool,
    ) -> None:
        self._loop = loop
        self._source = source
        self._sink = sink
        self._relayed = relayed
        self._done = done
        self._finished = finished
        self._up = up
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)
        self._pending = self._view[:0]  # read, not yet sent
        self._reading = False
        self._writing = False

    def start(self) -> None:
        self._read()  # what is already there crosses now, not a loop turn later

    def stop(self) -> None:
        self._want(reading=False, writing=False)

    def _want(self, *, reading: bool, writing: bool) -> None:
        if reading != self._reading:
            if reading:
                self._loop.add_reader(self._source, self._read)
            else:
                self._loop.remove_reader(self._source)
            self._reading = reading
        if writing != self._writing:
            if writing:
                self._loop.add_writer(self._sink, self._write)
            else:
                self._loop.remove_writer(self._sink)
            self._writing = writing

    def _read(self) -> None:
        # Read again at once after a complete send, as a task's loop would (a bulk transfer finds
        # more waiting), but a few times only: then the loop's other callbacks get their turn.
        for _ in range(READS_PER_WAKE):
            if self._done.done():
                return
            try:
                count = self._source.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._end(_Ended(_failed(exc, program_side=self._up), self._sink))
                return
            if not count:
                # Nothing is pending (a read only follows a complete send): the FIN can go now.
                with contextlib.suppress(OSError):
                    self._sink.shutdown(socket.SHUT_WR)
                self._want(reading=False, writing=False)
                self._finished()
                return
            self._pending = self._view[:count]
            if not self._send_pending():
                return
        self._want(reading=True, writing=False)

    def _write(self) -> None:
        if self._send_pending():
            self._read()

    def _send_pending(self) -> bool:
        """Send what is pending; True when all of it went, else the writer waits for the sink."""
        if self._done.done():
            return False
        try:
            sent = self._sink.send(self._pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._end(_Ended(_failed(exc, program_side=not self._up), self._source))
            return False
        if self._up:
            self._relayed.bytes_up += sent
        else:
            self._relayed.bytes_down += sent
        self._pending = self._pending[sent:]
        if self._pending:
            self._want(reading=False, writing=True)
            return False
        return True

    def _end(self, ended: _Ended) -> None:
        self._want(reading=False, writing=False)
        if not self._done.done():
            self._done.set_exception(ended)


def _failed(exc: OSError, *, program_side: bool) -> str:
    # ktrace's report words: a failure of the program's socket is "local", the remote's is its errno.
    if program_side:
        return f"reset: local {type(exc).__name__}"
    return f"reset: {errno_name(exc)}"
