"""Records out on a ``SOCK_SEQPACKET`` line, in order, whether or not the peer reads in time
(the desk line's two ends: agent/desk_line.py, ktrace/tunnel/desk.py).

The kernel holds the records a peer has not read yet up to the sender's SO_SNDBUF (a few
hundred small ones); a burst (1,000 connects at once in scripts/bench) fills it. What does not
fit waits here, each descriptor as a duplicate of its own (the caller may close its socket
meanwhile, and the number be reused), and goes out as the line becomes writable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
from collections.abc import Callable, Sequence


class RecordOutbox:
    """``send`` records (with descriptors) on ``sock``; ``on_broken`` hears a failure found while
    sending what waited (a failure found in ``send`` is its return value instead)."""

    def __init__(self, sock: socket.socket, on_broken: Callable[[OSError], None]) -> None:
        self._sock = sock
        self._on_broken = on_broken
        self._waiting: collections.deque[tuple[bytes, tuple[int, ...]]] = collections.deque()

    def send(self, record: bytes, fds: Sequence[int] = ()) -> OSError | None:
        """Send ``record`` now, or after those still waiting. Returns the error when the line has
        failed (nothing waits any more then); raises OSError when a descriptor cannot be
        duplicated to wait (EMFILE: this record is not sent, the line stays as it is)."""
        if not self._waiting:
            try:
                self._send_now(record, fds)
                return None
            except (BlockingIOError, InterruptedError):
                asyncio.get_running_loop().add_writer(self._sock, self._writable)
            except OSError as exc:
                self.clear()
                return exc
        dups: list[int] = []
        try:
            dups.extend(os.dup(fd) for fd in fds)
        except OSError:
            for fd in dups:
                os.close(fd)
            raise
        self._waiting.append((record, tuple(dups)))
        return None

    def _send_now(self, record: bytes, fds: Sequence[int]) -> None:
        if fds:
            socket.send_fds(self._sock, [record], list(fds))
        else:
            self._sock.send(record)

    def _writable(self) -> None:
        while self._waiting:
            record, fds = self._waiting[0]
            try:
                self._send_now(record, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.clear()
                self._on_broken(exc)
                return
            self._waiting.popleft()
            for fd in fds:
                os.close(fd)
        asyncio.get_running_loop().remove_writer(self._sock)

    def clear(self) -> None:
        """Drop what waits (the line is ending), with its descriptors."""
        for _, fds in self._waiting:
            for fd in fds:
                os.close(fd)
        self._waiting.clear()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_writer(self._sock)
