"""A keyed line to the desk: a same-host client's connections, dialled and relayed without gRPC.

On a ticket line (``handover.py``) each connection still costs a ``Connect`` stream's ``open``
and ``opened``: two gRPC messages, each a hand-off between grpcio's poller thread and the event
loop in both processes, on the path of the program's connect(). A client that knows the desk's
key (``HandshakeReply.tcp_desk_key``, given only to an authenticated handshake) says it first
on its line, then asks for connections there: ``DeskRequest.open`` → the agent dials →
``DeskAnswer.opened`` (or ``failure``); ``attach`` with the program's end (``SCM_RIGHTS``) → the
agent relays the two sockets (``socket_relay.py``) → ``relayed`` at the end. Or, with
``complete``, the client sends a socket bound to its parking address and the program's parked
socket along with ``open``: the agent answers ``opened`` (first: the client must know before the
program can), completes the program's connect itself (``_complete``), answers ``attached`` and
relays, so the program's first byte does not wait for the client. Each record is one message
(``SOCK_SEQPACKET`` keeps their bounds); ``id`` is the client's name for a connection.

Faults stay on their line: a malformed record or a broken order ends the line and everything
on it, as a malformed frame ends its gRPC stream, never the agent. When the line ends (the
client died, or closed it), every connection on it is reset, as when a ``Connect`` stream is
cancelled: the client holds its copy of each program socket until ``relayed``, so a lost agent
resets the program's connections from the client's side too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from . import remote_options
from .dial import finish_dial, start_dial
from .socket_relay import relay_sockets
from .wire import codec, rpc
from .wire.connecting import TCP_SYN_SENT, meet_parked, reset_at_close, until_not_closed
from .wire.outbox import RecordOutbox
from .wire.values import Endpoint

log = logging.getLogger("ktrace_agent")

# The largest record a client sends (an ``open`` with an IPv6 address is ~40 bytes).
MAX_RECORD = 512
MAX_FDS = 2  # `complete`: the socket bound to the parking address and the program's
# How long a dialled connection waits for the program's socket (``attach``): the client sends it
# as soon as the program's connect() completed, which a program may delay (tcp_relay's wait).
ATTACH_WAIT = 60.0


def is_tcp(sock: socket.socket) -> bool:
    return sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)


class LineBroken(Exception):
    """A record this line cannot go on from: malformed, out of order, or with stray descriptors."""


@dataclass
class _Connection:
    remote: socket.socket
    # DeskRequest.complete: the socket bound to ktrace's parking address and the program's parked
    # socket, until the agent has completed the program's connect (``_complete``).
    parked: tuple[socket.socket, socket.socket] | None = None
    task: asyncio.Task[None] | None = None
    program: asyncio.Future[socket.socket] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class DeskLine:
    """One authenticated line: ``start()``; ends by itself when the client leaves or breaks the
    protocol (``on_closed`` then), or with ``close()``.

    ``activity(+1/-1)``: a connection started or ended (the agent's idle exit counts them)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        connect_timeout: float,
        max_connections: int,
        activity: Callable[[int], None],
        on_closed: Callable[[DeskLine], None],
    ) -> None:
        self._sock = sock
        self._connect_timeout = connect_timeout
        self._max = max_connections
        self._activity = activity
        self._on_closed = on_closed
        self._connections: dict[int, _Connection] = {}
        # The client reads later: the answers wait there, in order (a few per connection).
        self._outbox = RecordOutbox(sock, self._broken)
        self._closed = False

    def start(self) -> None:
        self._sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self._sock, self._readable)

    # -- records in ------------------------------------------------------------------

    def _readable(self) -> None:
        while not self._closed:
            try:
                record, fds, flags, _ = socket.recv_fds(self._sock, MAX_RECORD, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("desk line: %s", exc)
                self.close()
                return
            if not record and not fds:
                self.close()  # the client closed its end
                return
            try:
                self._handle(record, fds, flags)
            except LineBroken as exc:
                log.warning("desk line ended: %s", exc)
                self.close()
                return

    def _handle(self, record: bytes, fds: list[int], flags: int) -> None:
        programs = [socket.socket(fileno=fd) for fd in fds]
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise LineBroken("a record too long")
            try:
                request = rpc.DeskRequest.FromString(record)
            except DecodeError:
                raise LineBroken("a malformed record") from None
            kind = request.WhichOneof("kind")
            if kind == "attach":
                if len(programs) != 1:
                    raise LineBroken("attach without exactly one descriptor")
                self._attach(request.id, programs.pop())
                return
            if kind == "open" and request.complete:
                if len(programs) != 2 or not all(map(is_tcp, programs)):
                    raise LineBroken("complete without two TCP sockets")
                if self._open(request.id, request.open, (programs[0], programs[1])):
                    programs.clear()  # the connection has them now
                return
            if programs:
                raise LineBroken(f"a descriptor with {kind!r}")
            if kind == "open":
                self._open(request.id, request.open)
            elif kind == "abort":
                self._abort(request.id)
            elif kind == "options":
                self._options(request.id, request.options)
            else:
                raise LineBroken(f"unexpected {kind!r}")
        finally:
            for sock in programs:
                sock.close()

    def _open(
        self, conn_id: int, request: rpc.TcpOpen, parked: tuple[socket.socket, socket.socket] | None = None
    ) -> bool:
        """Start the connection; True when it took ``parked`` (else the caller closes them)."""
        if conn_id in self._connections:
            raise LineBroken(f"connection {conn_id} is open already")
        try:
            dest = codec.decode_address(request.destination)
        except codec.AddressError as exc:
            raise LineBroken(str(exc)) from None
        if len(self._connections) >= self._max:
            refused = OSError(errno.ENOBUFS, f"too many connections on this line: {self._max} open")
            self._answer(rpc.DeskAnswer(id=conn_id, failure=codec.encode_failure(refused)))
            return False
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self._connect_timeout
        # Started here, not in the task: the dial is on its way one event-loop turn sooner, and
        # a connect answered at once (a nearby host) is answered to the client at once too.
        try:
            remote, err = start_dial(dest)
        except OSError as exc:  # no socket (EMFILE, an unsupported family)
            self._dial_failed(conn_id, dest, exc)
            return False
        if err not in (0, errno.EINPROGRESS):
            remote.close()
            self._dial_failed(conn_id, dest, OSError(err, os.strerror(err)))
            return False
        if err == 0 and not self._opened(conn_id, remote, dest):
            return False
        connection = self._connections[conn_id] = _Connection(remote, parked)
        self._activity(+1)
        run = self._run(conn_id, connection, dest, timeout, connected=err == 0)
        task = connection.task = asyncio.get_running_loop().create_task(run)
        # A done callback, not the coroutine's ``finally``: a task cancelled before it ran never enters it.
        task.add_done_callback(lambda done: self._ended(conn_id, connection, done))
        return True

    def _ended(self, conn_id: int, connection: _Connection, task: asyncio.Task[None]) -> None:
        if self._connections.get(conn_id) is connection:
            del self._connections[conn_id]
        if task.cancelled():
            reset_at_close(connection.remote)  # as _run does when cancelled (it may not have run)
        connection.remote.close()
        for sock in connection.parked or ():
            sock.close()
        if connection.program.done() and not connection.program.cancelled():
            # The client closes its copy after `relayed`: only then FIN or RST.
            connection.program.result().close()
        self._activity(-1)

    def _attach(self, conn_id: int, program: socket.socket) -> None:
        connection = self._connections.get(conn_id)
        if connection is None or connection.program.done():
            program.close()  # given up meanwhile (abort, the attach wait): not an error of the line
            return
        if not is_tcp(program):
            raise LineBroken("the descriptor is not a TCP socket")
        if connection.parked is not None:
            raise LineBroken(f"attach to connection {conn_id}, which the agent completes itself")
        connection.program.set_result(program)

    def _abort(self, conn_id: int) -> None:
        connection = self._connections.get(conn_id)
        if connection is not None and connection.task is not None:
            connection.task.cancel()

    def _options(self, conn_id: int, options: rpc.TcpOptions) -> None:
        connection = self._connections.get(conn_id)
        if connection is not None:  # else it ended meanwhile: nothing to set them on
            remote_options.apply(connection.remote, codec.decode_tcp_options(options))

    # -- one connection ------------------------------------------------------------------

    def _dial_failed(self, conn_id: int, dest: Endpoint, exc: BaseException) -> None:
        failure = codec.encode_failure(exc, f"connect to {dest.ip}:{dest.port}")
        self._answer(rpc.DeskAnswer(id=conn_id, failure=failure))

    def _opened(self, conn_id: int, remote: socket.socket, dest: Endpoint) -> bool:
        """Answer ``opened``; False (the socket closed, ``failure`` answered) when the connection is
        gone already (reset just after the handshake: getpeername says ENOTCONN)."""
        try:
            local, peer = remote.getsockname(), remote.getpeername()
        except OSError as exc:
            remote.close()
            self._dial_failed(conn_id, dest, exc)
            return False
        opened = rpc.TcpOpened(local=codec.encode_sockaddr(local), peer=codec.encode_sockaddr(peer))
        self._answer(rpc.DeskAnswer(id=conn_id, opened=opened))
        return True

    async def _run(
        self,
        conn_id: int,
        connection: _Connection,
        dest: Endpoint,
        timeout: float,
        *,
        connected: bool,
    ) -> None:
        remote = connection.remote  # closed by _ended, with the program's socket, once this ends
        try:
            if not connected:
                try:
                    await finish_dial(remote, dest, timeout)
                except (OSError, TimeoutError) as exc:
                    self._dial_failed(conn_id, dest, exc)
                    return
                if not self._opened(conn_id, remote, dest):
                    return
            if connection.parked is not None and not await self._complete(conn_id, connection):
                return
            try:
                async with asyncio.timeout(ATTACH_WAIT):
                    program = await connection.program
            except TimeoutError:
                reset_at_close(remote)
                reason = ConnectionAbortedError(errno.ECONNABORTED, "the program's socket was not handed over")
                self._answer(rpc.DeskAnswer(id=conn_id, failure=codec.encode_failure(reason)))
                return
            relayed = await relay_sockets(program, remote)
            self._answer(
                rpc.DeskAnswer(
                    id=conn_id,
                    relayed=rpc.TcpRelayed(
                        bytes_up=relayed.bytes_up, bytes_down=relayed.bytes_down, outcome=relayed.outcome
                    ),
                )
            )
        except asyncio.CancelledError:
            # Aborted, or the line ended: the remote is reset, as for a cancelled Connect stream
            # (relay_sockets has set both to reset when it was relaying).
            reset_at_close(remote)
            raise

    async def _complete(self, conn_id: int, connection: _Connection) -> bool:
        """Complete the program's parked connect from ktrace's parking address (``opened`` is
        answered before: ktrace must know before the program can), then answer ``attached``;
        the socket that completed it is then the program's end of the relay. False (the remote
        reset, ``failure`` answered) when the program's socket is not, or no longer, parked."""
        assert connection.parked is not None
        end, program = connection.parked
        try:
            # CLOSE: its blocking connect() has not reached the kernel yet.
            state = await until_not_closed(program, ATTACH_WAIT, lambda: not self._closed)
            if state != TCP_SYN_SENT:
                raise OSError(errno.ECONNABORTED, f"the program's socket is not connecting (TCP state {state})")
            await meet_parked(end, program, ATTACH_WAIT)
        except (OSError, TimeoutError) as exc:
            reset_at_close(connection.remote)
            reason = ConnectionAbortedError(errno.ECONNABORTED, f"completing the program's connect failed: {exc}")
            self._answer(rpc.DeskAnswer(id=conn_id, failure=codec.encode_failure(reason)))
            return False
        connection.parked = None
        program.close()  # ktrace's duplicate, needed only to find and watch the parked socket
        connection.program.set_result(end)
        self._answer(rpc.DeskAnswer(id=conn_id, attached=True))
        return True

    # -- records out -----------------------------------------------------------------

    def _answer(self, answer: rpc.DeskAnswer) -> None:
        if self._closed:
            return
        failed = self._outbox.send(answer.SerializeToString())
        if failed is not None:
            self._broken(failed)

    def _broken(self, exc: OSError) -> None:
        log.debug("desk line: %s", exc)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._sock)
        self._outbox.clear()
        self._sock.close()
        for connection in list(self._connections.values()):
            if connection.task is not None:
                connection.task.cancel()
        self._on_closed(self)
