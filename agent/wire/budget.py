"""A process-wide budget for data handed to gRPC and not yet sent.

gRPC completes a write once the message is queued in its transport, and each stream's
HTTP/2 window lets a frame or more queue per stream: with a thousand busy connections,
ktrace and the agent held several bytes of memory per byte in flight (docs/performance.md).
Every data write first takes its size from a ``SendBudget`` and gives it back when the
write completes, so what all streams together have queued stays near ``limit``.

A write waits as long as the budget keeps coming back: the queue is moving, and a
thousand busy connections simply take turns (with the read gate, read_gate.py, their data
waits in the kernel meanwhile). Once ``max_wait`` has passed without any budget coming
back, the bytes are held by streams whose peers stopped reading, and a write goes ahead
unbudgeted (its own HTTP/2 window still bounds it): such streams must not stall every
other connection behind them. Waiters are served in order.
"""

from __future__ import annotations

import asyncio
from collections import deque

# Both processes' budget: TCP data queued in gRPC by all streams together, and how long a write
# waits when none comes back.
LIMIT = 16 * 1024 * 1024
MAX_WAIT = 0.5


class SendBudget:
    def __init__(self, limit: int = LIMIT, max_wait: float = MAX_WAIT) -> None:
        self.limit = limit
        self.max_wait = max_wait
        self._free = limit
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._last_give = 0.0  # event-loop time budget last came back
        self.overdrafts = 0  # writes that went ahead unbudgeted after max_wait without progress

    @property
    def free(self) -> int:
        return self._free

    @property
    def waiting(self) -> int:
        """Writes waiting for budget now."""
        return len(self._waiters)

    async def take(self, size: int) -> int:
        """Wait for ``size`` bytes of budget (at most ``limit``); returns what was taken,
        0 if ``max_wait`` passed with no budget coming back. Give it back with ``give``."""
        size = min(size, self.limit)
        if not self._waiters and self._free >= size:
            self._free -= size
            return size
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        entry = (size, granted)
        self._waiters.append(entry)
        started = loop.time()
        try:
            while True:
                deadline = max(started, self._last_give) + self.max_wait
                if deadline <= loop.time():
                    break
                try:
                    async with asyncio.timeout_at(deadline):
                        await asyncio.shield(granted)
                    return size
                except TimeoutError:
                    if granted.done():
                        return size  # granted just as the wait ended
        except asyncio.CancelledError:
            if granted.done():
                self.give(size)
            else:
                self._waiters.remove(entry)
                self._grant()
            raise
        if granted.done():
            return size
        self._waiters.remove(entry)
        self.overdrafts += 1
        self._grant()  # the head of the queue may have changed
        return 0

    def give(self, size: int) -> None:
        self._free += size
        if self._waiters:
            self._last_give = asyncio.get_running_loop().time()
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._free >= self._waiters[0][0]:
            size, granted = self._waiters.popleft()
            self._free -= size
            granted.set_result(None)
