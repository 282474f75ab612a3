"""A UDP session: the agent's UDP socket for one UDP socket of the program.

What the relays see of one (``Session``), what every session keeps (``SessionBase``), and the
sessions opened ahead of need (``SessionSpares``); sessions travel many to a ``DatagramSessions``
stream (udp_mux.py). ``send`` never blocks: datagrams wait in a bounded queue for the stream and
are dropped (and counted) when it is full, as a full socket buffer would drop them. Received
datagrams go to the receiver callback; agent socket errors (ICMP) go to the error callback, or to
the peer error callback when the agent knows which destination they are about; the session stays
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Protocol

import grpc
import grpc.aio
from ktrace_agent.wire import codec, rpc

from .types import Endpoint, TunnelError

log = logging.getLogger("ktrace.tunnel")

QUEUE_DATAGRAMS = 512
# A spare session taken is replaced this much later, unless none is left (SessionSpares).
REFILL_DELAY = 0.003

# Called for each datagram received; what it returns (if anything) is called once every
# datagram of the same message has been delivered (see ``SessionBase._deliver``).
Receiver = Callable[[Endpoint, bytes], Callable[[], None] | None]
AfterMessage = list[Callable[[], None]]


class Session(Protocol):
    """What the relays use of a UDP session (a ``udp_mux.MuxSession``)."""

    closed: asyncio.Event
    dropped: int

    @property
    def local(self) -> Endpoint: ...

    @property
    def local_port(self) -> int | None: ...

    def send(self, dest: Endpoint, payload: bytes) -> bool: ...

    def set_receiver(self, callback: Receiver) -> None: ...

    def set_error_receiver(self, callback: Callable[[TunnelError], None]) -> None: ...

    def set_peer_error_receiver(self, callback: Callable[[Endpoint, TunnelError], None]) -> None: ...

    async def until_answered(self) -> None: ...

    async def close(self) -> None: ...


class SessionBase:
    """What every session keeps: the agent's answer to ``open``, the agent socket's address,
    the receivers and their calls."""

    def __init__(self) -> None:
        self._local: Endpoint | None = None
        self._answered = asyncio.Event()
        self._open_error: TunnelError | None = None
        self._receiver: Receiver | None = None
        self._on_error: Callable[[TunnelError], None] | None = None
        self._on_peer_error: Callable[[Endpoint, TunnelError], None] | None = None
        self.dropped = 0
        self.closed = asyncio.Event()

    async def until_answered(self) -> None:
        """Wait for the agent's answer to ``open`` (or its refusal, or the stream's end)."""
        await self._answered.wait()

    @property
    def local(self) -> Endpoint:
        """The agent socket's address (known once the agent answered)."""
        if self._local is None:
            raise RuntimeError("the UDP session is not open yet")
        return self._local

    @property
    def local_port(self) -> int | None:
        """The agent socket's port, the one peers see (None until the agent answered, or if it refused)."""
        return self._local.port if self._local is not None else None

    @property
    def open_error(self) -> TunnelError | None:
        """Why the agent did not open the session (or the stream ended first), once answered."""
        return self._open_error

    def set_receiver(self, callback: Receiver) -> None:
        self._receiver = callback

    def set_error_receiver(self, callback: Callable[[TunnelError], None]) -> None:
        self._on_error = callback

    def set_peer_error_receiver(self, callback: Callable[[Endpoint, TunnelError], None]) -> None:
        """ICMP errors the agent's socket got for datagrams to a known peer."""
        self._on_peer_error = callback

    def _received_common(self, frame: rpc.UdpServerFrame, kind: str | None, after: AfterMessage) -> bool:
        """The frames of an open session (datagrams, the answer to ``open``, a peer's ICMP
        error); False for any other, which the caller handles. What the receiver leaves for
        later goes to ``after``, which the caller runs once the message is done."""
        if kind == "datagram":
            self._deliver(frame.datagram, after)
        elif kind == "opened" and not self._answered.is_set():
            self._local = codec.decode_address(frame.opened.local)
            self._answered.set()
        elif kind == "peer_failure":
            self._peer_failed(frame.peer_failure)
        else:
            return False
        return True

    def _deliver(self, datagram: rpc.Datagram, after: AfterMessage) -> None:
        # A resolver's A and AAAA answers often come in one message, and the program waits for
        # both: every datagram of a message reaches the program first, and what the receiver
        # does besides (the report's and the DNS map's parse, ~40 µs an answer) comes after
        # (``followed_up``), before ktrace's loop turns to anything else.
        if self._receiver is not None and not self.closed.is_set():
            source = codec.decode_address(datagram.peer)
            try:
                later = self._receiver(source, datagram.payload)
            except Exception:
                log.exception("UDP receiver callback failed")
                return
            if later is not None:
                after.append(later)

    def _peer_failed(self, failure: rpc.PeerFailure) -> None:
        if self._on_peer_error is not None:
            try:
                peer = codec.decode_address(failure.peer)
                self._on_peer_error(peer, codec.decode_failure(failure.failure))
            except Exception:
                log.exception("UDP peer error callback failed")

    def _notify(self, error: TunnelError) -> None:
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                log.exception("UDP error callback failed")


