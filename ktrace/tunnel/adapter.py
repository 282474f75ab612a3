"""The tunnel as the tracer sees it (`ktrace.tracer.ports.TcpTunnel`): the agent's client,
the loopback endpoint, and the DNS-over-TCP tap, behind the few calls the handlers make."""

from __future__ import annotations

from dataclasses import dataclass

from ktrace.tracer.ports import Dialled

from .client import AgentClient
from .dns_map import DnsMap, DnsTcpTap
from .endpoint import LoopbackEndpoint
from .tcp_stream import TcpStream
from .types import Endpoint

DNS_PORT = 53


@dataclass
class AgentTunnel:
    client: AgentClient
    endpoint: LoopbackEndpoint
    dns_map: DnsMap | None = None

    async def dial(self, dest: Endpoint, timeout: float | None) -> TcpStream:
        return await self.client.open_tcp(dest, timeout)

    def endpoint_address(self, family: int) -> tuple[str, int]:
        return self.endpoint.address(family)

    def expect(self, family: int, source_port: int, dialled: Dialled, dest: Endpoint) -> None:
        assert isinstance(dialled, TcpStream)
        if self.dns_map is not None and dest.port == DNS_PORT:
            dialled.observe_down = DnsTcpTap(self.dns_map).feed
        self.endpoint.expect(family, source_port, dialled)
