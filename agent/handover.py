"""Taking over the program's end of a TCP connection from a client on the same host.

Through the tunnel every byte of a connection crosses ktrace and the agent, and gRPC in both:
four copies and two event loops per byte. When the agent listens on a Unix socket, ktrace runs
on the same host and can give the agent its end of the program's connection (``SCM_RIGHTS``);
the agent then relays it to the remote itself (``socket_relay.py``), one process and two copies
per byte, as a SOCKS server would.

The desk is a ``SOCK_SEQPACKET`` socket next to the agent's (``<path>.fds``, mode 0600).
On every connection it first writes its 16-byte id, which the handshake also gives, so a client
knows it reached this agent and not another one at the same path. A descriptor counts only with
a ticket the agent issued on an authenticated ``Connect`` stream (``TcpOpened.handover_ticket``)
and is taken once; anything else is closed. So the desk gives nobody anything the token did not.

A line whose first record is not a ticket (tickets are exactly ``TICKET_BYTES`` long) must be a
``DeskRequest.hello`` with the desk's key (``HandshakeReply.tcp_desk_key``, also given only to an
authenticated handshake); the line then dials and relays by itself (``desk_line.py``), with
no ``Connect`` stream. A wrong key ends the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable

from google.protobuf.message import DecodeError

from .desk_line import DeskLine, is_tcp
from .wire import rpc

log = logging.getLogger("ktrace_agent")

TICKET_BYTES = 16
ID_BYTES = 16
KEY_BYTES = 32
SUFFIX = ".fds"  # short: the whole path must fit in sun_path (108 bytes)


class HandoverRefused(Exception):
    """The descriptor sent with a ticket was not a TCP socket."""


class HandoverDesk:
    """``start()``; ``issue()`` a ticket per connection, ``await take(ticket, timeout)`` its socket."""

    def __init__(
        self,
        agent_path: str,
        *,
        connect_timeout: float = 10.0,
        max_connections: int = 4096,
        activity: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.path = agent_path + SUFFIX
        self.id = secrets.token_bytes(ID_BYTES)
        self.key = secrets.token_bytes(KEY_BYTES)
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections  # per keyed line, as the agent's cap per client
        self._activity = activity
        self._listener: socket.socket | None = None
        self._lines: set[socket.socket] = set()
        self._keyed: set[DeskLine] = set()
        self._waiting: dict[bytes, asyncio.Future[socket.socket]] = {}

    def start(self) -> bool:
        """Listen; False (and no offer) when the path is taken by something that is not a socket."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                log.warning("%s exists and is not a socket: connections are not handed over", self.path)
                return False
            os.unlink(self.path)  # the agent's own path was free, so this one is a leftover
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.path)
        except OSError as exc:  # a path over sun_path's 108 bytes, a read-only directory
            listener.close()
            log.info("cannot listen on %s (%s): connections are not handed over", self.path, exc)
            return False
        finally:
            os.umask(old_umask)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener, self._accept)
        return True

    def issue(self) -> bytes:
        ticket = secrets.token_bytes(TICKET_BYTES)
        self._waiting[ticket] = asyncio.get_running_loop().create_future()
        return ticket

    async def take(self, ticket: bytes, timeout: float) -> socket.socket:
        """The socket sent with ``ticket``; raises TimeoutError, HandoverRefused. The ticket is spent."""
        future = self._waiting[ticket]
        try:
            async with asyncio.timeout(timeout):
                return await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()  # it came just as this gave up
            raise
        finally:
            self._waiting.pop(ticket, None)

    def withdraw(self, ticket: bytes) -> None:
        """The stream ended before the socket came: a socket arriving later is closed."""
        future = self._waiting.pop(ticket, None)
        if future is not None and future.done() and not future.cancelled() and future.exception() is None:
            future.result().close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            line, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("handover: accept failed: %s", exc)
            return
        line.setblocking(False)
        try:
            line.send(self.id)
        except OSError:
            line.close()
            return
        self._lines.add(line)
        asyncio.get_running_loop().add_reader(line, self._receive, line)

    def _receive(self, line: socket.socket) -> None:
        try:
            message, fds, flags, _ = socket.recv_fds(line, 64, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message, fds, flags = b"", [], 0
        socks = [socket.socket(fileno=fd) for fd in fds]
        if not message and not socks:
            self._drop(line)
            return
        if len(message) != TICKET_BYTES:
            for sock in socks:
                sock.close()
            self._hello(line, message, bool(socks) or bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)))
            return
        future = self._waiting.get(message)
        if future is None or future.done() or len(socks) != 1 or flags & socket.MSG_CTRUNC:
            for sock in socks:
                sock.close()
            if future is not None and not future.done():
                future.set_exception(HandoverRefused("no single descriptor came with the ticket"))
            return
        (sock,) = socks
        if not is_tcp(sock):
            sock.close()
            future.set_exception(HandoverRefused("the descriptor is not a TCP socket"))
            return
        future.set_result(sock)

    def _hello(self, line: socket.socket, record: bytes, stray: bool) -> None:
        """A record that is not a ticket: a keyed line's hello, or the end of this line."""
        try:
            hello = rpc.DeskRequest.FromString(record)
        except DecodeError:
            hello = None
        if (
            stray
            or hello is None
            or hello.WhichOneof("kind") != "hello"
            or not hmac.compare_digest(hello.hello, self.key)
        ):
            log.warning("handover: a line to the desk sent a wrong key or a malformed record; it is closed")
            self._drop(line)
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(line)
        self._lines.discard(line)
        keyed = DeskLine(
            line,
            connect_timeout=self._connect_timeout,
            max_connections=self._max_connections,
            activity=self._activity,
            on_closed=self._keyed.discard,
        )
        self._keyed.add(keyed)
        keyed.start()

    def _drop(self, line: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(line)
        self._lines.discard(line)
        line.close()

    def close(self) -> None:
        for line in list(self._lines):
            self._drop(line)
        for keyed in list(self._keyed):
            keyed.close()
        if self._listener is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for ticket in list(self._waiting):
            self.withdraw(ticket)
