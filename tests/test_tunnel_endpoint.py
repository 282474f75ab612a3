"""LoopbackEndpoint: pairing by source port, rejection of connections nobody expects."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import subprocess
import sys

import pytest
from agent_helpers import LoopbackServer, agent_and_client, run, upper_echo

from ktrace.tunnel.endpoint import LoopbackEndpoint
from ktrace.tunnel.tcp_stream import TcpStream
from ktrace.tunnel.types import Endpoint, TcpStats


def _connect_like_the_tracer(endpoint: LoopbackEndpoint, family: int) -> socket.socket:
    """A blocking connect to the endpoint, as the tracer does with its duplicate of the program's socket."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(endpoint.address(family))
    return sock


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_expected_connection_is_spliced(tmp_path: pathlib.Path, family: int) -> None:
    async def scenario() -> None:
        closed: asyncio.Queue[tuple[TcpStream, TcpStats]] = asyncio.Queue()
        endpoint = LoopbackEndpoint(on_closed=lambda stream, stats: closed.put_nowait((stream, stats)))
        await endpoint.start()
        try:
            async with (
                LoopbackServer(upper_echo) as target,
                agent_and_client(f"unix:{tmp_path}/a.sock") as (
                    _,
                    client,
                ),
            ):
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
                program = _connect_like_the_tracer(endpoint, family)
                endpoint.expect(family, program.getsockname()[1], stream)  # before the loop runs the accept
                reader, writer = await asyncio.open_connection(sock=program)
                writer.write(b"through the endpoint")
                assert await reader.readexactly(20) == b"THROUGH THE ENDPOINT"
                writer.write_eof()
                assert await reader.read() == b""
                got_stream, stats = await closed.get()
                assert got_stream is stream
                assert stats == TcpStats(bytes_up=20, bytes_down=20, outcome="closed")
                writer.close()
        finally:
            await endpoint.close()

    run(scenario())


def test_unexpected_connection_is_closed_at_once() -> None:
    async def scenario() -> None:
        endpoint = LoopbackEndpoint()
        await endpoint.start()
        try:
            sock = _connect_like_the_tracer(endpoint, socket.AF_INET)
            reader, writer = await asyncio.open_connection(sock=sock)
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
            writer.close()
        finally:
            await endpoint.close()

    run(scenario())


def test_forget_and_close_abort_streams(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        endpoint = LoopbackEndpoint()
        await endpoint.start()
        async with LoopbackServer(upper_echo) as target, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            dest = Endpoint.parse(f"127.0.0.1:{target.port}")
            forgotten = await client.open_tcp(dest)
            endpoint.expect(socket.AF_INET, 40000, forgotten)
            endpoint.forget(socket.AF_INET, 40000)
            await forgotten.abort()
            pending = await client.open_tcp(dest)
            endpoint.expect(socket.AF_INET, 40001, pending)
            spliced = await client.open_tcp(dest)
            program = _connect_like_the_tracer(endpoint, socket.AF_INET)
            endpoint.expect(socket.AF_INET, program.getsockname()[1], spliced)
            reader, writer = await asyncio.open_connection(sock=program)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"X"
            await endpoint.close()
            # The spliced program connection was reset or closed by close().
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
            writer.close()
            await asyncio.wait_for(target.handlers_done.wait(), 10)

    run(scenario())


_OUT_OF_DESCRIPTORS = r"""
import asyncio, os, resource, socket
from ktrace.tunnel import endpoint as ep

ep.ACCEPT_RETRY = 0.2


async def main() -> None:
    endpoint = ep.LoopbackEndpoint()
    calls = 0
    accept_pending = endpoint._accept_pending

    def counting(family: int) -> None:
        nonlocal calls
        calls += 1
        accept_pending(family)

    endpoint._accept_pending = counting  # the listener's reader callback, from start() on
    await endpoint.start()
    client = socket.create_connection(endpoint.address(socket.AF_INET))  # queued, nobody expects it
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    hogs = []
    while True:
        try:
            hogs.append(os.dup(0))
        except OSError:
            break
    await asyncio.sleep(0.5)  # the listener stays readable all along; accept keeps failing
    during = calls
    for fd in hogs:
        os.close(fd)
    client.setblocking(False)
    try:  # accepted after the pause and reset: nobody expects it
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 1), 5)
    except ConnectionResetError:
        data = b"reset"
    print(during, data)


asyncio.run(main())
"""


def test_running_out_of_descriptors_pauses_accepting_instead_of_spinning() -> None:
    # In a child process: it exhausts its own descriptor table.
    proc = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    during, outcome = proc.stdout.split()
    assert int(during) <= 5, f"accept was retried {during} times in 0.5 s"
    assert outcome in ("b'reset'", "b''"), proc.stdout
