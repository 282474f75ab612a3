"""TCP through a real agent, over a unix socket and over 127.0.0.1, to real loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import socket
import stat
import struct
import time
from collections.abc import Callable

import grpc
import grpc.aio
import pytest
from agent_helpers import (
    TOKEN,
    LoopbackServer,
    agent,
    agent_and_client,
    drain_all,
    local_pair,
    pump,
    run,
    upper_echo,
)
from ktrace_agent.wire import codec, rpc
from ktrace_agent.wire.read_gate import pending_bytes

from ktrace.tunnel.types import Endpoint, TcpStats, TunnelError


@pytest.fixture(params=["unix", "tcp"])
def listen(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    return f"unix:{tmp_path}/agent.sock" if request.param == "unix" else "127.0.0.1:0"


def test_data_both_ways(listen: str) -> None:
    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as target, agent_and_client(listen) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            assert stream.peer == Endpoint.parse(f"127.0.0.1:{target.port}")
            assert str(stream.local.ip) == "127.0.0.1"
            assert stream.local.port != 0
            (p_reader, p_writer), k_sock = await local_pair()
            splice = asyncio.create_task(stream.splice(k_sock))
            p_writer.write(b"hello tunnel")
            assert await p_reader.readexactly(12) == b"HELLO TUNNEL"
            p_writer.write_eof()
            assert await p_reader.read() == b""  # the server closed after our FIN: EOF came back
            stats = await splice
            assert stats == TcpStats(bytes_up=12, bytes_down=12, outcome="closed")
            p_writer.close()

    run(scenario())


def test_ipv6_loopback_target(tmp_path: pathlib.Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def scenario() -> None:
        try:
            target_cm = LoopbackServer(upper_echo, host="::1")
            await target_cm.__aenter__()
        except OSError:
            pytest.skip("no ::1 on this host")
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
                stream = await client.open_tcp(Endpoint.parse(f"[::1]:{target_cm.port}"))
                assert str(stream.local.ip) == "::1"
                await stream.abort()
        finally:
            await target_cm.__aexit__()

    run(scenario())


def test_refused(listen: str) -> None:
    async def scenario() -> None:
        # A port that was just free: bind, note it, close; nothing listens there.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        async with agent_and_client(listen) as (_, client):
            with pytest.raises(TunnelError) as info:
                await client.open_tcp(Endpoint.parse(f"127.0.0.1:{port}"))
            assert info.value.errno_name == "ECONNREFUSED"
            assert info.value.errno == 111

    run(scenario())


def test_connect_timeout_against_full_backlog(tmp_path: pathlib.Path) -> None:
    """A listener that never accepts, with its accept queue full, drops SYNs: the dial times out."""

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            fillers = []
            try:
                # Fill the accept queue (backlog 0 still queues one); stop when a connect no longer completes.
                for _ in range(8):
                    s = socket.socket()
                    s.setblocking(False)
                    fillers.append(s)
                    if s.connect_ex(("127.0.0.1", port)) != 0:
                        break
                async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
                    started = time.monotonic()
                    with pytest.raises(TunnelError) as info:
                        await client.open_tcp(Endpoint.parse(f"127.0.0.1:{port}"), timeout=0.3)
                    assert info.value.errno_name == "ETIMEDOUT"
                    assert time.monotonic() - started < 5
            finally:
                for s in fillers:
                    s.close()

    run(scenario())


def test_64_mib_each_way(tmp_path: pathlib.Path) -> None:
    total = 64 * 1024 * 1024

    async def scenario() -> float:
        results: dict[str, object] = {}

        async def sink_and_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sent = asyncio.create_task(pump(writer, total, seed=2))
            results["server_got"] = await drain_all(reader)
            results["server_sent"] = await sent

        async with (
            LoopbackServer(sink_and_source) as target,
            agent_and_client(f"unix:{tmp_path}/a.sock") as (
                _,
                client,
            ),
        ):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), k_sock = await local_pair()
            started = time.monotonic()
            splice = asyncio.create_task(stream.splice(k_sock))
            sent_hash, (got_n, got_hash) = await asyncio.gather(pump(p_writer, total, seed=1), drain_all(p_reader))
            stats = await splice
            elapsed = time.monotonic() - started
            await asyncio.wait_for(target.handlers_done.wait(), 10)
            assert results["server_got"] == (total, sent_hash)
            assert (got_n, got_hash) == (total, results["server_sent"])
            assert stats == TcpStats(bytes_up=total, bytes_down=total, outcome="closed")
            p_writer.close()
            return elapsed

    elapsed = run(scenario(), timeout=110)
    print(f"64 MiB each way over a unix-socket agent: {elapsed:.2f}s, {2 * 64 / elapsed:.0f} MiB/s total")


def test_half_close_server_still_answers(listen: str) -> None:
    """The client shuts down its sending side; the server reads EOF and only then answers."""

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until FIN
        writer.write(b"got %d bytes" % len(request))
        await writer.drain()

    async def scenario() -> None:
        async with LoopbackServer(answer_after_eof) as target, agent_and_client(listen) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), k_sock = await local_pair()
            splice = asyncio.create_task(stream.splice(k_sock))
            p_writer.write(b"x" * 1000)
            p_writer.write_eof()
            assert await p_reader.read() == b"got 1000 bytes"
            assert (await splice).outcome == "closed"
            p_writer.close()

    run(scenario())


def test_remote_reset_becomes_local_reset(listen: str) -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def scenario() -> None:
        async with LoopbackServer(reset_after_hello) as target, agent_and_client(listen) as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), k_sock = await local_pair()
            splice = asyncio.create_task(stream.splice(k_sock))
            p_writer.write(b"hello")
            stats = await splice
            assert stats.outcome == "reset: ECONNRESET"
            # The program side was aborted (a socketpair cannot carry RST, so it sees EOF or a reset).
            with contextlib.suppress(ConnectionResetError):
                assert await p_reader.read() == b""
            p_writer.close()

    run(scenario())


def test_local_abort_resets_remote(tmp_path: pathlib.Path) -> None:
    """When ktrace aborts a stream, the remote side sees a reset, not a clean close."""
    outcome: asyncio.Future[str]

    async def observe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        await writer.drain()
        try:
            data = await reader.read()
            outcome.set_result(f"eof after {len(data)}")
        except ConnectionResetError:
            outcome.set_result("reset")

    async def scenario() -> None:
        nonlocal outcome
        outcome = asyncio.get_running_loop().create_future()
        async with (
            LoopbackServer(observe) as target,
            agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client),
        ):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), k_sock = await local_pair()
            splice = asyncio.create_task(stream.splice(k_sock))
            assert await p_reader.readexactly(5) == b"ready"
            await stream.abort()
            assert await asyncio.wait_for(outcome, 10) == "reset"
            assert (await splice).outcome == "aborted"
            p_writer.close()

    run(scenario())


def test_backpressure_bounds_what_a_stalled_reader_buffers(tmp_path: pathlib.Path) -> None:
    """A program that stops reading stops the remote sender: nothing in between buffers
    without bound. The server offers 1 GiB; it must get stuck after a few MiB (kernel socket
    buffers on three connections, one frame per direction in flight, the streams' readers and
    HTTP/2 flow control), and every byte must still arrive once the program reads again."""
    offered = 1024 * 1024 * 1024
    bound = 64 * 1024 * 1024

    async def scenario() -> None:
        written = 0
        blocked = asyncio.Event()

        async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal written
            block = b"x" * (1 << 20)
            while written < offered:
                writer.write(block)
                written += len(block)
                if writer.transport.get_write_buffer_size() > 0:
                    blocked.set()  # the kernel's send buffer is full: the drain below waits
                await writer.drain()
            writer.write_eof()

        async with LoopbackServer(source) as target, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), k_sock = await local_pair()
            splice = asyncio.create_task(stream.splice(k_sock))
            # The program reads nothing. Wait until the server's writes stop making progress.
            await asyncio.wait_for(blocked.wait(), 30)
            deadline = time.monotonic() + 30
            last = -1
            while written != last:
                assert time.monotonic() < deadline, f"the server kept writing: {written} bytes"
                last = written
                await asyncio.sleep(0.2)  # polling the progress of a stalled sender, bounded above
            assert written < bound, f"{written} bytes buffered between a stalled reader and the server"
            p_writer.write_eof()
            got, _ = await drain_all(p_reader)  # reading again resumes the sender: nothing was lost
            assert got == offered
            await splice
            p_writer.close()

    run(scenario(), timeout=110)


def test_backpressure_bounds_what_a_stalled_server_leaves_buffered(tmp_path: pathlib.Path) -> None:
    """The other direction: a server that stops reading stops the program's writes."""
    offered = 1024 * 1024 * 1024
    bound = 64 * 1024 * 1024

    async def scenario() -> None:
        release = asyncio.Event()

        async def stalled_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            await drain_all(reader)

        async with LoopbackServer(stalled_sink) as target, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (_, p_writer), k_sock = await local_pair()
            splice = asyncio.create_task(stream.splice(k_sock))
            written = 0
            block = b"y" * (1 << 20)

            async def program() -> None:
                nonlocal written
                while written < offered:
                    p_writer.write(block)
                    written += len(block)
                    await p_writer.drain()
                p_writer.write_eof()

            writing = asyncio.create_task(program())
            deadline = time.monotonic() + 30
            last = -1
            while written != last:
                assert time.monotonic() < deadline, f"the program kept writing: {written} bytes"
                last = written
                await asyncio.sleep(0.2)  # polling the progress of a stalled writer, bounded above
            assert written < bound, f"{written} bytes buffered between the program and a stalled server"
            release.set()
            await asyncio.wait_for(writing, 60)  # the server reads again: the program's writes resume
            await splice
            p_writer.close()

    run(scenario(), timeout=110)


