"""The relay's own legs of a program's connection send small writes at once (TCP_NODELAY):
the agent's socket to the destination (agent/dial.py) and ktrace's end of the program's loopback
connection (ktrace/tunnel/parking.py). With Nagle's algorithm on them, a request's second write
(an HTTP head, then its body) or an answer's second part waited for the peer's delayed ACK, ~40 ms
each, where the program in a pod waits for nothing; scripts/bench's ``split_writes`` measures it.
The program's own socket and the server's keep whatever they set.
"""

from __future__ import annotations

import socket

import pytest
from agent_helpers import LoopbackServer, run, upper_echo
from ktrace_agent.dial import start_dial
from ktrace_agent.wire.connecting import TCP_SYN_SENT, tcp_state

from ktrace.tunnel.parking import ParkingLot
from ktrace.tunnel.types import Endpoint

pytestmark = pytest.mark.timeout(30)


def nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_the_agents_socket_to_the_destination_has_no_nagle() -> None:
    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as target:
            sock, err = start_dial(Endpoint.parse(f"127.0.0.1:{target.port}"))
            with sock:
                assert err == 0  # loopback: connected within connect()
                assert nodelay(sock)
                assert not sock.getblocking()

    run(scenario())


def test_ktraces_end_of_a_parked_connection_has_no_nagle() -> None:
    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                program = socket.socket(family, socket.SOCK_STREAM)  # as the program made it: Nagle on
                with program:
                    end = lot.end_for(program)
                    with end:
                        assert nodelay(end)
                        assert not nodelay(program)
                        # It is bound where a program socket of that family parks.
                        assert end.getsockname()[1] == lot.address(family)[1]
                        assert tcp_state(end) != TCP_SYN_SENT
        finally:
            await lot.close()

    run(scenario())
