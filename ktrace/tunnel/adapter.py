"""The tunnel as the tracer sees it (`ktrace.tracer.ports.TcpTunnel`): the agent's client,
the parking lot, and the DNS-over-TCP tap, behind the few calls the handlers make."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ktrace.tracer.ports import AttachFailed, Dialled, PendingDial

from .client import AgentClient
from .desk import DeskConnection
from .dns_map import DnsMap, DnsTcpTap
from .parking import ParkingLot, ProgramSocketGone
from .tcp_stream import TcpStream
from .types import DNS_PORT, Endpoint


@dataclass
class AgentTunnel:
    client: AgentClient
    lot: ParkingLot
    dns_map: DnsMap | None = None

    def dial(self, dest: Endpoint, timeout: float | None) -> PendingDial:
        return self.client.start_tcp(dest, timeout)

    def parking(self, family: int) -> tuple[str, int]:
        return self.lot.address(family)

    async def attach(self, dialled: Dialled, program: socket.socket, dest: Endpoint) -> None:
        assert isinstance(dialled, (TcpStream, DeskConnection))
        if self.dns_map is not None and dest.port == DNS_PORT and isinstance(dialled, TcpStream):
            dialled.observe_down = DnsTcpTap(self.dns_map).feed
        try:
            await self.lot.attach(dialled, program)
        except ProgramSocketGone as exc:
            raise AttachFailed(str(exc)) from None
