"""ktrace's keyed line to a same-host agent's desk: connections dialled and relayed without gRPC
(the agent's side, and why, in ``agent/desk_line.py``).

``DeskClient.dial`` sends ``open`` at once (from the program's connect() stop) and its
``DeskDial`` waits for ``opened``. Two ways on from there:
- ``parked`` given (the program's parked socket and one bound to ktrace's parking address, sent
  with ``open``): the agent completes the program's connect itself, so the path from its dial to
  the program's first byte does not cross ktrace; ``DeskConnection.attached`` waits for its word.
  The program may see its connect() succeed before ktrace's event loop took ``opened`` (the agent
  sends it first), so ``on_opened`` runs as soon as it is read, and ``catch_up`` reads the line at
  once for a stop that asks a connecting socket's names;
- otherwise ktrace completes it (``parking.py``) and ``take`` sends its end with ``attach``.
Either way ``splice`` waits for ``relayed``. ktrace keeps its copy of its end until then, so when
the line is lost (the agent died) the program's connection is reset from here, and a dial waiting
on the line becomes one through the tunnel, which waits for an agent that comes back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from google.protobuf.message import DecodeError
from ktrace_agent.wire import codec, rpc
from ktrace_agent.wire.connecting import reset_at_close
from ktrace_agent.wire.outbox import RecordOutbox

from .handover import dial_desk
from .tcp_stream import OPEN_MARGIN, TimedOut, give_timed_out
from .types import Connection, Endpoint, TcpOptions, TcpStats, TunnelError, TunnelLost

log = logging.getLogger("ktrace.tunnel")

# What a dial lost with the line becomes (the client dials through the tunnel instead).
Fallback = Callable[[TunnelLost], Awaitable[Connection]]

MAX_ANSWER = 512  # a DeskAnswer is ~60 bytes; a relayed outcome's text is short


class _Aborted(Exception):
    """ktrace gave the connection up while it waited for the agent's answer."""


class _Answers:
    """One connection's answers, in the order they came; ``next()`` takes the first."""

    def __init__(self, on_opened: Callable[[Endpoint], None] | None) -> None:
        self._on_opened = on_opened
        self._pending: collections.deque[rpc.DeskAnswer] = collections.deque()
        self._waiter: asyncio.Future[rpc.DeskAnswer] | None = None
        self._error: BaseException | None = None

    def put(self, answer: rpc.DeskAnswer) -> None:
        if self._on_opened is not None and answer.WhichOneof("kind") == "opened":
            with contextlib.suppress(codec.AddressError):
                self._on_opened(codec.decode_address(answer.opened.local))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)
            self._waiter = None
        else:
            self._pending.append(answer)

    def fail(self, error: BaseException) -> None:
        """Every later ``next()`` raises ``error`` (after the answers that came before it)."""
        self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
            self._waiter.exception()  # retrieved: its awaiter may be gone (a dial given up)
            self._waiter = None

    async def next(self) -> rpc.DeskAnswer:
        if self._pending:
            return self._pending.popleft()
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        return await self._waiter


