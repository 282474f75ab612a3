"""The options a program set on its connection, set on the agent's socket to the destination
(which options, and why they must act here: ``wire/tcp_options.py``)."""

from __future__ import annotations

import logging
import socket

from .wire import tcp_options
from .wire.values import TcpOptions

log = logging.getLogger("ktrace_agent")


def apply(sock: socket.socket, options: TcpOptions) -> None:
    """setsockopt each of ``options`` on ``sock``; one the kernel refuses (a value out of its
    range, a socket already closed) is skipped: the program's own call would have failed, on
    its socket, where ktrace cannot fail it now."""
    for level, name, value in tcp_options.settings(options):
        try:
            sock.setsockopt(level, name, value)
        except OSError as exc:
            log.debug("setsockopt(%d, %d, %d) on the connection to the destination: %s", level, name, value, exc)
