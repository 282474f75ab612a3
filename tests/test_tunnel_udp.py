"""UDP sessions through a real agent to a loopback UDP echo server, and the sessions opened ahead of need."""

from __future__ import annotations

import asyncio
import pathlib
import socket

import grpc.aio
import pytest
from agent_helpers import TOKEN, UdpEcho, agent, agent_and_client, run, udp_echo
from ktrace_agent.wire import rpc

from ktrace.tunnel.types import Endpoint, TunnelError
from ktrace.tunnel.udp_mux import UdpMux
from ktrace.tunnel.udp_session import SessionSpares


async def _echo_server(host: str) -> tuple[asyncio.DatagramTransport, UdpEcho, int]:
    return await udp_echo(host)


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_udp_echo(tmp_path: pathlib.Path, family: int, host: str) -> None:
    async def scenario() -> None:
        try:
            transport, echo, port = await _echo_server(host)
        except OSError:
            pytest.skip(f"no {host}")
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
                session = await client.open_udp(family)
                assert session.local.port != 0
                received: asyncio.Queue[tuple[Endpoint, bytes]] = asyncio.Queue()
                session.set_receiver(lambda source, payload: received.put_nowait((source, payload)))
                dest = Endpoint.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
                for i in range(3):
                    assert session.send(dest, b"ping %d" % i)
                got = [await received.get() for _ in range(3)]
                assert sorted(payload for _, payload in got) == [b"PING 0", b"PING 1", b"PING 2"]
                assert all(source == dest for source, _ in got)
                # One agent socket: the server saw a single, stable source port.
                assert {addr[1] for addr in echo.sources} == {session.local.port}
                await session.close()
                assert not session.send(dest, b"after close")
        finally:
            transport.close()

    run(scenario())


def test_udp_port_unreachable_is_a_peer_failure_frame(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        transport, _, port = await _echo_server("127.0.0.1")
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
                session = await client.open_udp(socket.AF_INET)
                errors: asyncio.Queue[tuple[Endpoint, TunnelError]] = asyncio.Queue()
                received: asyncio.Queue[bytes] = asyncio.Queue()
                session.set_error_receiver(lambda error: errors.put_nowait((Endpoint.parse("0.0.0.0:0"), error)))
                session.set_peer_error_receiver(lambda peer, error: errors.put_nowait((peer, error)))
                session.set_receiver(lambda _source, payload: received.put_nowait(payload))
                closed = Endpoint.parse(f"127.0.0.1:{closed_port}")
                session.send(closed, b"nobody home")
                # The agent's error queue names the destination the port unreachable is about.
                peer, error = await errors.get()
                assert (peer, error.errno_name) == (closed, "ECONNREFUSED")
                # The session survives the error.
                session.send(Endpoint.parse(f"127.0.0.1:{port}"), b"still here")
                assert await received.get() == b"STILL HERE"
                await session.close()
        finally:
            transport.close()

    run(scenario())


def test_send_queue_is_bounded(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        transport, _, port = await _echo_server("127.0.0.1")
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
                session = await client.open_udp(socket.AF_INET)
                dest = Endpoint.parse(f"127.0.0.1:{port}")
                # Without yielding to the loop nothing drains the queue: the excess is dropped.
                results = [session.send(dest, b"x") for _ in range(2000)]
                assert not all(results)
                assert session.dropped == results.count(False) > 0
                await session.close()
        finally:
            transport.close()

    run(scenario())


def test_udp_sessions_are_opened_ahead_of_need(tmp_path: pathlib.Path) -> None:
    """After the first session of a family, the next ones were opened before they were asked
    for (the agent's socket exists already); spares that ended are never handed out."""

    async def scenario() -> None:
        transport, echo, port = await _echo_server("127.0.0.1")
        dest = Endpoint.parse(f"127.0.0.1:{port}")
        address = f"unix:{tmp_path}/a.sock"
        try:
            async with agent(address, token=TOKEN) as server:
                channel = grpc.aio.insecure_channel(address)
                metadata = rpc.bearer_metadata(TOKEN)
                started: list[rpc.UdpCall] = []

                def start_call() -> rpc.UdpCall:
                    started.append(rpc.Stub(channel).datagram_sessions(metadata=metadata))
                    return started[-1]

                mux = UdpMux(start_call)
                spares = SessionSpares(mux.start, 2)
                first = spares.take(socket.AF_INET)  # none spare yet: opened now
                assert spares.idle(socket.AF_INET) == ()
                received: asyncio.Queue[bytes] = asyncio.Queue()
                first.set_receiver(lambda _source, payload: received.put_nowait(payload))
                assert first.send(dest, b"one") and await received.get() == b"ONE"
                waiting = spares.idle(socket.AF_INET)
                assert len(waiting) == 2 and spares.idle(socket.AF_INET6) == ()
                for spare in waiting:
                    await spare.until_answered()
                second = spares.take(socket.AF_INET)
                assert second is waiting[0]
                assert second.local.port not in (0, first.local.port)  # answered before it was asked for
                second.set_receiver(lambda _source, payload: received.put_nowait(payload))
                assert second.send(dest, b"two") and await received.get() == b"TWO"
                assert {addr[1] for addr in echo.sources} == {first.local.port, second.local.port}

                await server.stop(grace=None)  # the agent goes away: every spare ends with its stream
                dead = spares.idle(socket.AF_INET)
                for spare in dead:
                    await asyncio.wait_for(spare.closed.wait(), 10)
                assert len(started) == 1  # one stream carried them all
                await asyncio.wait_for(started[0].code(), 10)
                await server.start()
                # A call started while the channel is still backing off from the lost agent fails
                # at once (UNAVAILABLE); ktrace's client waits for the tunnel the same way.
                await asyncio.wait_for(channel.channel_ready(), 10)
                third = spares.take(socket.AF_INET)
                assert third not in dead
                third.set_receiver(lambda _source, payload: received.put_nowait(payload))
                await asyncio.wait_for(third.until_answered(), 10)
                assert third.send(dest, b"three") and await received.get() == b"THREE"
                assert len(started) == 2  # the next session started the next stream
                for session in (first, second, third):
                    await session.close()
                await spares.close()
                await mux.close()
                await channel.close()
        finally:
            transport.close()

    run(scenario())


def test_spare_sessions_are_replaced_later_unless_none_is_left(tmp_path: pathlib.Path) -> None:
    """Replacing a spare right away would compete with the datagram just sent on it: it waits
    REFILL_DELAY, unless the last spare was taken."""

    async def scenario() -> None:
        address = f"unix:{tmp_path}/a.sock"
        async with agent(address, token=TOKEN):
            channel = grpc.aio.insecure_channel(address)
            metadata = rpc.bearer_metadata(TOKEN)
            mux = UdpMux(lambda: rpc.Stub(channel).datagram_sessions(metadata=metadata))
            spares = SessionSpares(mux.start, 2)
            taken = [spares.take(socket.AF_INET)]
            await asyncio.sleep(0)  # one loop turn: the first refill is at once
            assert len(spares.idle(socket.AF_INET)) == 2
            taken.append(spares.take(socket.AF_INET))
            await asyncio.sleep(0)
            assert len(spares.idle(socket.AF_INET)) == 1  # one left: replaced later
            taken.append(spares.take(socket.AF_INET))
            await asyncio.sleep(0)
            assert len(spares.idle(socket.AF_INET)) == 2  # none was left: at once
            for session in taken:
                await session.close()
            await spares.close()
            await mux.close()
            await channel.close()

    run(scenario())
