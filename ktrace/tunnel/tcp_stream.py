"""A TCP connection made by the agent, as one ``Connect`` stream, and its splice to a local socket.

``splice`` runs two loops, each awaiting its write before reading more (``sock_sendall``
locally, ``call.write`` towards the agent), so at most one chunk per direction is
in flight. The local socket is read through a ``ReadGate``: only once the send budget
allows and the previous frame is written, so a connection that cannot send leaves its
data in the kernel (and the program feels the back-pressure). Half-closes cross the
tunnel (local EOF → ``shutdown_write``; agent ``eof`` → ``shutdown(SHUT_WR)``) and so
do resets (agent ``reset`` → local RST via SO_LINGER 0; local reset → the stream is
cancelled, which the agent turns into an RST on its side).

Reuse (when the agent offers it): the ``open`` frame asks the agent to keep the stream;
a connection that ends cleanly (the agent's ``ended`` frame after our ``shutdown_write``,
or a dial ``failure``) gives the call back to the pool for the next connection. Anything
else (a reset, an abort, an error) ends the call as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio
from ktrace_agent.wire import DATA_CHUNK, codec, rpc
from ktrace_agent.wire.budget import SendBudget
from ktrace_agent.wire.connecting import reset_at_close
from ktrace_agent.wire.pumps import run_both
from ktrace_agent.wire.read_gate import ReadGate

from .call_pool import CallPool
from .handover import HandoverLine
from .types import Endpoint, TcpOptions, TcpStats, TunnelError, TunnelLost

log = logging.getLogger("ktrace.tunnel")

# Bytes per Data frame at most. gRPC's cost is mostly per message: 1 MiB frames move
# ~1.3x the bytes per second of 256 KiB ones here (docs/performance.md), and still
# leave at most one frame per direction in flight on a connection.
CHUNK = DATA_CHUNK
OPEN_MARGIN = 10.0  # seconds past the dial timeout before giving up on the agent

T = TypeVar("T")


def _refused(details: str | None) -> TunnelError:
    """The agent refused the stream (its cap on a client's streams): the program's connect fails
    with ENOBUFS, as when the kernel is out of resources, rather than waiting for a tunnel that
    works."""
    return TunnelError("ENOBUFS", f"the agent refused the stream: {details or 'RESOURCE_EXHAUSTED'}")


class _CallLost(TunnelLost):
    """The stream failed before the agent answered ``open``: nothing was dialled on it."""


class _Reset(Exception):
    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


# The outcome of a connection whose agent socket timed out (keepalive, TCP_USER_TIMEOUT).
TIMED_OUT = "reset: ETIMEDOUT"
TimedOut = Callable[[socket.socket], None]


def give_timed_out(handler: TimedOut | None, sock: socket.socket, outcome: str) -> bool:
    """After a connection ended with ``outcome``: when the agent's socket timed out and ``handler``
    is given, it takes ``sock`` (ktrace's end of the program's connection) over to time the
    program's socket out too (``ktrace/tracer/options_follow.py``); True then. Else the caller
    closes ``sock`` (a reset: SO_LINGER 0 is set by then)."""
    if handler is None or outcome != TIMED_OUT:
        return False
    try:
        handler(sock)
    except Exception:
        log.exception("timing the program's connection out failed; it is reset")
        return False
    return True


class TcpStream:
    """An open ``Connect`` stream. ``local``: the agent socket's address; ``peer``: the destination."""

    def __init__(
        self,
        call: rpc.TcpCall,
        local: Endpoint,
        peer: Endpoint,
        budget: SendBudget | None = None,
        reuse_in: CallPool[rpc.TcpCall] | None = None,
        handover: tuple[HandoverLine, bytes, bytes] | None = None,
        options: bool = False,
    ) -> None:
        self._call = call
        self._handover = handover  # the line to the agent, this connection's ticket, the desk's id
        self._budget = budget
        self._reuse_in = reuse_in  # the pool the call goes back to once the connection ended cleanly
        self._ended = False  # the agent said ``ended``
        self._given_back = False
        # The agent applies ``options`` frames (HandshakeReply.tcp_options); False once this
        # connection's last frame left (shutdown_write, a reset, the call given back).
        self._options = options
        # One write at a time on the call: ``set_options`` comes between the splice's own writes.
        self._writing = asyncio.Lock()
        self._sending: set[asyncio.Task[None]] = set()
        self._on_timed_out: TimedOut | None = None
        self.local = local
        self.peer = peer
        self.opened_at = time.monotonic()  # for the report: how long the connection lived
        # Sees every chunk the remote side sends (DNS over TCP answers, for the DNS map).
        self.observe_down: Callable[[bytes], None] | None = None

    @classmethod
    async def open(
        cls,
        calls: CallPool[rpc.TcpCall],
        dest: Endpoint,
        timeout: float | None,
        budget: SendBudget | None = None,
        *,
        reuse: bool = False,
        handover: HandoverLine | None = None,
        options: bool = False,
    ) -> TcpStream:
        """``reuse``: the agent offers stream reuse (``HandshakeReply.tcp_stream_reuse``);
        ``handover``: the agent will relay the connection itself (``splice`` hands it over);
        ``options``: the agent applies ``options`` frames (``HandshakeReply.tcp_options``)."""
        call, spare = calls.take()
        reuse_in = calls if reuse else None
        try:
            stream = await cls._open_on(call, dest, timeout, reuse_in, handover)
        except _CallLost:
            if not spare:
                raise
            # The spare (or reused) call had ended before anything reached the agent on it
            # (channel re-established, agent restarted): one retry on a call started now.
            stream = await cls._open_on(calls.fresh(), dest, timeout, reuse_in, handover)
        stream._budget = budget
        stream._options = options
        return stream

    @classmethod
    async def _open_on(
        cls,
        call: rpc.TcpCall,
        dest: Endpoint,
        timeout: float | None,
        reuse_in: CallPool[rpc.TcpCall] | None,
        handover: HandoverLine | None,
    ) -> TcpStream:
        timeout_ms = max(1, round(timeout * 1000)) if timeout is not None else 0
        frame = rpc.TcpClientFrame(
            open=rpc.TcpOpen(
                destination=codec.encode_address(dest),
                timeout_ms=timeout_ms,
                reuse=reuse_in is not None,
                handover=handover is not None,
            )
        )
        # The read is in flight while the write completes: the answer is taken as soon
        # as it arrives instead of one event-loop hand-off after the write's completion.
        reading = asyncio.ensure_future(call.read())
        try:
            await call.write(frame)
            # The agent answers within its dial timeout; a margin covers the round trip.
            deadline = timeout + OPEN_MARGIN if timeout is not None else None
            reply: object = await asyncio.wait_for(reading, deadline)
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _refused(exc.details()) from exc
            raise _CallLost("EIO", f"tunnel: {exc.code().name}: {exc.details()}") from exc
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            call.cancel()  # the call had already finished
            raise _CallLost("EIO", f"tunnel: stream ended before open ({exc})") from None
        except TimeoutError:
            call.cancel()
            raise TunnelError("ETIMEDOUT", f"no answer from the agent for {dest} in time") from None
        except BaseException:
            call.cancel()
            raise
        finally:
            if not reading.done():
                reading.cancel()
            elif not reading.cancelled():
                reading.exception()  # retrieved: an error here was handled above
        if reply is grpc.aio.EOF:
            status = await call.code()
            if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _refused(await call.details())
            raise _CallLost("EIO", f"agent ended the stream without an answer ({status.name})")
        assert isinstance(reply, rpc.TcpServerFrame)
        kind = reply.WhichOneof("kind")
        if kind == "failure":
            if reuse_in is not None:
                reuse_in.give_back(call)  # the agent waits for the next open on it
            else:
                call.cancel()
            raise codec.decode_failure(reply.failure)
        if kind != "opened":
            call.cancel()
            raise TunnelError("EIO", f"agent answered {kind!r} to open")
        local, peer = codec.decode_address(reply.opened.local), codec.decode_address(reply.opened.peer)
        ticket, desk = reply.opened.handover_ticket, reply.opened.handover_desk
        given = (handover, ticket, desk) if handover and ticket else None
        return cls(call, local, peer, reuse_in=reuse_in, handover=given)

    async def abort(self) -> None:
        """End the stream now; the agent resets its connection."""
        self._options = False
        if not self._given_back:  # else the call carries another connection now
            self._call.cancel()

    def set_options(self, options: TcpOptions) -> None:
        """An ``options`` frame for the agent, written after the splice's write in flight (if any)."""
        if not self._options:
            return
        task = asyncio.get_running_loop().create_task(self._write_options(options))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def when_timed_out(self, handler: TimedOut) -> None:
        self._on_timed_out = handler

    async def _write_options(self, options: TcpOptions) -> None:
        frame = rpc.TcpClientFrame(options=codec.encode_tcp_options(options))
        async with self._writing:
            if not self._options:
                return  # the connection's last frame left meanwhile: the agent would take it for the next one's
            # A failed write is the splice's to see (its next read or write fails the same way).
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                await self._call.write(frame)

    def take(self, sock: socket.socket) -> None:
        """Nothing to do before ``splice`` (``Connection.take``)."""

    async def splice(self, sock: socket.socket) -> TcpStats:
        """Relay between the local connection and the stream until both directions end or one
        resets; the socket is closed (with RST after a reset) when this returns."""
        sock.setblocking(False)
        stats = TcpStats()
        try:
            if self._handover is not None:
                await self._relayed_by_agent(sock, stats, *self._handover)
            else:
                await run_both(self._up(sock, stats), self._down(sock, stats))
                if self._ended:
                    self._give_back()
        except _Reset as reset:
            stats.outcome = reset.outcome
            self._options = False
            self._call.cancel()
            reset_at_close(sock)
        except grpc.aio.AioRpcError as exc:
            stats.outcome = f"error: {exc.code().name}: {exc.details()}"
            reset_at_close(sock)
        except asyncio.CancelledError:
            stats.outcome = "aborted"
            self._call.cancel()
            reset_at_close(sock)
            raise
        finally:
            self._options = False
            if not give_timed_out(self._on_timed_out, sock, stats.outcome):
                sock.close()  # only now: both directions (or the agent's relay) are done with it
        return stats

    def _give_back(self) -> None:
        """The connection ended cleanly on a reused stream: the call carries the next one."""
        self._options = False
        if self._reuse_in is not None:
            if any(not task.done() for task in self._sending):
                # An options frame is still being written: the next connection's `open` could not
                # follow it on the call (one write at a time). Rare: the stream ends instead.
                self._call.cancel()
                return
            self._given_back = True
            self._reuse_in.give_back(self._call)

    async def _relayed_by_agent(
        self, sock: socket.socket, stats: TcpStats, line: HandoverLine, ticket: bytes, desk: bytes
    ) -> None:
        """The agent relays ``sock`` itself: send it with the ticket, then wait for ``relayed``.
        Our copy stays open until then, so a reset still comes from here if the agent is lost
        (the kernel only sends FIN or RST once every copy is closed)."""
        try:
            await line.give(ticket, desk, sock)
        except OSError as exc:
            raise _Reset(f"error: handing the connection to the agent failed: {exc}") from None
        frame: object = await self._call_op(self._call.read())
        if frame is grpc.aio.EOF:
            code = await self._call.code()
            raise _Reset(f"error: {code.name}: {await self._call.details() or 'the agent ended the stream'}")
        assert isinstance(frame, rpc.TcpServerFrame)
        kind = frame.WhichOneof("kind")
        if kind == "reset":
            raise _Reset(f"reset: {frame.reset.errno_name or 'ECONNRESET'}")
        if kind != "relayed":
            raise _Reset(f"error: unexpected {kind!r} frame from agent")
        stats.bytes_up, stats.bytes_down = frame.relayed.bytes_up, frame.relayed.bytes_down
        if frame.relayed.outcome:
            stats.outcome = frame.relayed.outcome
            reset_at_close(sock)  # the agent set it on the shared socket already; our close sends it
        else:
            self._give_back()

    async def _call_op(self, op: Awaitable[T]) -> T:
        """Await a call operation; after ``abort()`` grpc raises CancelledError in it, which
        must not look like this task being cancelled (a TaskGroup ignores a task that ends cancelled)."""
        try:
            return await op
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise _Reset("aborted") from None
        except asyncio.InvalidStateError:
            raise _Reset("aborted") from None

    async def _up(self, sock: socket.socket, stats: TcpStats) -> None:
        gate = ReadGate(sock, self._budget, CHUNK)
        while True:
            try:
                data, taken = await gate.read()
            except OSError as exc:
                raise _Reset(f"reset: local {type(exc).__name__}") from None
            if not data:
                # No done_writing(): the agent reads nothing after this frame, and the call
                # ends with its status; one gRPC operation less per connection.
                async with self._writing:
                    self._options = False  # the agent reads no frame of this connection's after it
                    await self._call_op(self._call.write(rpc.TcpClientFrame(shutdown_write=True)))
                return
            try:
                async with self._writing:
                    await self._call_op(self._call.write(rpc.TcpClientFrame(data=data)))
            finally:
                gate.release(taken)
            stats.bytes_up += len(data)

    async def _down(self, sock: socket.socket, stats: TcpStats) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame: object = await self._call_op(self._call.read())
            if frame is grpc.aio.EOF:
                code = await self._call.code()
                if code != grpc.StatusCode.OK:
                    details = await self._call.details()
                    raise _Reset(f"error: {code.name}: {details}")
                # An OK end is the remote's FIN too (the agent sends no eof frame when we had
                # finished sending): the splice then closes the local socket.
                return
            assert isinstance(frame, rpc.TcpServerFrame)
            kind = frame.WhichOneof("kind")
            if kind == "data":
                if self.observe_down is not None:
                    self.observe_down(frame.data)
                try:
                    await loop.sock_sendall(sock, frame.data)
                except OSError as exc:
                    raise _Reset(f"reset: local {type(exc).__name__}") from None
                stats.bytes_down += len(frame.data)
            elif kind == "eof":
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)  # sock_sendall returned: nothing is left to flush
            elif kind == "ended" and self._reuse_in is not None:
                # Both directions are finished on the agent (it read our shutdown_write): the
                # remote's FIN, if no eof frame said it, and nothing follows for this connection.
                self._ended = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                return
            elif kind == "reset":
                raise _Reset(f"reset: {frame.reset.errno_name or 'ECONNRESET'}")
            else:
                raise _Reset(f"error: unexpected {kind!r} frame from agent")