def test_eof_frame_only_while_the_client_still_sends(tmp_path: pathlib.Path) -> None:
    """The remote's FIN is an ``eof`` frame while the client may still send; once the client
    has sent ``shutdown_write``, the stream just ends with OK (one message less), and ktrace's
    side reads that as the FIN (test_data_both_ways)."""
    received: list[bytes] = []

    async def close_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.write_eof()  # the remote finishes first...
        received.append(await reader.read())  # ...and still reads what the client sends

    async def frames(finish_first: bool) -> list[str | None]:
        address = f"unix:{tmp_path}/{'c' if finish_first else 'r'}.sock"
        async with (
            LoopbackServer(close_first if not finish_first else upper_echo) as target,
            agent(address, token=TOKEN),
            grpc.aio.insecure_channel(address) as channel,
        ):
            call = rpc.Stub(channel).connect(metadata=rpc.bearer_metadata(TOKEN))
            dest = codec.encode_address(Endpoint.parse(f"127.0.0.1:{target.port}"))
            await call.write(rpc.TcpClientFrame(open=rpc.TcpOpen(destination=dest)))
            kinds: list[str | None] = []
            if finish_first:
                await call.write(rpc.TcpClientFrame(shutdown_write=True))
            while (frame := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
                assert isinstance(frame, rpc.TcpServerFrame)
                kinds.append(frame.WhichOneof("kind"))
                if kinds[-1] == "eof":
                    await call.write(rpc.TcpClientFrame(data=b"after your FIN"))
                    await call.write(rpc.TcpClientFrame(shutdown_write=True))
            assert await call.code() == grpc.StatusCode.OK
            return kinds

    async def scenario() -> None:
        assert await frames(finish_first=False) == ["opened", "data", "eof"]
        assert received == [b"after your FIN"]
        assert await frames(finish_first=True) == ["opened"]

    run(scenario())


GATED = 48 * 1024  # well inside a fresh loopback connection's kernel buffers


async def _until(condition: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _loopback_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection, as the endpoint has with a program: (program's end, ktrace's end)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        program = socket.create_connection(listener.getsockname())
        ktrace, _ = listener.accept()
    program.setblocking(False)
    return program, ktrace


def _socket_connected_to(peer: tuple[str, int]) -> socket.socket:
    """This process's own socket connected to ``peer`` (the in-process agent's), as a duplicate."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
            try:
                if sock.type == socket.SOCK_STREAM and sock.getpeername() == peer:
                    return sock
            except OSError:
                pass
            sock.close()
    raise AssertionError(f"no socket connected to {peer}")


def test_read_gate_leaves_the_programs_data_in_the_kernel_while_ktrace_cannot_send(tmp_path: pathlib.Path) -> None:
    """ktrace reads a program's socket only once it can send what it reads: with its send budget
    taken (by other connections), the program's bytes stay queued in the kernel, not in ktrace,
    and none is lost once the budget comes back."""

    async def scenario() -> None:
        got = bytearray()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1 << 16):
                got.extend(data)

        async with LoopbackServer(sink) as target, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            budget = client.send_budget
            budget.max_wait = 120.0  # a held budget is a busy process here, not a stalled stream
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            program, k_sock = _loopback_tcp_pair()
            held = await budget.take(budget.limit)
            splice = asyncio.create_task(stream.splice(k_sock))
            loop = asyncio.get_running_loop()
            payload = bytes(range(256)) * (GATED // 256)
            await loop.sock_sendall(program, payload)
            await _until(lambda: budget.waiting == 1, "ktrace to ask for budget")
            # Everything the program wrote is still in ktrace's receive queue: nothing was read.
            await _until(lambda: pending_bytes(k_sock) == len(payload), "the bytes to reach ktrace's socket")
            await loop.sock_sendall(program, payload)
            await _until(lambda: pending_bytes(k_sock) == 2 * len(payload), "the second write")
            assert budget.waiting == 1 and got == b""
            budget.give(held)
            program.shutdown(socket.SHUT_WR)
            stats = await asyncio.wait_for(splice, 20)
            await asyncio.wait_for(target.handlers_done.wait(), 10)
            assert bytes(got) == payload * 2
            assert stats.bytes_up == 2 * len(payload) and stats.outcome == "closed"
            assert budget.overdrafts == 0 and budget.free == budget.limit
            program.close()

    run(scenario())


def test_read_gate_leaves_the_servers_data_in_the_agents_kernel_buffers(tmp_path: pathlib.Path) -> None:
    """The download direction: with the agent's send budget taken, what the server sends stays
    queued on the agent's socket until the budget comes back, then all of it arrives."""

    async def scenario() -> None:
        payload = bytes(range(256)) * (GATED // 256)
        more = asyncio.Event()
        accepted: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

        async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer.get_extra_info("sockname"))
            writer.write(payload)
            await writer.drain()
            await more.wait()
            writer.write(payload)
            writer.write_eof()
            await writer.drain()
            await reader.read()

        async with (
            LoopbackServer(source) as target,
            agent_and_client(f"unix:{tmp_path}/a.sock") as (server, client),
        ):
            budget = server.send_budget
            budget.max_wait = 120.0
            held = await budget.take(budget.limit)
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), k_sock = await local_pair()
            splice = asyncio.create_task(stream.splice(k_sock))
            server_end = await asyncio.wait_for(accepted, 10)
            with _socket_connected_to(server_end) as agent_sock:
                await _until(lambda: budget.waiting == 1, "the agent to ask for budget")
                await _until(lambda: pending_bytes(agent_sock) == len(payload), "the bytes to reach the agent")
                more.set()
                await _until(lambda: pending_bytes(agent_sock) == 2 * len(payload), "the second write")
                assert budget.waiting == 1
                budget.give(held)
                got, digest = await asyncio.wait_for(drain_all(p_reader), 20)
            assert (got, digest) == (2 * len(payload), hashlib.sha256(payload * 2).hexdigest())
            p_writer.write_eof()
            stats = await asyncio.wait_for(splice, 20)
            assert stats.bytes_down == 2 * len(payload)
            assert budget.overdrafts == 0 and budget.free == budget.limit
            p_writer.close()

    run(scenario())


def test_a_dial_through_the_tunnel_leaves_before_anyone_awaits_it(listen: str) -> None:
    """The tracer starts a dial in the program's connect() stop and awaits it from a task one
    loop turn later: on a started spare stream (every dial's, once ktrace runs), the open frame
    must already be on its way (the agent dials meanwhile)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):  # each dial is aborted: a reset
            await reader.read()

    async def scenario() -> None:
        async with LoopbackServer(hold) as target, agent_and_client(listen) as (_, client):
            dest = Endpoint.parse(f"127.0.0.1:{target.port}")
            client.prime()  # as ktrace does at start: spare streams, started ahead of need
            first = await client.open_tcp(dest)  # by its end, a spare's stream has started
            await first.abort()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while target.accepted < 1:  # the server's accept callback may run late
                assert loop.time() < deadline, "the first dial never reached the server"
                await asyncio.sleep(0.001)
            pending = client.start_tcp(dest)
            while target.accepted < 2:  # the loop runs; nothing awaits the dial
                assert loop.time() < deadline, "the agent never dialled: the open frame did not leave"
                await asyncio.sleep(0.001)
            stream = await pending
            assert stream.peer == dest
            await stream.abort()

    run(scenario())


def test_a_dial_given_up_before_anyone_awaits_it_leaves_nothing_open(listen: str) -> None:
    """The program closed its socket (or ktrace stopped) between the connect() stop and the
    settling task: close() ends the dial whose open already left, and the agent resets what it
    dialled instead of keeping it."""

    ended: asyncio.Queue[bytes] = asyncio.Queue()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read()
        except ConnectionError:
            data = b"reset"
        ended.put_nowait(data or b"eof")

    async def scenario() -> None:
        async with LoopbackServer(hold) as target, agent_and_client(listen) as (_, client):
            dest = Endpoint.parse(f"127.0.0.1:{target.port}")
            client.prime()
            first = await client.open_tcp(dest)
            await first.abort()
            assert await asyncio.wait_for(ended.get(), 10) in (b"reset", b"eof")
            pending = client.start_tcp(dest)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while target.accepted < 2:  # the agent has dialled: the case that could leak
                assert loop.time() < deadline, "the agent never dialled"
                await asyncio.sleep(0.001)
            pending.close()
            assert await asyncio.wait_for(ended.get(), 10) in (b"reset", b"eof")
            # The tunnel carries the next dial as usual.
            stream = await client.open_tcp(dest)
            assert stream.peer == dest
            await stream.abort()

    run(scenario())
