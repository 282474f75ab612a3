"""Streams started ahead of need.

Starting a gRPC stream (HTTP/2 stream, headers, the agent's auth check and handler
start) costs about as much as a whole message round trip, and a program's connect()
waits for it. A ``CallPool`` keeps a few calls already started, with nothing sent on
them yet: opening a stream then costs only its ``open`` frame's round trip.

A spare call that has ended meanwhile (the agent went away, the channel broke) is
dropped, never handed out; a failure of a handed-out spare before anything was sent
on it is safe to retry on a fresh call (``TcpStream.open`` does that once).
The agent sees a spare as an open stream that has not sent its first frame yet; its
handler just waits. ``close()`` cancels the spares.

A stream whose connection ended cleanly on an agent that reuses streams comes back with
``give_back`` and is handed out before any other: a program making connection after
connection then starts no new stream at all. At most ``keep`` idle streams are kept.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class _Call(Protocol):
    def done(self) -> bool: ...

    def cancel(self) -> bool: ...


C = TypeVar("C", bound=_Call)


class CallPool(Generic[C]):
    def __init__(self, start: Callable[[], C], size: int, keep: int | None = None) -> None:
        self._start = start
        self._size = size
        self._keep = max(size, keep if keep is not None else size)
        self._spares: deque[C] = deque()
        self._refill_scheduled = False
        self._closed = False

    def take(self) -> tuple[C, bool]:
        """A started call, and whether it is a spare (True) or was started just now."""
        while self._spares:
            call = self._spares.popleft()
            if not call.done():
                self._schedule_refill()
                return call, True
        self._schedule_refill()
        return self._start(), False

    def give_back(self, call: C) -> None:
        """A used call that can carry the next stream (the peer waits for a new first frame)."""
        if self._closed or call.done() or len(self._spares) >= self._keep:
            call.cancel()
            return
        self._spares.appendleft(call)

    def fill(self) -> None:
        """Start the spares soon (from the running loop)."""
        self._schedule_refill()

    def fresh(self) -> C:
        """A call started now (to retry on after a spare failed)."""
        return self._start()

    def _schedule_refill(self) -> None:
        # After the caller has sent its first frame: starting a call costs CPU that
        # should not delay the stream being opened now.
        if not self._refill_scheduled and not self._closed and self._size > 0:
            self._refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        self._refill_scheduled = False
        while not self._closed and len(self._spares) < self._size:
            self._spares.append(self._start())

    def close(self) -> None:
        self._closed = True
        while self._spares:
            self._spares.popleft().cancel()
