"""A scripted fake agent for the handler tests: the `TcpTunnel` and the `RelayTable`.

`FakeAgent` scripts dials in the spirit of mirrord's TestIntProxy (`agent.expect_dial(dest)
.answer(OK | "ECONNREFUSED" | HANG)`), uses ktrace's real parking lot (`tunnel/parking.py`) on
loopback, and its `attach` completes the parked connect as the real adapter does, splicing the
program's socket to an echo that upper-cases (the "remote" server). `FakeRelays` keeps a real
loopback UDP socket per relay, which the test reads and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

from fakes import endpoint

from ktrace.tracer.ports import AttachFailed, Dialled
from ktrace.tunnel.parking import ParkingLot, ProgramSocketGone
from ktrace.tunnel.types import Connection, Endpoint, TcpOptions, TcpStats, TunnelError


@dataclass(frozen=True)
class Ok:
    """The agent connected; its socket's own address there."""

    local: Endpoint = field(default_factory=lambda: endpoint("10.244.0.7:41000"))


@dataclass(frozen=True)
class Hang:
    """The dial does not answer until the test says (`Dial.release`) or ktrace gives it up."""


OK: Final = Ok()
HANG: Final = Hang()
Answer = Ok | Hang | str  # str: the agent's errno name (TunnelError)


@dataclass(eq=False)
class FakeDialled:
    """The agent's connection: what `TcpTunnel.dial` returns. Spliced to the program's socket
    (through the real parking lot) it is an echo that upper-cases, so a test can tell bytes went
    through it."""

    local: Endpoint
    dest: Endpoint
    aborted: bool = False
    options: list[TcpOptions] = field(default_factory=list)  # what set_options said, in order

    async def abort(self) -> None:
        self.aborted = True

    on_timed_out: Callable[[socket.socket], None] | None = None

    def set_options(self, options: TcpOptions) -> None:
        self.options.append(options)

    def when_timed_out(self, handler: Callable[[socket.socket], None]) -> None:
        self.on_timed_out = handler

    def take(self, sock: socket.socket) -> None:
        pass

    async def splice(self, sock: socket.socket) -> TcpStats:
        """What `ParkingLot` runs with ktrace's end of the program's connection."""
        loop = asyncio.get_running_loop()
        stats = TcpStats()
        with sock:
            while data := await loop.sock_recv(sock, 65536):
                stats.bytes_up += len(data)
                await loop.sock_sendall(sock, data.upper())
                stats.bytes_down += len(data)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        return stats