async def server_messages(call: rpc.UdpCall) -> AsyncIterator[rpc.UdpServerFrame]:
    """The agent's messages on a ``DatagramSessions`` call, until it ends it."""
    while True:
        message: object = await call.read()
        if message is grpc.aio.EOF:
            return
        assert isinstance(message, rpc.UdpServerFrame)
        yield message


async def end_call(call: rpc.UdpCall, tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel a UDP stream and wait for its reading and writing tasks to end."""
    call.cancel()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


@contextlib.contextmanager
def followed_up() -> Iterator[AfterMessage]:
    """The list a message's deliveries leave their follow-ups in (``SessionBase._deliver``), run
    once the message is handled, also when a malformed frame in it ends the stream."""
    after: AfterMessage = []
    try:
        yield after
    finally:
        for later in after:
            try:
                later()
            except Exception:
                log.exception("UDP receiver's follow-up failed")


class SessionSpares:
    """UDP sessions opened ahead of need, per address family.

    A program's first datagram on a new socket (each glibc lookup is one) would otherwise
    wait for the session's ``open`` frame to be written, for the agent to create its socket
    and for the datagram's own write behind it: ~0.5-0.7 ms here (docs/performance.md).
    A spare is a session whose ``open`` is already on its way or answered; the agent's
    socket for it is bound, and takes the program socket's datagrams when handed out. The
    program cannot tell: an agent socket's port is random either way, and nothing reaches
    a spare that a socket opened later would have received.

    Spares are kept only for families in use (the first session of a family is started
    when asked for); one that ended meanwhile (agent restarted, refused) is dropped.
    Replaced once no more than ``low`` are left, all at once: on a shared stream
    (udp_mux.py) their ``open`` frames then leave as one message, and the agent answers
    them with one.
    """

    def __init__(self, start: Callable[[int], Session], size: int, low: int | None = None) -> None:
        """``start(family)``: a new session whose ``open`` is on its way (``UdpMux.start``).
        ``low``: refill when this many are left (default: one less than ``size``, i.e. after
        every take)."""
        self._start = start
        self._size = size
        self._low = size - 1 if low is None else low
        self._spares: dict[int, list[Session]] = {}
        self._refills: dict[int, tuple[asyncio.Handle, bool]] = {}  # family -> (scheduled refill, urgent)
        self._closed = False

    def take(self, family: int) -> Session:
        """An open (or opening) session of ``family``: a spare if one is left."""
        spares = self._spares.setdefault(family, [])
        while spares:
            session = spares.pop(0)
            if not session.closed.is_set():
                if len(spares) <= self._low:
                    self._schedule_refill(family, urgent=not spares)
                return session
        self._schedule_refill(family, urgent=True)
        return self._start(family)

    def idle(self, family: int) -> tuple[Session, ...]:
        """The spares of ``family``, next to be handed out first (diagnostics, tests)."""
        return tuple(self._spares.get(family, ()))

    def _schedule_refill(self, family: int, urgent: bool) -> None:
        # Never before the caller has queued its datagram. Unless no spare is left, not
        # before its answer is likely back either: a new session costs both processes CPU
        # (~0.3 ms in the agent), which right away would compete with the datagram the
        # program waits for (seen on a lookup's timeline: the agent opened the new spare
        # before it read the AAAA question).
        if self._closed or self._size <= 0:
            return
        pending = self._refills.get(family)
        if pending is not None:
            handle, was_urgent = pending
            if was_urgent or not urgent:
                return
            handle.cancel()  # the delayed refill would come too late now
        loop = asyncio.get_running_loop()
        handle = loop.call_soon(self._refill, family) if urgent else loop.call_later(REFILL_DELAY, self._refill, family)
        self._refills[family] = (handle, urgent)

    def _refill(self, family: int) -> None:
        self._refills.pop(family, None)
        spares = self._spares[family]
        while not self._closed and len(spares) < self._size:
            spares.append(self._start(family))

    async def close(self) -> None:
        self._closed = True
        for handle, _urgent in self._refills.values():
            handle.cancel()
        self._refills.clear()
        spares = [session for family in self._spares.values() for session in family]
        self._spares.clear()
        for session in spares:
            await session.close()
