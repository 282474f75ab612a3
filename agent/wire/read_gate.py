"""Read a socket only when what is read can be sent on at once: the read gate (both processes).

A relay that reads eagerly (an asyncio transport reads whatever arrives into its stream
buffer, up to ~1 MiB here) holds a connection's data in its own memory while the data
waits for the send budget or for the previous frame's write, so memory grows with the number of
busy connections (docs/performance.md, "Memory with many connections").

``ReadGate.read`` first waits until the socket has data, asks the kernel how much
(``FIONREAD``), takes that much of the process-wide ``SendBudget`` (at most ``chunk``),
and only then reads, at most what it took. Each relay loop awaits its frame's write
before reading again, so while a connection cannot send, its data stays in the kernel's
socket buffers: the process holds at most one frame per connection (and the budget bounds
those together), and the sender feels the back-pressure of full socket buffers, as it
would talking to the destination directly.

A connection past the budget's ``max_wait`` reads unbudgeted (see budget.py: a stalled
stream must not hold the others back); it reads at most ``chunk`` then.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import socket
import termios

from .budget import SendBudget


def pending_bytes(sock: socket.socket) -> int:
    """Bytes in ``sock``'s receive queue (FIONREAD, a.k.a. SIOCINQ)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf, True)
    return buf[0]


class ReadGate:
    def __init__(self, sock: socket.socket, budget: SendBudget | None, chunk: int) -> None:
        self._sock = sock
        self._budget = budget
        self._chunk = chunk

    async def read(self) -> tuple[bytes, int]:
        """The next data and the budget taken for it; ``(b"", 0)`` at EOF. Raises OSError
        on a reset. Give the budget back with ``release`` once the data's write is done."""
        sock = self._sock
        while True:
            pending = pending_bytes(sock)
            if pending == 0:
                # Nothing queued: EOF, an error, or not yet readable. A peek tells them apart
                # without taking anything.
                try:
                    if not sock.recv(1, socket.MSG_PEEK):
                        return b"", 0
                except (BlockingIOError, InterruptedError):
                    await self._readable()
                continue
            want = min(pending, self._chunk)
            taken = await self._budget.take(want) if self._budget is not None else 0
            try:
                # Whatever arrived meanwhile stays queued: never more than was taken.
                data = sock.recv(taken or want)
            except (BlockingIOError, InterruptedError):
                self.release(taken)
                continue
            except BaseException:
                self.release(taken)
                raise
            if not data:  # cannot happen with data queued; treated as EOF all the same
                self.release(taken)
                return b"", 0
            if taken > len(data):
                self.release(taken - len(data))
                taken = len(data)
            return data, taken

    def release(self, taken: int) -> None:
        if taken and self._budget is not None:
            self._budget.give(taken)

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
