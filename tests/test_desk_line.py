"""A keyed line to a same-host agent's desk (agent/desk_line.py, ktrace/tunnel/desk.py).

A real agent on a Unix socket; the line spoken record by record as a client would (and as a
broken or hostile one might), real loopback TCP servers behind it. What matters: only the key
from an authenticated handshake opens a line; every fault ends that line and its connections
(reset, never left half-open) and nothing else; the agent's answers carry the kernel's errno.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import pathlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from agent_helpers import TOKEN, LoopbackServer, agent, ready_then_observe, run, tcp_pair, upper_echo
from handler_helpers import until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ktrace_agent import desk_line
from ktrace_agent.server import AgentServer
from ktrace_agent.wire import PROTOCOL_VERSION, codec, rpc

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.desk import DeskClient, DeskConnection
from ktrace.tunnel.handover import dial_desk
from ktrace.tunnel.parking import ParkingLot
from ktrace.tunnel.types import Connection, Endpoint, TcpStats, TunnelError, TunnelLost

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def desk_agent(tmp_path: pathlib.Path, **kwargs: Any) -> AsyncIterator[tuple[AgentServer, rpc.HandshakeReply]]:
    """An agent on a Unix socket and its answer to an authenticated handshake (where the desk is,
    its id and key). Only the handshake: no other call of a client keeps the agent busy."""
    async with agent(f"unix:{tmp_path}/agent.sock", token=TOKEN, **kwargs) as server:
        yield server, await handshake(server.address, TOKEN)


async def handshake(address: str, token: str) -> rpc.HandshakeReply:
    channel = grpc.aio.insecure_channel(rpc.grpc_target(address), options=rpc.CHANNEL_OPTIONS)
    try:
        request = rpc.HandshakeRequest(protocol_version=PROTOCOL_VERSION)
        return await rpc.Stub(channel).handshake(request, metadata=rpc.bearer_metadata(token), timeout=10)
    finally:
        await channel.close()


async def raw_line(reply: rpc.HandshakeReply, key: bytes | None = None) -> socket.socket:
    """A line to the desk that has said ``key`` (the desk's own by default)."""
    sock = await dial_desk(reply.tcp_handover_path, reply.tcp_handover_id)
    assert sock is not None
    sock.send(rpc.DeskRequest(hello=reply.tcp_desk_key if key is None else key).SerializeToString())
    return sock


async def answer(sock: socket.socket) -> rpc.DeskAnswer | None:
    """The next answer on the line; None once the agent closed it."""
    record = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 512), 10)
    return rpc.DeskAnswer.FromString(record) if record else None


def open_request(conn_id: int, dest: Endpoint) -> bytes:
    return rpc.DeskRequest(id=conn_id, open=rpc.TcpOpen(destination=codec.encode_address(dest))).SerializeToString()


def test_a_connection_dialled_attached_and_relayed_record_by_record(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with LoopbackServer(upper_echo) as target, desk_agent(tmp_path) as (_, reply):
            line = await raw_line(reply)
            dest = Endpoint.parse(f"127.0.0.1:{target.port}")
            await loop.sock_sendall(line, open_request(7, dest))
            opened = await answer(line)
            assert opened is not None and opened.id == 7 and opened.WhichOneof("kind") == "opened"
            assert codec.decode_address(opened.opened.peer) == dest
            (p_reader, p_writer), k_sock = await tcp_pair()
            socket.send_fds(line, [rpc.DeskRequest(id=7, attach=True).SerializeToString()], [k_sock.fileno()])
            p_writer.write(b"through the desk")
            assert await p_reader.readexactly(16) == b"THROUGH THE DESK"
            p_writer.write_eof()
            assert await asyncio.wait_for(p_reader.read(), 10) == b""
            relayed = await answer(line)
            assert relayed is not None and relayed.id == 7 and relayed.WhichOneof("kind") == "relayed"
            assert (relayed.relayed.bytes_up, relayed.relayed.bytes_down, relayed.relayed.outcome) == (16, 16, "")
            k_sock.close()
            p_writer.close()
            line.close()

    run(scenario())


def test_a_refused_dial_answers_the_kernels_errno(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))  # bound, not listening: a connect to it is refused
            port = unused.getsockname()[1]
            async with desk_agent(tmp_path) as (_, reply):
                line = await raw_line(reply)
                await asyncio.get_running_loop().sock_sendall(
                    line, open_request(1, Endpoint.parse(f"127.0.0.1:{port}"))
                )
                failed = await answer(line)
                assert failed is not None and failed.WhichOneof("kind") == "failure"
                assert failed.failure.errno_name == "ECONNREFUSED"
                line.close()

    run(scenario())


