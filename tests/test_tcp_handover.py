"""Connections handed to a same-host agent (agent/handover.py, agent/socket_relay.py, ktrace/tunnel/handover.py).

A real agent on a Unix socket, ktrace's client with ``handover=True``, real loopback TCP connections on
both sides (a socketpair cannot show a reset): what the program and the server see must be what they
see through the tunnel (tests/test_tunnel_tcp.py), and so must ktrace's report figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agent_helpers import (
    TOKEN,
    LoopbackServer,
    agent,
    drain_all,
    pump,
    ready_then_observe,
    run,
    spliced,
    tcp_pair,
    upper_echo,
)
from handler_helpers import until
from ktrace_agent.handover import HandoverDesk, HandoverRefused
from ktrace_agent.server import AgentServer

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.desk import DeskConnection
from ktrace.tunnel.handover import HandoverLine
from ktrace.tunnel.types import Endpoint, TcpStats

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["desk", "ticket"])
def way(request: pytest.FixtureRequest) -> str:
    """How connections reach the agent: dialled on a keyed line to its desk (agent/desk_line.py),
    or opened on a Connect stream and handed over with its ticket (an agent from before the
    keyed line, and this ktrace)."""
    return str(request.param)


@contextlib.asynccontextmanager
async def handing_over(
    tmp_path: pathlib.Path, way: str = "desk", **agent_kwargs: Any
) -> AsyncIterator[tuple[AgentServer, AgentClient]]:
    agent_kwargs.setdefault("tcp_desk", way == "desk")
    async with agent(f"unix:{tmp_path}/agent.sock", token=TOKEN, **agent_kwargs) as server:
        client = await AgentClient.connect(server.address, TOKEN, timeout=10, handover=True)
        try:
            yield server, client
        finally:
            await client.close()


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_data_both_ways_relayed_by_the_agent(tmp_path: pathlib.Path, way: str) -> None:
    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as target, handing_over(tmp_path, way) as (_, client):
            assert client.hands_over
            for _ in range(3):  # one after another on the same (reused) stream
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
                (p_reader, p_writer), splice = await spliced(stream)
                p_writer.write(b"hello agent")
                assert await p_reader.readexactly(11) == b"HELLO AGENT"
                p_writer.write_eof()
                assert await p_reader.read() == b""
                assert await splice == TcpStats(bytes_up=11, bytes_down=11, outcome="closed")
                p_writer.close()
            assert target.accepted == 3

    run(scenario())


def test_bulk_both_ways_intact(tmp_path: pathlib.Path, way: str) -> None:
    async def sink_then_send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = await drain_all(reader)
        writer.write(repr(received).encode() + b"\n")
        await pump(writer, 16 << 20, seed=2)

    async def scenario() -> None:
        async with LoopbackServer(sink_then_send) as target, handing_over(tmp_path, way) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            sent = await pump(p_writer, 32 << 20, seed=1)
            assert (await p_reader.readline()).decode().strip() == repr((32 << 20, sent))
            count, _ = await drain_all(p_reader)
            stats = await splice
            assert (stats.bytes_up, stats.bytes_down - len(repr((32 << 20, sent))) - 1, count) == (
                32 << 20,
                16 << 20,
                16 << 20,
            )
            assert stats.outcome == "closed"
            p_writer.close()

    run(scenario())


def test_half_close_server_still_answers(tmp_path: pathlib.Path, way: str) -> None:
    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        writer.write(b"got %d bytes" % len(request))
        await writer.drain()

    async def scenario() -> None:
        async with LoopbackServer(answer_after_eof) as target, handing_over(tmp_path, way) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            p_writer.write(b"x" * 1000)
            p_writer.write_eof()
            assert await p_reader.read() == b"got 1000 bytes"
            assert (await splice).outcome == "closed"
            p_writer.close()

    run(scenario())


def test_remote_reset_reaches_the_program_as_a_reset(tmp_path: pathlib.Path, way: str) -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        reset(writer)

    async def scenario() -> None:
        async with LoopbackServer(reset_after_hello) as target, handing_over(tmp_path, way) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            p_writer.write(b"hello")
            assert (await splice).outcome == "reset: ECONNRESET"
            with pytest.raises(ConnectionResetError):
                await p_reader.read()
            p_writer.close()

    run(scenario())


def test_program_reset_reaches_the_server_as_a_reset(tmp_path: pathlib.Path, way: str) -> None:
    async def scenario() -> None:
        seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        async with LoopbackServer(ready_then_observe(seen)) as target, handing_over(tmp_path, way) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            assert await p_reader.readexactly(5) == b"ready"
            reset(p_writer)
            assert await asyncio.wait_for(seen, 10) == "reset"
            assert (await splice).outcome == "reset: local ConnectionResetError"

    run(scenario())


def test_ktrace_aborting_resets_both_sides(tmp_path: pathlib.Path, way: str) -> None:
    async def scenario() -> None:
        seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        async with LoopbackServer(ready_then_observe(seen)) as target, handing_over(tmp_path, way) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            assert await p_reader.readexactly(5) == b"ready"
            await stream.abort()
            assert await asyncio.wait_for(seen, 10) == "reset"
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(p_reader.read(), 10)
            assert (await splice).outcome.startswith(("aborted", "error: CANCELLED"))
            p_writer.close()

    run(scenario())


def test_a_stopped_agent_resets_the_program_promptly(tmp_path: pathlib.Path) -> None:
    """Our copy of the program's socket outlives the agent's, so the program sees a reset, not a FIN."""

    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as target, agent(f"unix:{tmp_path}/agent.sock", token=TOKEN) as server:
            client = await AgentClient.connect(server.address, TOKEN, timeout=10, handover=True)
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            p_writer.write(b"hi")
            assert await p_reader.readexactly(2) == b"HI"
            await server.stop(grace=None)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(p_reader.read(), 10)
            assert (await splice).outcome.startswith("error:")
            p_writer.close()
            await client.close()

    run(scenario())


def test_who_is_offered_and_who_reaches_it(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with agent("127.0.0.1:0", token=TOKEN) as server:  # another host's agent, as far as it knows
            client = await AgentClient.connect(server.address, TOKEN, timeout=10, handover=True)
            assert (client.info.tcp_handover_path, client.hands_over) == ("", False)
            await client.close()
        async with agent(f"unix:{tmp_path}/old.sock", token=TOKEN, tcp_handover=False) as server:
            client = await AgentClient.connect(server.address, TOKEN, timeout=10, handover=True)
            assert (client.info.tcp_handover_path, client.hands_over) == ("", False)
            await client.close()
        async with handing_over(tmp_path) as (server, client):
            path = client.info.tcp_handover_path
            assert path == f"{tmp_path}/agent.sock.fds"
            assert pathlib.Path(path).stat().st_mode & 0o777 == 0o600
            # Another agent at that path (a socket forwarded from elsewhere): not this one.
            assert await HandoverLine.connect(path, b"\0" * 16) is None
            assert await HandoverLine.connect(f"{tmp_path}/nothing-here", client.info.tcp_handover_id) is None
        assert not pathlib.Path(path).exists()  # the agent removed it at stop

    run(scenario())


def test_the_desk_takes_only_a_tcp_socket_with_a_ticket_it_issued(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        desk = HandoverDesk(f"{tmp_path}/a.sock")
        assert desk.start()
        try:
            line = await HandoverLine.connect(desk.path, desk.id)
            assert line is not None
            (p_reader, p_writer), k_sock = await tcp_pair()
            # A ticket the desk never issued: the socket is closed there, and ours too, so the program sees EOF.
            await line.give(b"\1" * 16, desk.id, k_sock)
            k_sock.close()
            assert await asyncio.wait_for(p_reader.read(), 10) == b""
            p_writer.close()
            # Not a TCP socket: refused, for that ticket only.
            ticket = desk.issue()
            a, b = socket.socketpair()
            await line.give(ticket, desk.id, a)
            with pytest.raises(HandoverRefused):
                await desk.take(ticket, 10)
            a.close()
            b.close()
            # A ticket is taken once; a late socket for a withdrawn one is closed.
            ticket = desk.issue()
            (p_reader, p_writer), k_sock = await tcp_pair()
            await line.give(ticket, desk.id, k_sock)
            taken = await desk.take(ticket, 10)
            assert taken.getpeername() == k_sock.getpeername()
            taken.close()
            ticket = desk.issue()
            desk.withdraw(ticket)
            await line.give(ticket, desk.id, k_sock)
            k_sock.close()
            assert await asyncio.wait_for(p_reader.read(), 10) == b""
            p_writer.close()
            with pytest.raises(TimeoutError):
                await desk.take(desk.issue(), 0.05)
            line.close()
        finally:
            desk.close()

    run(scenario())


def test_an_agent_restarted_at_the_same_path_gets_the_next_connections(tmp_path: pathlib.Path) -> None:
    """The channel reconnects to the new agent by itself; the line follows the desk its `opened` names."""

    async def scenario() -> None:
        path = f"unix:{tmp_path}/agent.sock"
        async with LoopbackServer(upper_echo) as target:
            async with agent(path, token=TOKEN) as first:
                client = await AgentClient.connect(first.address, TOKEN, timeout=10, handover=True)
                old_id = client.info.tcp_handover_id
            try:
                async with agent(path, token=TOKEN) as second:
                    stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"), timeout=10)
                    (p_reader, p_writer), splice = await spliced(stream)
                    p_writer.write(b"again")
                    assert await p_reader.readexactly(5) == b"AGAIN"
                    p_writer.write_eof()
                    assert await p_reader.read() == b""
                    assert await splice == TcpStats(bytes_up=5, bytes_down=5, outcome="closed")
                    assert second._desk is not None and second._desk.id != old_id
                    p_writer.close()
                    # That one went through the tunnel, while ktrace asked the new agent for its desk:
                    # the next ones are dialled on a line to it.
                    desk = second._desk
                    await until(lambda: bool(desk._keyed), "a line to the new agent's desk", timeout=10)
                    stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"), timeout=10)
                    assert isinstance(stream, DeskConnection)
                    (p_reader, p_writer), splice = await spliced(stream)
                    p_writer.write(b"desk")
                    assert await p_reader.readexactly(4) == b"DESK"
                    p_writer.write_eof()
                    assert await splice == TcpStats(bytes_up=4, bytes_down=4, outcome="closed")
                    p_writer.close()
            finally:
                await client.close()

    run(scenario())
