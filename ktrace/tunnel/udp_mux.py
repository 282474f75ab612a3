"""UDP sessions multiplexed on a few long-lived ``DatagramSessions`` streams.

The protocol is in ktrace_agent/udp_mux.py. A ``MuxSession`` (udp_session.py's ``Session``) has
its own agent socket with its own random port, ``send`` that never blocks, and receivers.
Opening one is a frame on a stream that is already there, closing one is a frame too, where a
stream per session would cost a stream start (HTTP/2 headers both ways, the agent's auth check
and handler start) and end, in both processes, for every program socket (every glibc lookup).

Frames of all sessions of a stream wait in one queue and the ones waiting together leave
as one ``frames`` message (ktrace_agent/wire/batching.py: a resolver's A and AAAA questions,
another session's ``open``). Every session keeps at most ``QUEUE_DATAGRAMS`` datagrams waiting
(more are dropped and counted, as a full socket buffer drops them). A session is put on the
first stream with room (``MAX_SESSIONS_PER_STREAM``, the agent's cap); another stream starts
when all are full. A stream that ends (the agent went away, the tunnel broke, a protocol error)
ends every session on it at once: those not answered yet hear ``TunnelLost``; the next session
starts a new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

import grpc
import grpc.aio
from ktrace_agent.wire import MAX_SESSIONS_PER_STREAM, batching, codec, rpc

from .types import Endpoint, TunnelError, TunnelLost
from .udp_session import QUEUE_DATAGRAMS, AfterMessage, SessionBase, end_call, followed_up, server_messages

log = logging.getLogger("ktrace.tunnel")


class _StreamLost(TunnelLost):
    """The stream ended before the agent answered the session's ``open``."""


class MuxSession(SessionBase):
    """One program socket's session on a shared stream (made by ``UdpMux.start``)."""

    def __init__(self, stream: _MuxStream, number: int) -> None:
        super().__init__()
        self._stream = stream
        self.number = number
        self.waiting = 0  # datagrams queued on the stream, not yet written

    def send(self, dest: Endpoint, payload: bytes) -> bool:
        """Queue one datagram for ``dest``; False when dropped (queue full or session closed)."""
        if self.closed.is_set() or self.waiting >= QUEUE_DATAGRAMS:
            self.dropped += 1
            return False
        frame = rpc.UdpClientFrame(
            datagram=rpc.Datagram(peer=codec.encode_address(dest), payload=payload), session=self.number
        )
        self.waiting += 1
        self._stream.put(frame, self)
        return True

    async def close(self) -> None:
        """Tell the agent to close the session's socket (once; the stream goes on)."""
        if not self.closed.is_set():
            self.closed.set()
            self._stream.forget(self, tell_agent=True)
        if not self._answered.is_set():
            self._open_error = _StreamLost("EIO", "the session was closed before the agent answered")
            self._answered.set()

    # --- called by the stream ---

    def received(self, frame: rpc.UdpServerFrame, after: AfterMessage) -> None:
        kind = frame.WhichOneof("kind")
        if self._received_common(frame, kind, after):
            return
        if kind == "refused":
            self._end(codec.decode_failure(frame.refused))
        elif kind == "failure":
            self._notify(codec.decode_failure(frame.failure))

    def stream_ended(self, why: str) -> None:
        if not self._answered.is_set():
            self._end(_StreamLost("EIO", why))
        else:
            self.closed.set()

    def _end(self, error: TunnelError) -> None:
        """The session is over without having been open: refused, or its stream ended first."""
        notify = not self.closed.is_set()
        self.closed.set()
        self._stream.forget(self, tell_agent=False)
        if not self._answered.is_set():
            self._open_error = error
            self._answered.set()
        if notify:
            self._notify(error)


