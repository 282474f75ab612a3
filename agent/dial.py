"""The agent's connect to a destination, for a ``Connect`` stream and for the desk alike."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from .wire.connecting import connect_now, relay_leg
from .wire.values import Endpoint


def start_dial(dest: Endpoint) -> tuple[socket.socket, int]:
    """A socket connecting to ``dest`` and ``connect_now``'s answer (0, EINPROGRESS or an errno;
    the caller closes the socket after an errno)."""
    sock = relay_leg(dest.family)
    try:
        return sock, connect_now(sock, (str(dest.ip), dest.port))
    except BaseException:
        sock.close()
        raise


async def finish_dial(sock: socket.socket, dest: Endpoint, timeout: float) -> None:
    """Wait for a dial ``start_dial`` left in progress; raises OSError or TimeoutError (the caller
    closes the socket)."""
    async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
        # connect() again sees EALREADY and waits for the same attempt to finish.
        await asyncio.get_running_loop().sock_connect(sock, (str(dest.ip), dest.port))


async def dial(dest: Endpoint, timeout: float) -> socket.socket:
    sock, err = start_dial(dest)
    try:
        if err == errno.EINPROGRESS:
            await finish_dial(sock, dest, timeout)
        elif err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock
