"""What the handlers see of the agent: the `Tunnel` protocol.

ktrace/tunnel implements it over gRPC (`tunnel/adapter.py` adapts `AgentClient`, the
loopback endpoint and the UDP relays); tests implement it with a scripted fake agent. The
tracer package imports neither gRPC nor ktrace.tunnel: only these protocols and plain
values.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Generator
from typing import Any, Protocol

from ktrace_agent.wire.values import Endpoint, IPAddress, TcpOptions


class Dialled(Protocol):
    """A TCP connection the agent made: its own address there, and a way to give it up."""

    @property
    def local(self) -> Endpoint: ...

    async def abort(self) -> None: ...

    def set_options(self, options: TcpOptions) -> None:
        """Have the agent set the program's ``options`` on its socket to the destination (the
        options that act on the path to the peer: ``ktrace_agent.wire.tcp_options``). Returns at
        once; nothing happens when the agent does not offer it or the connection has ended."""
        ...

    def when_timed_out(self, handler: Callable[[socket.socket], None]) -> None:
        """Should the agent's connection time out (ETIMEDOUT: its keepalive or user timeout found
        the peer gone), ``handler`` takes ktrace's end of the program's connection over, to time
        the program's socket out too, instead of it being reset."""
        ...


class AttachFailed(Exception):
    """The program's socket could not be handed the agent's connection (it left the parking lot,
    or ktrace is out of descriptors: ``errno`` says what its connect() fails with)."""

    def __init__(self, message: str, err: int = errno.ECONNABORTED) -> None:
        super().__init__(message)
        self.errno = err


class PendingDial(Protocol):
    """A dial under way: ``await`` it for the connection (raises ``TunnelError`` with the agent's
    errno); ``close()`` gives up one that will never be awaited. (A coroutine is one.)"""

    def __await__(self) -> Generator[Any, None, Dialled]: ...

    def close(self) -> None: ...


class TcpTunnel(Protocol):
    def dial(
        self, dest: Endpoint, timeout: float | None, program: socket.socket, on_opened: Callable[[Endpoint], None]
    ) -> PendingDial:
        """Have the agent connect to ``dest`` for ``program`` (ktrace's duplicate of the program's
        socket, parked or about to be). Called at the program's connect() stop: whatever can leave
        for the agent before the stop ends does (a same-host agent's request). ``on_opened`` hears
        the agent socket's address as soon as it is known: a same-host agent may complete the
        program's connect before the dial's awaiter runs."""
        ...

    def catch_up(self) -> None:
        """Take the agent's answers that have arrived, now: a stop that asks a connecting socket's
        names must see every ``on_opened`` the program could already have observed."""
        ...

    def parking(self, family: int) -> tuple[str, int]:
        """Where a program socket of ``family`` waits while the agent dials (tunnel/parking.py)."""
        ...

    async def attach(self, dialled: Dialled, program: socket.socket, dest: Endpoint) -> None:
        """Complete the parked connect of ``program`` (ktrace's duplicate of the program's socket)
        and splice it to ``dialled``; raises AttachFailed."""
        ...


class RelayTable(Protocol):
    """The UDP relays: one loopback socket per (program socket, remote peer)."""

    def relay_for(self, sock_key: int, family: int, peer: Endpoint) -> tuple[str, int]: ...

    def sink_for(self, family: int) -> tuple[str, int]: ...

    def connected_to_sink(self, sock_key: int, family: int, peer: Endpoint, program_port: int) -> None: ...

    def peer_of(self, family: int, relay_port: int) -> Endpoint | None: ...

    def refuse(self, sock_key: int, peer: Endpoint, program: socket.socket) -> bool: ...

    def agent_port(self, sock_key: int) -> int | None: ...


# The target's files: (absolute path, whether the call writes, whether it follows a final link)
# -> the local path to use instead (bytes), an errno to fail with (int), or None (not ours).
PathLookup = Callable[[bytes, bool, bool], bytes | int | None]


class Names(Protocol):
    """The names the program's lookups gave an address (the tunnel's DNS map): name rules match them."""

    def names_of(self, ip: IPAddress) -> tuple[str, ...]: ...
