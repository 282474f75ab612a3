"""UdpRedirector.peer_error when the program socket's process has exited meanwhile: the agent's
ICMP error arrives after the program is gone, which must be ignored (not raise into the UDP
session, which would log a traceback)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys

import pytest

from ktrace.tracer.decide import RoutingPolicy
from ktrace.tracer.sockaddr import InetAddr
from ktrace.tracer.udp import UdpRedirector
from ktrace.tunnel.types import Endpoint

pytestmark = pytest.mark.timeout(30)

PEER = InetAddr(socket.AF_INET, ipaddress.IPv4Address("10.96.1.12"), 53)


class Relays:
    """The relay table's side of peer_error: which sockets were made to fail."""

    def __init__(self) -> None:
        self.refused: list[tuple[int, Endpoint]] = []

    def relay_for(self, sock_key: int, family: int, peer: Endpoint) -> tuple[str, int]:
        raise AssertionError("not used")

    def sink_for(self, family: int) -> tuple[str, int]:
        raise AssertionError("not used")

    def connected_to_sink(self, sock_key: int, family: int, peer: Endpoint, program_port: int) -> None:
        raise AssertionError("not used")

    def peer_of(self, family: int, relay_port: int) -> Endpoint | None:
        raise AssertionError("not used")

    def refuse(self, sock_key: int, peer: Endpoint, program: socket.socket) -> bool:
        self.refused.append((sock_key, peer))
        return True

    def agent_port(self, sock_key: int) -> int | None:
        raise AssertionError("not used")


def test_a_refusal_for_a_process_that_exited_is_ignored() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=20)  # reaped: its pid names no process
    relays = Relays()
    redirector = UdpRedirector(relays, RoutingPolicy())
    record = redirector.table.udp_record(1234, socket.AF_INET)
    record.peer, record.where = PEER, (gone.pid, 3)
    redirector.peer_error(1234, PEER.endpoint, "ECONNREFUSED")
    assert relays.refused == []
