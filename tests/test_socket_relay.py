"""The agent's relay of two sockets it holds (agent/socket_relay.py), on real loopback TCP pairs.

What a handed-over connection sees end to end is in tests/test_tcp_handover.py; here, what only
the relay itself decides: that it holds no more than one chunk when the far side does not read,
that what was waiting before it started crosses at once, and that it leaves no socket registered
with the event loop however it ends.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from agent_helpers import run, tcp_pair
from handler_helpers import until
from ktrace_agent.socket_relay import CHUNK, relay_sockets

pytestmark = pytest.mark.timeout(60)


def registered(sock: socket.socket) -> bool:
    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    return sock.fileno() in selector.get_map()


def raw_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection as two plain non-blocking sockets (no stream reader that would
    read ahead into its own buffer): (the connecting end, the accepted end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


def test_a_remote_that_does_not_read_stops_the_relay_reading() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sender, program = raw_pair()  # the program, and the relay's end of its connection
        remote, server = raw_pair()  # the relay's connection to a server that reads nothing yet
        relay = asyncio.ensure_future(relay_sockets(program, remote))
        # The program writes until the kernel refuses for a while: the relay must stop reading once
        # its sends to the server stall, so what leaves the program is bounded by the kernel's
        # buffers and one chunk in the relay.
        accepted, stalled = 0, 0
        block = b"x" * 65536
        while stalled < 50:
            try:
                accepted += sender.send(block)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                await asyncio.sleep(0)
        buffers = sum(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for s in (sender, remote)) + sum(
            s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in (program, server)
        )
        assert 0 < accepted <= buffers + CHUNK, (accepted, buffers)
        # Then the server reads: everything crosses, complete.
        sender.shutdown(socket.SHUT_WR)
        total = 0
        while chunk := await loop.sock_recv(server, 1 << 20):
            assert chunk == b"x" * len(chunk)
            total += len(chunk)
        assert total == accepted
        server.shutdown(socket.SHUT_WR)
        relayed = await relay
        assert (relayed.bytes_up, relayed.bytes_down, relayed.outcome) == (accepted, 0, "")
        for sock in (sender, program, remote, server):
            sock.close()

    run(scenario())


def test_what_waited_before_the_relay_started_crosses_and_nothing_stays_registered() -> None:
    async def scenario() -> None:
        (p_reader, p_writer), program = await tcp_pair()
        (r_reader, r_writer), remote = await tcp_pair()
        p_writer.write(b"early")
        await p_writer.drain()
        await until(lambda: len(program.recv(16, socket.MSG_PEEK)) == 5, "the program's bytes to arrive")
        relay = asyncio.ensure_future(relay_sockets(program, remote))
        assert await r_reader.readexactly(5) == b"early"
        r_writer.write(b"late")
        assert await p_reader.readexactly(4) == b"late"
        p_writer.write_eof()
        assert await r_reader.read() == b""
        r_writer.write_eof()
        assert await p_reader.read() == b""
        relayed = await relay
        assert (relayed.bytes_up, relayed.bytes_down, relayed.outcome) == (5, 4, "")
        assert not registered(program) and not registered(remote)
        p_writer.close()
        r_writer.close()

    run(scenario())


@pytest.mark.parametrize("end", ["cancelled", "reset"])
def test_however_it_ends_no_socket_stays_registered(end: str) -> None:
    async def scenario() -> None:
        (p_reader, p_writer), program = await tcp_pair()
        (r_reader, r_writer), remote = await tcp_pair()
        relay = asyncio.ensure_future(relay_sockets(program, remote))
        p_writer.write(b"ping")
        assert await r_reader.readexactly(4) == b"ping"
        if end == "cancelled":
            relay.cancel()
            with pytest.raises(asyncio.CancelledError):
                await relay
        else:
            r_sock = r_writer.get_extra_info("socket")
            r_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            r_writer.transport.abort()
            relayed = await relay
            assert relayed.outcome == "reset: ECONNRESET"
        assert not registered(program) and not registered(remote)
        program.close()  # SO_LINGER 0 was set on it: the program sees a reset
        with pytest.raises(ConnectionResetError):
            await p_reader.read()
        p_writer.close()
        remote.close()
        r_writer.close()

    run(scenario())
