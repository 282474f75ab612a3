"""One ``Connect`` stream: dial the destination, then relay bytes both ways.

Frame order (see the proto): the client sends ``open`` first, then ``data`` and at
most one ``shutdown_write``; the agent answers ``opened`` or ``failure``, then
``data``, ``eof`` (remote FIN) and ``reset`` (remote RST or a lost socket).

Backpressure: each direction is a loop that awaits its write (``sock_sendall`` on the
socket side, ``context.write`` on the gRPC side) before reading more, so at most
one chunk per direction is in flight and nothing buffers without bound. The remote
socket is read through a ``ReadGate`` (wire/read_gate.py): only once the send budget allows,
so data that cannot be sent yet stays in the kernel's socket buffers, not here.

The stream ends when both directions are finished, or at once on a reset. If the
client goes away (cancel), the remote connection is reset too (SO_LINGER 0), as a
program that dies with the socket open would cause.

Reuse: when the ``open`` frame asks for it (and this agent offers it), a connection that
ended cleanly (both directions finished, or the dial failed) does not end the stream: the
agent sends ``ended`` (after ``failure``: nothing) and waits for the client's next ``open``.
A new stream costs both processes its start, the auth check, headers and status (a
quarter of the gRPC operations of a short connection); a reset still ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Any

import grpc

from . import remote_options
from .dial import dial
from .handover import HandoverDesk, HandoverRefused
from .socket_relay import Relayed, relay_sockets
from .wire import DATA_CHUNK, codec, rpc
from .wire.budget import SendBudget
from .wire.connecting import reset_at_close
from .wire.errnos import describe
from .wire.pumps import run_both
from .wire.read_gate import ReadGate

log = logging.getLogger("ktrace_agent")

# Bytes per data frame at most; with one frame in flight per direction, what one connection
# holds here is bounded by ~2 MiB.
CHUNK = DATA_CHUNK
# How long a handed-over connection waits for ktrace to send the program's socket (it does so as
# soon as the program's connect completed, which it may delay as a program may).
HANDOVER_WAIT = 60.0


class _Protocol(Exception):
    """The client broke the frame order; ends this stream with INVALID_ARGUMENT."""


class TcpRelay:
    def __init__(
        self,
        context: rpc.TcpContext,
        connect_timeout: float,
        budget: SendBudget | None = None,
        *,
        reuse: bool = True,
        desk: HandoverDesk | None = None,
    ) -> None:
        self._context = context
        self._desk = desk
        self._budget = budget
        self._connect_timeout = connect_timeout
        self._reuse_offered = reuse
        self._sock: socket.socket | None = None
        # Per connection: the client sent shutdown_write; the stream stays for the next one.
        self._client_done = False
        self._reuse = False
        self._ticket: bytes | None = None  # this connection's, when it is handed over
        # A read of the client's next frame started while a handed-over connection was relayed
        # (``_follow_options``); the next ``_read_frame`` takes its frame.
        self._reading: asyncio.Future[Any] | None = None

    async def run(self) -> None:
        try:
            while True:
                first = await self._read_frame()
                if first is None:
                    return  # client gave up before opening (or after a connection): nothing to do
                if first.WhichOneof("kind") == "options":
                    continue  # about a connection that ended meanwhile (the proto's TcpClientFrame)
                if first.WhichOneof("kind") != "open":
                    raise _Protocol(f"first frame must be 'open', got {first.WhichOneof('kind')!r}")
                self._client_done = False
                self._reuse = self._reuse_offered and first.open.reuse
                if await self._open(first.open, handover=self._desk is not None and first.open.handover):
                    if self._ticket is not None:
                        if not await self._relay_handed_over(self._ticket):
                            return
                        if not self._reuse:
                            return
                        continue
                    clean = await self._relay()
                    if self._sock is not None:
                        self._sock.close()  # both directions ended: FIN went both ways
                        self._sock = None
                    if not clean:
                        return
                    if self._reuse:
                        await self._context.write(rpc.TcpServerFrame(ended=True))
                if not self._reuse:
                    return
        except _Protocol as exc:
            log.warning("Connect stream from %s: protocol error: %s", self._context.peer(), exc)
            self._abort_remote()
            await self._context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            self._abort_remote()  # the client cancelled: the remote sees a reset
            raise
        finally:
            if self._reading is not None:
                self._reading.cancel()
            if self._sock is not None:
                self._sock.close()
            if self._ticket is not None and self._desk is not None:
                self._desk.withdraw(self._ticket)  # ended before the socket came: a late one is closed

    async def _read_frame(self) -> rpc.TcpClientFrame | None:
        reading, self._reading = self._reading, None
        msg: object = await (reading if reading is not None else self._context.read())
        if msg is grpc.aio.EOF:
            return None
        assert isinstance(msg, rpc.TcpClientFrame)
        return msg

    async def _open(self, request: rpc.TcpOpen, *, handover: bool) -> bool:
        try:
            dest = codec.decode_address(request.destination)
        except codec.AddressError as exc:
            raise _Protocol(str(exc)) from None
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self._connect_timeout
        try:
            sock = await dial(dest, timeout)
        except (OSError, TimeoutError) as exc:
            failure = codec.encode_failure(exc, f"connect to {dest.ip}:{dest.port}")
            await self._context.write(rpc.TcpServerFrame(failure=failure))
            return False
        self._sock = sock
        ticket = self._ticket = self._desk.issue() if handover and self._desk is not None else None
        opened = rpc.TcpOpened(
            local=codec.encode_sockaddr(sock.getsockname()),
            peer=codec.encode_sockaddr(sock.getpeername()),
            handover_ticket=ticket or b"",
            handover_desk=self._desk.id if ticket is not None and self._desk is not None else b"",
        )
        # The answer first: the program's connect() waits for it; the socket buffers meanwhile.
        await self._context.write(rpc.TcpServerFrame(opened=opened))
        return True

    async def _relay_handed_over(self, ticket: bytes) -> bool:
        """Relay the program's socket, once ktrace sent it with ``ticket``, to the remote's; then
        ``relayed``. False when it did not come (the remote is reset and a ``reset`` sent).
        Cancelled (the client went away), both sockets are reset (``relay_sockets``)."""
        remote = self._sock
        assert remote is not None and self._desk is not None
        try:
            program = await self._desk.take(ticket, HANDOVER_WAIT)
            self._ticket = None  # spent
        except (TimeoutError, HandoverRefused) as exc:
            self._ticket = None
            self._abort_remote()
            remote.close()
            self._sock = None
            reason = ConnectionAbortedError(errno.ECONNABORTED, f"the program's socket was not handed over: {exc}")
            with contextlib.suppress(Exception):
                await self._context.write(rpc.TcpServerFrame(reset=codec.encode_failure(reason)))
            return False
        relay = asyncio.ensure_future(relay_sockets(program, remote))
        try:
            await self._follow_options(relay, remote)
            relayed = await relay
        except BaseException:
            relay.cancel()  # the client went away: relay_sockets resets both sockets
            with contextlib.suppress(BaseException):
                await relay
            raise
        finally:
            program.close()  # ktrace closes its copy after `relayed`: only then the last FIN or RST
            remote.close()
            self._sock = None
        await self._context.write(
            rpc.TcpServerFrame(
                relayed=rpc.TcpRelayed(
                    bytes_up=relayed.bytes_up, bytes_down=relayed.bytes_down, outcome=relayed.outcome
                )
            )
        )
        return True

    async def _follow_options(self, relay: asyncio.Future[Relayed], remote: socket.socket) -> None:
        """While the agent relays a handed-over connection, ktrace may still send ``options``
        (it reads them from the program's socket after the connect): apply them until the relay
        ends. Any other frame (the next ``open`` on a reused stream, the stream's end) and a read
        still pending then are left for ``run``, which reads them next: none is lost."""
        while not relay.done():
            reading: asyncio.Future[Any] = self._reading or asyncio.ensure_future(self._context.read())
            self._reading = reading
            await asyncio.wait((relay, reading), return_when=asyncio.FIRST_COMPLETED)
            if not reading.done() or reading.cancelled() or reading.exception() is not None:
                return
            frame = reading.result()
            if not isinstance(frame, rpc.TcpClientFrame) or frame.WhichOneof("kind") != "options":
                return
            self._reading = None
            remote_options.apply(remote, codec.decode_tcp_options(frame.options))

    async def _relay(self) -> bool:
        """Relay until both directions finished (True) or a reset (False, reset frame sent)."""
        try:
            await run_both(self._upstream(), self._downstream())
            return True
        except _Reset as reset:
            self._abort_remote()
            if self._sock is not None:
                self._sock.close()  # the RST now, not after the frame below is written
                self._sock = None
            if not self._context.done():
                with contextlib.suppress(Exception):  # the client may be gone already
                    await self._context.write(rpc.TcpServerFrame(reset=reset.failure))
            return False

    async def _upstream(self) -> None:
        """Client → remote."""
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        while True:
            frame = await self._read_frame()
            if frame is None:
                # The client always sends shutdown_write before closing its side; a
                # request stream that just ends means the client went away (cancel).
                raise _Reset(ConnectionAbortedError(errno.ECONNABORTED, "client went away"))
            kind = frame.WhichOneof("kind")
            if kind == "data":
                assert frame is not None
                try:
                    await loop.sock_sendall(sock, frame.data)
                except OSError as exc:
                    raise _Reset(exc) from None
            elif kind == "shutdown_write":
                self._client_done = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)  # sock_sendall returned: nothing is left to flush
                # Frames after this point would be a protocol error; we just stop reading.
                return
            elif kind == "options":
                remote_options.apply(sock, codec.decode_tcp_options(frame.options))
            elif kind == "open":
                raise _Protocol("second 'open' frame on an open stream")
            else:
                raise _Protocol(f"unknown frame kind {kind!r}")

    async def _downstream(self) -> None:
        """Remote → client."""
        assert self._sock is not None
        gate = ReadGate(self._sock, self._budget, CHUNK)
        while True:
            try:
                data, taken = await gate.read()
            except OSError as exc:
                raise _Reset(exc) from None
            if not data:
                # When the client had finished sending, the stream ends now and its OK status
                # (or, reused, the ``ended`` frame) says eof: one message less per connection
                # (an older client reads it so too).
                if not self._client_done:
                    await self._context.write(rpc.TcpServerFrame(eof=True))
                return
            try:
                await self._context.write(rpc.TcpServerFrame(data=data))
            finally:
                gate.release(taken)

    def _abort_remote(self) -> None:
        # RST at close; the socket is closed in run() once both loops have let go of it.
        if self._sock is not None:
            reset_at_close(self._sock)


class _Reset(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(describe(exc))
        self.failure = codec.encode_failure(exc)