def test_only_the_handshakes_key_opens_a_line(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with desk_agent(tmp_path) as (server, reply):
            assert len(reply.tcp_desk_key) == 32
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await handshake(server.address, "not-the-token")  # no key without the token
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for key in (b"", b"x" * 32, reply.tcp_desk_key[:-1] + bytes([reply.tcp_desk_key[-1] ^ 1])):
                line = await raw_line(reply, key)
                assert await answer(line) is None  # closed by the agent, nothing dialled
                line.close()
            # The agent serves on: a line with the key works.
            assert await DeskClient.connect(reply.tcp_handover_path, reply.tcp_handover_id, reply.tcp_desk_key)
        async with agent(f"unix:{tmp_path}/old.sock", token=TOKEN, tcp_desk=False) as server:
            client = await AgentClient.connect(server.address, TOKEN, timeout=10, handover=True)
            assert client.info.tcp_desk_key == b"" and client.hands_over  # tickets, as before
            await client.close()

    run(scenario())


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff\xff\xff",  # not a message
        rpc.DeskRequest(id=1, hello=b"again").SerializeToString(),  # hello is the first record only
        rpc.DeskRequest(id=2).SerializeToString(),  # no kind
        rpc.DeskRequest(id=1, attach=True).SerializeToString(),  # attach without a descriptor
        open_request(1, Endpoint.parse("127.0.0.1:1")),  # id 1 is open already
    ],
    ids=["garbage", "hello-again", "no-kind", "attach-no-fd", "id-in-use"],
)
def test_a_broken_record_ends_its_line_and_resets_its_connections_only(tmp_path: pathlib.Path, bad: bytes) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[str] = loop.create_future()
        async with (
            LoopbackServer(ready_then_observe(seen)) as watched,
            LoopbackServer(upper_echo) as target,
            desk_agent(tmp_path) as (_, reply),
        ):
            other = DeskClient.connect(reply.tcp_handover_path, reply.tcp_handover_id, reply.tcp_desk_key)
            good = await other
            assert good is not None
            line = await raw_line(reply)
            await loop.sock_sendall(line, open_request(1, Endpoint.parse(f"127.0.0.1:{watched.port}")))
            first = await answer(line)
            assert first is not None and first.WhichOneof("kind") == "opened"
            await loop.sock_sendall(line, bad)
            assert await answer(line) is None  # the line is ended
            assert await asyncio.wait_for(seen, 10) == "reset"  # and its connection reset
            line.close()
            # Another line of the same agent is untouched.
            opened = await good.dial(Endpoint.parse(f"127.0.0.1:{target.port}"), 5, _no_fallback)
            (p_reader, p_writer), k_sock = await tcp_pair()
            splice = asyncio.create_task(opened.splice(k_sock))
            p_writer.write(b"still")
            assert await p_reader.readexactly(5) == b"STILL"
            p_writer.write_eof()
            assert await splice == TcpStats(bytes_up=5, bytes_down=5, outcome="closed")
            p_writer.close()
            good.close()

    run(scenario())


async def _no_fallback(lost: TunnelLost) -> Connection:
    raise AssertionError(f"the line was lost: {lost}")


def test_a_descriptor_that_is_not_a_tcp_socket_ends_the_line(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with LoopbackServer(upper_echo) as target, desk_agent(tmp_path) as (_, reply):
            line = await raw_line(reply)
            await loop.sock_sendall(line, open_request(3, Endpoint.parse(f"127.0.0.1:{target.port}")))
            assert (await answer(line)) is not None
            a, b = socket.socketpair()
            with a, b:
                socket.send_fds(line, [rpc.DeskRequest(id=3, attach=True).SerializeToString()], [a.fileno()])
                assert await answer(line) is None
            line.close()

    run(scenario())


def test_a_client_that_leaves_resets_its_connections(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[str] = loop.create_future()
        async with LoopbackServer(ready_then_observe(seen)) as watched, desk_agent(tmp_path) as (server, reply):
            line = await raw_line(reply)
            await loop.sock_sendall(line, open_request(5, Endpoint.parse(f"127.0.0.1:{watched.port}")))
            assert (await answer(line)) is not None
            (p_reader, p_writer), k_sock = await tcp_pair()
            socket.send_fds(line, [rpc.DeskRequest(id=5, attach=True).SerializeToString()], [k_sock.fileno()])
            assert await p_reader.readexactly(5) == b"ready"  # relayed
            line.close()  # ktrace died
            assert await asyncio.wait_for(seen, 10) == "reset"
            k_sock.close()  # the agent's copy was reset: the program sees the reset once ours goes
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(p_reader.read(), 10)
            p_writer.close()
            await until(lambda: server._active == 0, "the connection to be counted as ended")

    run(scenario())


def test_a_socket_never_attached_is_reset_after_the_wait(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(desk_line, "ATTACH_WAIT", 0.2)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[str] = loop.create_future()
        async with LoopbackServer(ready_then_observe(seen)) as watched, desk_agent(tmp_path) as (_, reply):
            line = await raw_line(reply)
            await loop.sock_sendall(line, open_request(9, Endpoint.parse(f"127.0.0.1:{watched.port}")))
            assert (await answer(line)) is not None
            gave_up = await answer(line)
            assert gave_up is not None and gave_up.WhichOneof("kind") == "failure"
            assert gave_up.failure.errno_name == "ECONNABORTED"
            assert await asyncio.wait_for(seen, 10) == "reset"
            line.close()

    run(scenario())


def test_connections_per_line_are_capped(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with LoopbackServer(upper_echo) as target, desk_agent(tmp_path, max_client_streams=2) as (_, reply):
            line = await raw_line(reply)
            dest = Endpoint.parse(f"127.0.0.1:{target.port}")
            for conn_id in (1, 2, 3):
                await loop.sock_sendall(line, open_request(conn_id, dest))
            answers = [await answer(line) for _ in range(3)]
            kinds = {a.id: a.WhichOneof("kind") for a in answers if a is not None}
            assert kinds == {1: "opened", 2: "opened", 3: "failure"}
            refused = next(a for a in answers if a is not None and a.id == 3)
            assert refused.failure.errno_name == "ENOBUFS"
            await loop.sock_sendall(line, rpc.DeskRequest(id=1, abort=True).SerializeToString())
            await _until_answered(line, open_request(4, dest), "opened")  # a place is free again
            line.close()

    run(scenario())


async def _until_answered(line: socket.socket, request: bytes, kind: str) -> None:
    """Send ``request`` until it is answered with ``kind`` (the agent frees a place when the aborted
    connection's task has ended: no event to wait on from here)."""
    deadline = asyncio.get_running_loop().time() + 10
    conn_id = rpc.DeskRequest.FromString(request).id
    while True:
        await asyncio.get_running_loop().sock_sendall(line, request)
        got = await answer(line)
        assert got is not None and got.id == conn_id
        if got.WhichOneof("kind") == kind:
            return
        assert asyncio.get_running_loop().time() < deadline, f"still {got}"
        await asyncio.sleep(0.01)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.binary(max_size=600), min_size=1, max_size=5))
def test_any_records_leave_the_agent_serving(tmp_path: pathlib.Path, records: list[bytes]) -> None:
    """Fuzzed: whatever a keyed line sends, the agent answers or ends that line, and serves the next."""

    async def scenario() -> None:
        async with desk_agent(tmp_path) as (_, reply):
            line = await raw_line(reply)
            loop = asyncio.get_running_loop()
            with contextlib.suppress(OSError):
                for record in records:
                    await loop.sock_sendall(line, record)
            line.close()
            fresh = await raw_line(reply)
            with socket.socket() as unused:
                unused.bind(("127.0.0.1", 0))  # bound, not listening: refused
                await loop.sock_sendall(fresh, open_request(1, Endpoint.parse(f"127.0.0.1:{unused.getsockname()[1]}")))
                got = await answer(fresh)
            assert got is not None and got.WhichOneof("kind") == "failure"
            assert got.failure.errno_name == "ECONNREFUSED"
            fresh.close()

    run(scenario())


def test_a_burst_beyond_the_kernels_queue_waits_its_turn(tmp_path: pathlib.Path) -> None:
    """The kernel holds a line's records up to the sender's SO_SNDBUF (a few hundred small ones by
    default; 1,000 connects at once go past it): the rest of a burst of opens and attaches (and of
    the agent's answers) must wait in order, not fail the line. The buffers are made small here so
    that 120 are a burst."""

    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as target, desk_agent(tmp_path) as (server, reply):
            line = await DeskClient.connect(reply.tcp_handover_path, reply.tcp_handover_id, reply.tcp_desk_key)
            assert line is not None
            desk = server._desk
            assert desk is not None
            await until(lambda: bool(desk._keyed), "the agent to take the line")
            for sock in (line._sock, next(iter(desk._keyed))._sock):  # both ways
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel's minimum
            dest = Endpoint.parse(f"127.0.0.1:{target.port}")
            dials = [line.dial(dest, 5, _no_fallback) for _ in range(BURST)]  # all sent (or queued) now
            connections = [await dial for dial in dials]
            pairs = [await tcp_pair() for _ in range(BURST)]
            for connection, (_, k_sock) in zip(connections, pairs, strict=True):
                connection.take(k_sock)  # all handed over at once
            splices = [
                asyncio.create_task(connection.splice(k_sock))
                for connection, (_, k_sock) in zip(connections, pairs, strict=True)
            ]
            for n, ((_, p_writer), _) in enumerate(pairs):
                p_writer.write(b"n%03d" % n)
                p_writer.write_eof()
            for n, ((p_reader, p_writer), _) in enumerate(pairs):
                assert await asyncio.wait_for(p_reader.read(), 10) == b"N%03d" % n
                p_writer.close()
            stats = await asyncio.gather(*splices)
            assert stats == [TcpStats(bytes_up=4, bytes_down=4, outcome="closed")] * BURST
            assert line.lost is None
            line.close()

    run(scenario())


BURST = 120  # > 10 records of each kind, well within the test's descriptors


def test_the_agent_completes_a_parked_connect_and_says_opened_first(tmp_path: pathlib.Path) -> None:
    """DeskRequest.complete: the program's parked socket and one bound to the parking address go
    with ``open``; the agent connects the program's socket itself. ``opened`` is on the line before
    the program can see its connect complete, so reading the line at that moment (``catch_up``, as a
    names stop does) always finds it."""

    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        try:
            async with LoopbackServer(upper_echo) as target, desk_agent(tmp_path) as (_, reply):
                line = await DeskClient.connect(reply.tcp_handover_path, reply.tcp_handover_id, reply.tcp_desk_key)
                assert line is not None
                for _ in range(20):
                    program = socket.socket()
                    program.setblocking(False)
                    assert program.connect_ex(lot.address(socket.AF_INET)) == errno.EINPROGRESS  # parked
                    heard: list[Endpoint] = []
                    dest = Endpoint.parse(f"127.0.0.1:{target.port}")
                    dial = line.dial(
                        dest, 5, _no_fallback, parked=(lot.end_for(program), program), on_opened=heard.append
                    )
                    await _writable(program)  # the program's connect completed, by the agent
                    line.catch_up()
                    assert len(heard) == 1 and heard[0].port != 0  # known before the program could ask
                    assert program.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    connection = await dial
                    assert isinstance(connection, DeskConnection) and connection.end is not None
                    await connection.attached()
                    splice = asyncio.create_task(connection.splice(connection.end))
                    loop = asyncio.get_running_loop()
                    await loop.sock_sendall(program, b"parked")
                    assert await loop.sock_recv(program, 6) == b"PARKED"
                    program.shutdown(socket.SHUT_WR)
                    assert await loop.sock_recv(program, 6) == b""
                    assert await splice == TcpStats(bytes_up=6, bytes_down=6, outcome="closed")
                    program.close()
                line.close()
        finally:
            await lot.close()

    run(scenario())


def test_a_program_socket_that_never_parks_fails_the_connection(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(desk_line, "ATTACH_WAIT", 0.2)

    async def scenario() -> None:
        lot = ParkingLot()
        await lot.start()
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[str] = loop.create_future()
        try:
            async with LoopbackServer(ready_then_observe(seen)) as watched, desk_agent(tmp_path) as (_, reply):
                line = await DeskClient.connect(reply.tcp_handover_path, reply.tcp_handover_id, reply.tcp_desk_key)
                assert line is not None
                with socket.socket() as program:  # never connected: its connect() never came
                    dest = Endpoint.parse(f"127.0.0.1:{watched.port}")
                    connection = await line.dial(dest, 5, _no_fallback, parked=(lot.end_for(program), program))
                    assert isinstance(connection, DeskConnection)
                    with pytest.raises(TunnelError) as failed:
                        await connection.attached()
                    assert failed.value.errno_name == "ECONNABORTED"
                    assert await asyncio.wait_for(seen, 10) == "reset"  # the remote is not left open
                    await connection.abort()
                line.close()
        finally:
            await lot.close()

    run(scenario())


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock, writable)
    try:
        await asyncio.wait_for(ready, 10)
    finally:
        loop.remove_writer(sock)
