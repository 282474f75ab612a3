"""ktrace's side of handing a connection's socket to an agent on the same host (``agent/handover.py``).

The agent offers it in its handshake (``HandshakeReply.tcp_handover_path`` and ``_id``) when it
listens on a Unix socket. ktrace connects to that path and checks that the agent there greets it
with that id: a Unix socket forwarded from another host (``ssh -L``) has no such path here, or
another agent's, and the connections then go through the tunnel as before. Each handed-over
socket travels with the ticket the agent gave for its stream; the agent also names the desk that
waits for it, so after the agent restarted at the same path (the channel reconnects by itself)
the line is made again to the new one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

log = logging.getLogger("ktrace.tunnel")

GREETING_TIMEOUT = 2.0
# A line whose agent went away (a restart): dial again, once.
_BROKEN = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED}


async def dial_desk(path: str, desk_id: bytes) -> socket.socket | None:
    """A connection to the desk at ``path`` if the agent there greets with ``desk_id``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(GREETING_TIMEOUT):
            await loop.sock_connect(sock, path)
            greeting = await loop.sock_recv(sock, 64)
    except (OSError, TimeoutError) as exc:
        sock.close()
        log.debug("handover: %s not reachable (%s)", path, exc)
        return None
    if greeting != desk_id:
        sock.close()
        log.debug("handover: %s is another agent's desk", path)
        return None
    return sock


class HandoverLine:
    """A connection to the agent's desk; ``give`` sends a socket with its ticket."""

    def __init__(self, path: str, desk_id: bytes, sock: socket.socket) -> None:
        self._path = path
        self._desk_id = desk_id
        self._sock: socket.socket | None = sock
        self._dialling = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str, desk_id: bytes) -> HandoverLine | None:
        """The line to the agent at ``path``, or None when it is not reachable or not that agent
        (its connections then go through the tunnel)."""
        sock = await dial_desk(path, desk_id)
        if sock is None:
            log.debug("handover: connections go through the tunnel")
            return None
        return cls(path, desk_id, sock)

    async def give(self, ticket: bytes, desk_id: bytes, program: socket.socket) -> None:
        """Send ``program``'s descriptor (the agent gets its own; ours stays open) with ``ticket``
        to the desk ``desk_id``. Raises OSError when that desk cannot be reached."""
        for attempt in range(2):
            line = await self._line(desk_id, fresh=attempt > 0)
            try:
                await self._send(line, ticket, program)
                return
            except OSError as exc:
                if exc.errno not in _BROKEN:
                    raise
                log.debug("handover: the line broke (%s); dialling again", exc)
        raise OSError(errno.ECONNREFUSED, f"the agent's desk at {self._path} does not take connections")

    async def _line(self, desk_id: bytes, *, fresh: bool) -> socket.socket:
        async with self._dialling:
            if fresh or desk_id != self._desk_id or self._sock is None:
                self.close()
                self._sock = await dial_desk(self._path, desk_id)
                self._desk_id = desk_id
            if self._sock is None:
                raise OSError(errno.ECONNREFUSED, f"no desk {desk_id.hex()} at {self._path}")
            return self._sock

    @staticmethod
    async def _send(line: socket.socket, ticket: bytes, program: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(line, [ticket], [program.fileno()])
                return
            except BlockingIOError:
                pass
            # The agent is not reading its desk fast enough: wait until the line takes more.
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(line, _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_writer(line)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