class _MuxStream:
    def __init__(self, call: rpc.UdpCall, on_end: Callable[[_MuxStream], None]) -> None:
        self._call = call
        self._on_end = on_end
        self._numbers = itertools.count(1)
        self.sessions: dict[int, MuxSession] = {}
        self._queue: asyncio.Queue[tuple[rpc.UdpClientFrame, MuxSession | None]] = asyncio.Queue()
        self.ended = False
        self._tasks = (asyncio.create_task(self._write_loop()), asyncio.create_task(self._read_loop()))

    @property
    def full(self) -> bool:
        return self.ended or len(self.sessions) >= MAX_SESSIONS_PER_STREAM

    def open_session(self, family: int) -> MuxSession:
        session = MuxSession(self, next(self._numbers))
        self.sessions[session.number] = session
        self.put(rpc.UdpClientFrame(open=rpc.UdpOpen(family=codec.wire_family(family)), session=session.number), None)
        return session

    def put(self, frame: rpc.UdpClientFrame, sender: MuxSession | None) -> None:
        self._queue.put_nowait((frame, sender))

    def forget(self, session: MuxSession, tell_agent: bool) -> None:
        if self.sessions.pop(session.number, None) is not None and tell_agent and not self.ended:
            self.put(rpc.UdpClientFrame(close=True, session=session.number), None)

    async def _write_loop(self) -> None:
        try:
            while True:
                first = self._taken(*await self._queue.get())
                await self._call.write(batching.pack_client(batching.gather(first, self._next_waiting)))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError) as exc:
            self._ended(f"tunnel: {exc}")  # the reader sees why too; make sure it stops
            self._call.cancel()

    @staticmethod
    def _taken(frame: rpc.UdpClientFrame, sender: MuxSession | None) -> rpc.UdpClientFrame:
        if sender is not None:
            sender.waiting -= 1
        return frame

    def _next_waiting(self) -> rpc.UdpClientFrame | None:
        if self._queue.empty():
            return None
        return self._taken(*self._queue.get_nowait())

    async def _read_loop(self) -> None:
        why = "the agent ended the stream"
        try:
            async for message in server_messages(self._call):
                with followed_up() as after:
                    for frame in batching.unpack(message):
                        self._dispatch(frame, after)
        except grpc.aio.AioRpcError as exc:
            why = f"tunnel: {exc.code().name}: {exc.details()}"
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.debug("UDP sessions stream ended: %s", why)
        except Exception as exc:  # a malformed frame from the agent (an address): end the stream
            why = f"malformed frame from the agent: {exc}"
            log.warning("UDP sessions stream: %s", why)
            self._call.cancel()
        finally:
            self._ended(why)

    def _dispatch(self, frame: rpc.UdpServerFrame, after: AfterMessage) -> None:
        session = self.sessions.get(frame.session)
        if session is not None:  # else closed here already: what was on its way is dropped
            session.received(frame, after)

    def _ended(self, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        self._on_end(self)
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            session.stream_ended(why)

    async def close(self) -> None:
        self._ended("ktrace closed the stream")
        await end_call(self._call, self._tasks)


class UdpMux:
    """The ``DatagramSessions`` streams of one agent channel, and the sessions on them."""

    def __init__(self, start_call: Callable[[], rpc.UdpCall]) -> None:
        self._start_call = start_call
        self._streams: list[_MuxStream] = []
        self._closed = False

    def prime(self) -> None:
        """Start the first stream now, so the first session does not wait for it."""
        if not self._streams and not self._closed:
            self._new_stream()

    def start(self, family: int) -> MuxSession:
        """A session whose ``open`` is on its way; ``send`` works at once. If the agent refuses
        it, or the stream ends first, the error receiver hears why and the session closes."""
        stream = next((s for s in self._streams if not s.full), None) or self._new_stream()
        return stream.open_session(family)

    async def open(self, family: int) -> MuxSession:
        """A session the agent has answered; raises ``TunnelError`` if it refused. A stream lost
        before the answer (one that was there before the tunnel broke) is retried once."""
        for attempt in range(2):
            session = self.start(family)
            try:
                await session.until_answered()
            except BaseException:
                await session.close()
                raise
            error = session.open_error
            if error is None:
                return session
            if not isinstance(error, _StreamLost) or attempt:
                raise error
        raise AssertionError("unreachable")

    def _new_stream(self) -> _MuxStream:
        # Once closed (ktrace ends), a late session still gets a stream, on the closed channel:
        # it fails at once and its sessions hear it, like any lost stream; never an exception
        # into the relay's callbacks.
        stream = _MuxStream(self._start_call(), self._stream_ended)
        if not self._closed:
            self._streams.append(stream)
        return stream

    def _stream_ended(self, stream: _MuxStream) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)

    async def close(self) -> None:
        self._closed = True
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.close()