class Dial:
    """One dial the test expects, and how the agent answers it."""

    def __init__(self, dest: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        self.dest = dest
        self._answer: Answer | None = None
        self.arrived: asyncio.Future[float | None] = loop.create_future()  # ktrace dialled: its timeout
        self.released: asyncio.Future[Answer] = loop.create_future()
        self.cancelled: asyncio.Future[None] = loop.create_future()  # ktrace gave the dial up
        self.dialled: FakeDialled | None = None

    def answer(self, answer: Answer) -> Dial:
        self._answer = answer
        if not isinstance(answer, Hang):
            self.released.set_result(answer)
        return self

    def release(self, answer: Ok | str) -> None:
        """Answer a hung dial now."""
        self.released.set_result(answer)

    async def perform(self, timeout: float | None) -> FakeDialled:
        self.arrived.set_result(timeout)
        try:
            # Shielded: ktrace giving the dial up must not cancel the test's own future. A dial
            # answered already returns without yielding: the agent's answer can come that fast.
            answer = await asyncio.shield(self.released)
        except asyncio.CancelledError:
            self.cancelled.set_result(None)
            raise
        if isinstance(answer, str):
            raise TunnelError(answer, "scripted")
        assert isinstance(answer, Ok)
        self.dialled = FakeDialled(answer.local, self.dest)
        return self.dialled


class FakeAgent:
    """`TcpTunnel` with scripted dials and ktrace's real parking lot. Use ``async with``."""

    def __init__(self) -> None:
        self.lot = ParkingLot(on_closed=self._closed)
        self.expected: list[Dial] = []
        self.unexpected: list[Endpoint] = []
        self.attached: list[tuple[FakeDialled, Endpoint]] = []
        self.closed: list[tuple[FakeDialled, TcpStats]] = []
        self.lost = False  # the tunnel is down for good: every dial fails as AgentClient's does then
        self.attach_fails = False  # the program's socket cannot be handed the connection

    async def __aenter__(self) -> FakeAgent:
        await self.lot.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.lot.close()

    def expect_dial(self, dest: str | Endpoint) -> Dial:
        dial = Dial(endpoint(dest) if isinstance(dest, str) else dest)
        self.expected.append(dial)
        return dial

    def verify(self) -> None:
        """Every expected dial came, and no other."""
        assert self.unexpected == [], f"dials nobody expected: {self.unexpected}"
        missing = [d.dest for d in self.expected if not d.arrived.done()]
        assert missing == [], f"expected dials that never came: {missing}"

    # -- TcpTunnel --

    def catch_up(self) -> None:
        pass  # answers reach the handlers through the awaited dial only

    async def dial(
        self, dest: Endpoint, timeout: float | None, program: socket.socket, on_opened: Callable[[Endpoint], None]
    ) -> Dialled:
        if self.lost:
            raise TunnelError("ETIMEDOUT", "the tunnel to the agent is down (agent gone)")
        for dial in self.expected:
            if dial.dest == dest and not dial.arrived.done():
                return await dial.perform(timeout)
        self.unexpected.append(dest)
        raise TunnelError("EHOSTUNREACH", f"no dial to {dest} was expected")

    def parking(self, family: int) -> tuple[str, int]:
        return self.lot.address(family)

    async def attach(self, dialled: Dialled, program: socket.socket, dest: Endpoint) -> None:
        assert isinstance(dialled, FakeDialled)
        self.attached.append((dialled, dest))
        if self.attach_fails:
            raise AttachFailed("scripted: the program's socket left the parking lot")
        try:
            # The lot only calls splice() on what it is given: a FakeDialled stands in for a Connection.
            await self.lot.attach(cast(Connection, dialled), program)
        except ProgramSocketGone as exc:
            raise AttachFailed(str(exc)) from None

    def _closed(self, stream: Connection, stats: TcpStats) -> None:
        self.closed.append((cast(FakeDialled, stream), stats))


# ---- the UDP relays ---------------------------------------------------------------------------


class FakeRelays:
    """`RelayTable`: a real UDP socket on loopback per (program socket, peer), which the test
    reads (what the program sent to the peer) and sends from (the peer's answers, as a relay
    forwards them). Close it at the end."""

    def __init__(self) -> None:
        self.relays: dict[tuple[int, Endpoint], socket.socket] = {}
        self.peers: dict[tuple[int, int], Endpoint] = {}  # (family, relay port) -> peer
        self.sinks: dict[int, socket.socket] = {}
        self.sink_users: list[tuple[int, int, Endpoint, int]] = []
        self.refused: list[tuple[int, Endpoint]] = []
        self.agent_ports: dict[int, int] = {}  # sock_key -> port of its agent socket, when known
        self.agent_port_asked: list[int] = []

    def relay(self, sock_key: int, peer: str | Endpoint) -> socket.socket:
        return self.relays[(sock_key, endpoint(peer) if isinstance(peer, str) else peer)]

    def close(self) -> None:
        for sock in (*self.relays.values(), *self.sinks.values()):
            sock.close()

    @staticmethod
    def _bound(family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return sock

    # -- RelayTable --

    def relay_for(self, sock_key: int, family: int, peer: Endpoint) -> tuple[str, int]:
        sock = self.relays.get((sock_key, peer))
        if sock is None:
            sock = self.relays[(sock_key, peer)] = self._bound(family)
            self.peers[(family, sock.getsockname()[1])] = peer
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def sink_for(self, family: int) -> tuple[str, int]:
        sock = self.sinks.get(family)
        if sock is None:
            sock = self.sinks[family] = self._bound(family)
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def connected_to_sink(self, sock_key: int, family: int, peer: Endpoint, program_port: int) -> None:
        self.sink_users.append((sock_key, family, peer, program_port))

    def peer_of(self, family: int, relay_port: int) -> Endpoint | None:
        return self.peers.get((family, relay_port))

    def refuse(self, sock_key: int, peer: Endpoint, program: socket.socket) -> bool:
        self.refused.append((sock_key, peer))
        return True

    def agent_port(self, sock_key: int) -> int | None:
        self.agent_port_asked.append(sock_key)
        return self.agent_ports.get(sock_key)