class DeskClient:
    """The line; ``lost`` is set once it broke (every later call raises ``TunnelLost``)."""

    def __init__(self, sock: socket.socket, *, options: bool = False) -> None:
        self._sock = sock
        self._options = options  # the agent takes DeskRequest.options (HandshakeReply.tcp_options)
        self._ids = itertools.count(1)
        self._connections: dict[int, _Answers] = {}
        self._outbox = RecordOutbox(sock, self._broken)
        self.lost: str | None = None
        asyncio.get_running_loop().add_reader(sock, self._readable)

    @classmethod
    async def connect(cls, path: str, desk_id: bytes, key: bytes, *, options: bool = False) -> DeskClient | None:
        """A keyed line to the desk at ``path``, or None when it is not reachable or not that agent.
        ``options``: the agent offers to apply the program's socket options (``set_options``)."""
        sock = await dial_desk(path, desk_id)
        if sock is None:
            return None
        try:
            sock.send(rpc.DeskRequest(hello=key).SerializeToString())
        except OSError as exc:
            sock.close()
            log.debug("desk: hello failed (%s)", exc)
            return None
        return cls(sock, options=options)

    def dial(
        self,
        dest: Endpoint,
        timeout: float | None,
        lost: Fallback,
        *,
        parked: tuple[socket.socket, socket.socket] | None = None,
        on_opened: Callable[[Endpoint], None] | None = None,
    ) -> DeskDial:
        """Ask the agent, now, to connect to ``dest`` (and, with ``parked``, to complete the
        program's connect: ``(the socket bound to the parking address, the program's)``, the first
        then ktrace's copy of its end, closed by the connection). Raises ``TunnelLost`` when the
        line is lost; a dial lost while waiting becomes ``lost(why)``'s."""
        if self.lost is not None:
            if parked is not None:
                parked[0].close()
            raise TunnelLost("EIO", self.lost)
        conn_id = next(self._ids) & 0xFFFFFFFF
        timeout_ms = max(1, round(timeout * 1000)) if timeout is not None else 0
        request = rpc.DeskRequest(
            id=conn_id,
            open=rpc.TcpOpen(destination=codec.encode_address(dest), timeout_ms=timeout_ms),
            complete=parked is not None,
        )
        answers = self._connections[conn_id] = _Answers(on_opened)
        fds = () if parked is None else (parked[0].fileno(), parked[1].fileno())
        try:
            self._send(request, fds)
        except TunnelLost:
            self._connections.pop(conn_id, None)
            if parked is not None:
                parked[0].close()
            raise
        except OSError as exc:  # out of descriptors: this connect fails as the kernel's would
            self._connections.pop(conn_id, None)
            answers.fail(TunnelError("ENOBUFS", f"ktrace cannot queue the request: {exc}"))
        return DeskDial(self, conn_id, dest, timeout, answers, lost, None if parked is None else parked[0])

    def _send(self, request: rpc.DeskRequest, fds: tuple[int, ...] = ()) -> None:
        """One record, now or after those still waiting (wire/outbox.py). Raises ``TunnelLost``
        when the line failed; OSError when a descriptor cannot wait (EMFILE)."""
        failed = self._outbox.send(request.SerializeToString(), fds)
        if failed is not None:
            self._broken(failed)
            raise TunnelLost("EIO", self.lost or "the agent's desk line failed")

    def _broken(self, exc: OSError) -> None:
        self._lose(f"the agent's desk line failed: {exc}")

    def attach(self, conn_id: int, program: socket.socket) -> None:
        """Send ``program`` (ktrace's end of the program's connection) for the connection."""
        self._send(rpc.DeskRequest(id=conn_id, attach=True), (program.fileno(),))

    def set_options(self, conn_id: int, options: TcpOptions) -> None:
        """Have the agent set ``options`` on connection ``conn_id``'s socket (it ignores an id
        whose connection ended); nothing on a lost line, or towards an agent that does not offer it."""
        if not self._options or self.lost is not None or conn_id not in self._connections:
            return
        with contextlib.suppress(TunnelLost, OSError):  # a lost line resets the connection anyway
            self._send(rpc.DeskRequest(id=conn_id, options=codec.encode_tcp_options(options)))

    def abort(self, conn_id: int) -> None:
        answers = self._connections.pop(conn_id, None)
        if answers is not None:
            answers.fail(_Aborted())
        if self.lost is None:
            with contextlib.suppress(TunnelLost):
                self._send(rpc.DeskRequest(id=conn_id, abort=True))

    def catch_up(self) -> None:
        """Take what the agent has sent, now, rather than at the event loop's next turn."""
        self._readable()

    def _readable(self) -> None:
        while self.lost is None:
            try:
                record = self._sock.recv(MAX_ANSWER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(f"the agent's desk line failed: {exc}")
                return
            if not record:
                self._lose("the agent closed its desk line")
                return
            try:
                answer = rpc.DeskAnswer.FromString(record)
            except DecodeError:
                self._lose("a malformed answer on the agent's desk line")
                return
            kind = answer.WhichOneof("kind")
            if kind in ("relayed", "failure"):
                answers = self._connections.pop(answer.id, None)  # its last answer
            else:
                answers = self._connections.get(answer.id)
            if answers is not None:
                answers.put(answer)

    def _lose(self, why: str) -> None:
        if self.lost is not None:
            return
        self.lost = why
        log.debug("desk: %s", why)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self._sock)
        self._outbox.clear()
        self._sock.close()
        connections, self._connections = self._connections, {}
        for answers in connections.values():
            answers.fail(TunnelLost("EIO", why))

    def close(self) -> None:
        self._lose("closed")


class DeskDial:
    """A dial sent on the line (``PendingDial``): ``await`` it for the connection; ``close()``
    gives up one never awaited (the agent resets what it dialled)."""

    def __init__(
        self,
        line: DeskClient,
        conn_id: int,
        dest: Endpoint,
        timeout: float | None,
        answers: _Answers,
        lost: Fallback,
        end: socket.socket | None,
    ) -> None:
        self._lost = lost
        self._line = line
        self._id = conn_id
        self._dest = dest
        self._timeout = timeout
        self._answers = answers
        self._end = end
        self._awaited = False

    def __await__(self) -> Generator[Any, None, Connection]:
        self._awaited = True
        return self._result().__await__()

    async def _result(self) -> Connection:
        try:
            return await self._opened()
        except TunnelLost as lost:
            self._close_end()  # the tunnel's way completes the connect from a socket of its own
            return await self._lost(lost)
        except BaseException:
            self._close_end()
            raise

    async def _opened(self) -> DeskConnection:
        """The connection once the agent answered; raises ``TunnelError`` with its errno, or ``TunnelLost``."""
        line, conn_id, timeout = self._line, self._id, self._timeout
        try:
            reply = await asyncio.wait_for(self._answers.next(), timeout + OPEN_MARGIN if timeout is not None else None)
        except TimeoutError:
            line.abort(conn_id)
            raise TunnelError("ETIMEDOUT", f"no answer from the agent for {self._dest} in time") from None
        except BaseException:
            line.abort(conn_id)
            raise
        kind = reply.WhichOneof("kind")
        if kind == "failure":
            raise codec.decode_failure(reply.failure)
        if kind != "opened":
            line.abort(conn_id)
            raise TunnelError("EIO", f"agent answered {kind!r} to open")
        local, peer = codec.decode_address(reply.opened.local), codec.decode_address(reply.opened.peer)
        return DeskConnection(line, conn_id, self._answers, local, peer, self._end)

    def _close_end(self) -> None:
        if self._end is not None:
            self._end.close()

    def close(self) -> None:
        if not self._awaited:
            self._awaited = True
            self._line.abort(self._id)
            self._close_end()


class DeskConnection:
    """A connection the agent dialled on the line; ``local``: its socket's address there.
    ``end``: ktrace's copy of the program's end, when the agent completes the program's connect."""

    def __init__(
        self,
        line: DeskClient,
        conn_id: int,
        answers: _Answers,
        local: Endpoint,
        peer: Endpoint,
        end: socket.socket | None,
    ) -> None:
        self._line = line
        self._id = conn_id
        self._answers = answers
        self._taken = False
        self._lost: TunnelLost | None = None  # the line broke as the end was sent
        self._on_timed_out: TimedOut | None = None
        self.end = end
        self.local = local
        self.peer = peer
        self.opened_at = time.monotonic()  # for the report: how long the connection lived

    async def attached(self) -> None:
        """Once the agent completed the program's connect (``end`` given); raises ``TunnelError``
        (``TunnelLost`` included) when it could not."""
        try:
            answer = await self._answers.next()
        except _Aborted:
            raise TunnelError("ECONNABORTED", "the connection was given up") from None
        kind = answer.WhichOneof("kind")
        if kind == "failure":
            raise codec.decode_failure(answer.failure)
        if kind != "attached":
            self._line.abort(self._id)
            raise TunnelError("EIO", f"agent answered {kind!r} to complete")

    def set_options(self, options: TcpOptions) -> None:
        self._line.set_options(self._id, options)

    def when_timed_out(self, handler: TimedOut) -> None:
        self._on_timed_out = handler

    async def abort(self) -> None:
        """Give the connection up: the agent resets it (and the program's end, once it has it)."""
        self._line.abort(self._id)
        if self.end is not None and not self._taken:
            self.end.close()

    def take(self, sock: socket.socket) -> None:
        """``sock`` (ktrace's end of the program's connection) is the agent's to relay now: sent
        with ``attach``, or already there (``end``)."""
        self._taken = True
        if sock is self.end:
            return
        try:
            self._line.attach(self._id, sock)
        except TunnelLost as lost:
            self._lost = lost
        except OSError as exc:  # out of descriptors to queue it: the connection is reset
            self._line.abort(self._id)
            self._lost = TunnelLost("ENOBUFS", f"ktrace cannot hand the connection over: {exc}")

    async def splice(self, sock: socket.socket) -> TcpStats:
        """Wait until the agent relayed ``sock`` (handed over by ``take``, or now); ``sock`` is
        closed on return, with RST when the connection was reset."""
        if not self._taken:
            self.take(sock)
        stats = TcpStats()
        outcome = ""  # empty: both directions ended with a FIN
        try:
            if self._lost is not None:
                raise self._lost
            answer = await self._answers.next()
            kind = answer.WhichOneof("kind")
            if kind == "relayed":
                stats.bytes_up, stats.bytes_down = answer.relayed.bytes_up, answer.relayed.bytes_down
                outcome = answer.relayed.outcome
            elif kind == "failure":
                outcome = f"error: {codec.decode_failure(answer.failure)}"
            else:
                outcome = f"error: unexpected {kind!r} from the agent's desk"
        except TunnelLost as lost:
            outcome = f"error: {lost.message}"
        except _Aborted:
            outcome = "aborted"
        except asyncio.CancelledError:
            stats.outcome = "aborted"
            self._line.abort(self._id)
            reset_at_close(sock)
            sock.close()
            raise
        if outcome:
            stats.outcome = outcome
            reset_at_close(sock)  # the agent set it on the shared socket already when it reset
        if not give_timed_out(self._on_timed_out, sock, stats.outcome):
            sock.close()
        return stats
