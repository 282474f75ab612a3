"""ParkingLot: a program socket waits in SYN_SENT at the parking listener, with no readiness,
until ktrace completes the handshake from the parking address (a simultaneous open) and
splices it to an agent stream. Real sockets and a real agent."""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import select
import socket
import threading
from typing import cast

import pytest
from agent_helpers import LoopbackServer, agent_and_client, run, upper_echo
from ktrace_agent.wire import connecting
from ktrace_agent.wire.connecting import tcp_state

from ktrace.tracer import sockops
from ktrace.tunnel.parking import ParkingLot, ProgramSocketGone
from ktrace.tunnel.types import Connection, Endpoint, TcpStats

pytestmark = pytest.mark.timeout(60)


def _parked(lot: ParkingLot, family: int) -> socket.socket:
    """A non-blocking program socket parked as the tracer parks one (connect on its duplicate)."""
    program = socket.socket(family, socket.SOCK_STREAM)
    program.setblocking(False)
    assert program.connect_ex(lot.address(family)) == errno.EINPROGRESS
    return program


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_parked_socket_shows_nothing_then_is_connected_to_the_stream(tmp_path: pathlib.Path, family: int) -> None:
    async def scenario() -> None:
        closed: asyncio.Queue[tuple[Connection, TcpStats]] = asyncio.Queue()
        lot = ParkingLot(on_closed=lambda stream, stats: closed.put_nowait((stream, stats)))
        await lot.start()
        try:
            async with (
                LoopbackServer(upper_echo) as target,
                agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client),
            ):
                program = _parked(lot, family)
                poller = select.epoll()
                poller.register(program.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
                # Parked: in SYN_SENT as towards a distant host, no event, no pending error.
                assert poller.poll(0.2) == []
                assert tcp_state(program) == sockops.TCP_SYN_SENT
                assert sockops.take_error(program) == 0
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
                duplicate = socket.socket(fileno=os.dup(program.fileno()))
                await lot.attach(stream, duplicate)
                duplicate.close()
                events = await asyncio.get_running_loop().run_in_executor(None, poller.poll, 5)
                assert events and events[0][1] & select.EPOLLOUT
                assert sockops.take_error(program) == 0
                reader, writer = await asyncio.open_connection(sock=program)
                writer.write(b"through the parking lot")
                assert await reader.readexactly(23) == b"THROUGH THE PARKING LOT"
                writer.write_eof()
                assert await reader.read() == b""
                got_stream, stats = await asyncio.wait_for(closed.get(), 10)
                assert got_stream is stream
                assert stats == TcpStats(bytes_up=23, bytes_down=23, outcome="closed")
                writer.close()
                poller.close()
        finally:
            await lot.close()

    run(scenario())


def test_a_blocking_connect_waits_in_the_kernel_until_attached(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        try:
            async with (
                LoopbackServer(upper_echo) as target,
                agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client),
            ):
                program = socket.socket()
                result: list[int] = []
                waiting = threading.Thread(
                    target=lambda: result.append(program.connect_ex(lot.address(socket.AF_INET)))
                )
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
                duplicate = socket.socket(fileno=os.dup(program.fileno()))
                # attach() waits for the connect to reach the kernel (the thread starts after it).
                attached = asyncio.ensure_future(lot.attach(stream, duplicate))
                waiting.start()
                await attached
                await asyncio.get_running_loop().run_in_executor(None, waiting.join, 10)
                assert result == [0]
                duplicate.close()
                program.setblocking(False)
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(program, b"x")
                assert await loop.sock_recv(program, 1) == b"X"
                program.close()
        finally:
            await lot.close()

    run(scenario())


def test_a_failed_dial_disconnects_the_parked_socket_with_readiness_and_an_error() -> None:
    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        try:
            program = _parked(lot, socket.AF_INET)
            poller = select.epoll()
            poller.register(program.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP)
            assert sockops.disconnect(program.fileno()) == 0
            (_, events), *_ = poller.poll(5)
            # What a failed connect shows (but POLLIN|POLLRDHUP, which a pod's also has: tcp.py).
            want = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
            assert events == want
            assert sockops.take_error(program) == errno.ECONNRESET  # what tcp.py answers with the agent's
            poller.close()
            program.close()
        finally:
            await lot.close()

    run(scenario())


def test_a_socket_that_is_not_parked_is_not_attached(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        try:
            async with (
                LoopbackServer(upper_echo) as target,
                agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client),
            ):
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
                elsewhere = socket.create_connection(("127.0.0.1", target.port))
                with pytest.raises(ProgramSocketGone):
                    await lot.attach(stream, elsewhere)
                await stream.abort()
                elsewhere.close()
        finally:
            await lot.close()

    run(scenario())


def test_nobody_else_gets_through_the_parking_listener() -> None:
    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        try:
            intruder = socket.socket()
            intruder.setblocking(False)
            assert intruder.connect_ex(lot.address(socket.AF_INET)) == errno.EINPROGRESS
            poller = select.epoll()
            poller.register(intruder.fileno(), select.EPOLLOUT)
            assert poller.poll(0.3) == []  # its SYN is dropped: never accepted
            # And its port cannot be bound by a socket without SO_REUSEPORT of the same user.
            squatter = socket.socket()
            with pytest.raises(OSError):
                squatter.bind(lot.address(socket.AF_INET))
            squatter.close()
            poller.close()
            intruder.close()
        finally:
            await lot.close()

    run(scenario())


def test_an_attach_given_up_while_completing_the_handshake_closes_ktrace_s_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dial given up during the hand-over (the program disconnected or ended: the tracer cancels
    the task) must close the socket attach() made, not leave it to the garbage collector.

    On loopback the handshake is complete when connect() returns, so attach() has no await there;
    its answer is withheld here (attach() waits for the event loop instead, as it does when the
    kernel has not finished the handshake within the call)."""
    monkeypatch.setattr(connecting, "connect_now", lambda sock, address: errno.EINPROGRESS)

    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        try:
            with socket.socket() as program:
                program.setblocking(False)
                assert program.connect_ex(lot.address(socket.AF_INET)) == errno.EINPROGRESS
                before = set(os.listdir("/proc/self/fd"))
                task = asyncio.ensure_future(lot.attach(cast(Connection, None), program))
                await asyncio.sleep(0)  # one step: it waits for its own connect now
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # The task (and the coroutine's frame, which would close the socket on collection)
                # is still referenced here, as the tracer's record references it.
                assert set(os.listdir("/proc/self/fd")) - before == set()
        finally:
            await lot.close()

    run(scenario())
