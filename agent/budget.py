"""A process-wide budget for data handed to gRPC and not yet sent.

gRPC completes a write once the message is queued in its transport, and each stream's
HTTP/2 window lets a frame or more queue per stream: with a thousand busy connections,
ktrace and the agent held ~3 bytes of memory per byte in flight (measured: 1,000
connections echoing 64 KiB each peaked at ~380 MB RSS in ktrace; docs/performance.md).
Every data write first takes its size from a ``SendBudget`` and gives it back when the
write completes, so what all streams together have queued stays near ``limit``.

A write never waits longer than ``max_wait``: a stream whose peer stopped reading keeps
its bytes until its window opens, and must not stall every other connection behind it;
past ``max_wait`` the write goes ahead unbudgeted (its own window still bounds it).
Waiters are served in order.
"""

from __future__ import annotations

import asyncio
from collections import deque


class SendBudget:
    def __init__(self, limit: int, max_wait: float) -> None:
        self.limit = limit
        self.max_wait = max_wait
        self._free = limit
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.overdrafts = 0  # writes that went ahead unbudgeted after max_wait

    @property
    def free(self) -> int:
        return self._free

    async def take(self, size: int) -> int:
        """Wait for ``size`` bytes of budget (at most ``limit``); returns what was taken,
        0 if ``max_wait`` passed first. Give it back with ``give``."""
        size = min(size, self.limit)
        if not self._waiters and self._free >= size:
            self._free -= size
            return size
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.max_wait):
                await asyncio.shield(granted)
        except TimeoutError:
            if granted.done():
                return size  # granted just as the wait ended
            self._waiters.remove(entry)
            self.overdrafts += 1
            self._grant()  # the head of the queue may have changed
            return 0
        except asyncio.CancelledError:
            if granted.done():
                self.give(size)
            else:
                self._waiters.remove(entry)
                self._grant()
            raise
        return size

    def give(self, size: int) -> None:
        self._free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._free >= self._waiters[0][0]:
            size, granted = self._waiters.popleft()
            self._free -= size
            granted.set_result(None)
