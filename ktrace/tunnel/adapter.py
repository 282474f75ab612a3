"""The tunnel as the tracer sees it (`ktrace.tracer.ports.TcpTunnel`): the agent's client,
the parking lot, and the DNS-over-TCP tap, behind the few calls the handlers make."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ktrace.tracer.ports import AttachFailed, Dialled, PendingDial

from .client import AgentClient
from .desk import DeskConnection
from .dns_map import DnsMap, DnsTcpTap
from .parking import ParkingLot, ProgramSocketGone
from .tcp_stream import TcpStream
from .types import DNS_PORT, Endpoint, TunnelError

log = logging.getLogger("ktrace.tunnel")


@dataclass
class AgentTunnel:
    client: AgentClient
    lot: ParkingLot
    dns_map: DnsMap | None = None

    def dial(
        self, dest: Endpoint, timeout: float | None, program: socket.socket, on_opened: Callable[[Endpoint], None]
    ) -> PendingDial:
        def parked() -> tuple[socket.socket, socket.socket] | None:
            try:
                return self.lot.end_for(program), program
            except (OSError, KeyError) as exc:  # no parking (shutting down): ktrace completes it, or fails
                log.debug("no socket to complete the connect from: %s", exc)
                return None

        return self.client.start_tcp(dest, timeout, parked=parked, on_opened=on_opened)

    def catch_up(self) -> None:
        self.client.catch_up()

    def parking(self, family: int) -> tuple[str, int]:
        return self.lot.address(family)

    async def attach(self, dialled: Dialled, program: socket.socket, dest: Endpoint) -> None:
        if isinstance(dialled, DeskConnection) and dialled.end is not None:
            # The agent completes the program's connect itself: wait for its word.
            try:
                await dialled.attached()
            except TunnelError as exc:
                raise AttachFailed(str(exc), exc.errno if exc.errno_name == "ENOBUFS" else errno.ECONNABORTED) from None
            self.lot.adopt(dialled, dialled.end)
            return
        assert isinstance(dialled, (TcpStream, DeskConnection))
        if self.dns_map is not None and dest.port == DNS_PORT and isinstance(dialled, TcpStream):
            dialled.observe_down = DnsTcpTap(self.dns_map).feed
        try:
            await self.lot.attach(dialled, program)
        except ProgramSocketGone as exc:
            raise AttachFailed(str(exc), exc.errno) from None
