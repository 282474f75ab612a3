"""Plain values and errors of the tunnel API (pure: no I/O, no gRPC).

The values both processes share (``Endpoint``, ``SourceRoute``, ``TunnelError``, ...) are the wire
package's (``ktrace_agent.wire.values``), re-exported here for ktrace's own modules; the rest is
the client's.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ktrace_agent.wire.values import MAX_DATAGRAM, Endpoint, IPAddress, SourceRoute, TcpOptions, TunnelError

__all__ = [
    "DNS_PORT",
    "MAX_DATAGRAM",
    "AgentUnavailable",
    "Connection",
    "Endpoint",
    "IPAddress",
    "SourceRoute",
    "TcpOptions",
    "TcpStats",
    "TunnelError",
    "TunnelLost",
]


DNS_PORT = 53  # what ktrace reads on its way for the DNS map (UDP and TCP)


class TunnelLost(TunnelError):
    """The stream failed before the agent answered ``open``: the tunnel itself is down (nothing
    was dialled), so the same request may be tried again once the tunnel is back."""


class AgentUnavailable(Exception):
    """The agent cannot be reached, rejected us, or does not speak our protocol.

    ``str()`` is one line that says what happened and what to try.
    """


@dataclass
class TcpStats:
    bytes_up: int = 0
    bytes_down: int = 0
    # "closed" when both directions finished; "reset: ENAME" when either side reset;
    # "aborted" when ktrace ended it; "error: ..." when the tunnel itself failed.
    outcome: str = "closed"


class Connection(Protocol):
    """A TCP connection the agent made, before and while it carries the program's: a ``Connect``
    stream (tcp_stream.py) or a connection on the desk line of a same-host agent (desk.py)."""

    local: Endpoint  # the agent socket's address
    peer: Endpoint
    opened_at: float  # time.monotonic() when the agent had connected

    async def abort(self) -> None: ...

    def set_options(self, options: TcpOptions) -> None:
        """Have the agent set ``options`` (the program's keepalive and user timeout) on its
        socket to the destination; nothing when the agent does not offer it, or the connection
        ended. Returns at once."""
        ...

    def when_timed_out(self, handler: Callable[[socket.socket], None]) -> None:
        """``handler`` takes ktrace's end of the program's connection (and closes it) when the agent's
        connection times out, instead of the reset (``tcp_stream.give_timed_out``)."""
        ...

    def take(self, sock: socket.socket) -> None:
        """``sock`` (ktrace's end of the program's connection) is this connection's from now on;
        ``splice`` follows. (A same-host agent starts relaying it here, without waiting for the
        task that runs ``splice``; a ``Connect`` stream only starts in ``splice``.)"""
        ...

    async def splice(self, sock: socket.socket) -> TcpStats:
        """Carry ``sock`` (ktrace's end of the program's connection) until both directions
        ended or one reset; ``sock`` is closed on return."""
        ...
