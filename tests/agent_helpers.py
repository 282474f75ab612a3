"""Helpers for the agent and tunnel tests: a real agent, real loopback servers, no sleeps.

Everything listens on 127.0.0.1, ::1 or unix sockets only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from ktrace_agent.server import AgentServer

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Connection, TcpStats

T = TypeVar("T")

TOKEN = "s3cret-token"


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one test scenario on a fresh event loop, bounded by ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def agent(
    listen: str, server_class: type[AgentServer] = AgentServer, **kwargs: Any
) -> AsyncIterator[AgentServer]:
    server = server_class(listen, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def agent_and_client(
    listen: str, token: str | None = TOKEN, **kwargs: Any
) -> AsyncIterator[tuple[AgentServer, AgentClient]]:
    async with agent(listen, token=token, **kwargs) as server:
        client = await AgentClient.connect(server.address, token, timeout=10)
        try:
            yield server, client
        finally:
            await client.close()


class UdpEcho(asyncio.DatagramProtocol):
    """A loopback UDP server answering every datagram with its payload upper-cased, followed
    by `` from <source port>`` when ``tell_source``; ``sources`` lists who sent."""

    def __init__(self, tell_source: bool = False) -> None:
        self.tell_source = tell_source
        self.sources: list[tuple[Any, ...]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.sources.append(addr)
        reply = data.upper() + (b" from %d" % addr[1] if self.tell_source else b"")
        self.transport.sendto(reply, addr)


async def udp_echo(
    host: str = "127.0.0.1", tell_source: bool = False
) -> tuple[asyncio.DatagramTransport, UdpEcho, int]:
    """A started ``UdpEcho`` on ``host``: its transport (close it), the protocol and its port."""
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: UdpEcho(tell_source), local_addr=(host, 0)
    )
    return transport, protocol, transport.get_extra_info("sockname")[1]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LoopbackServer:
    """A TCP server on loopback that counts the connections it accepted."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self._handler = handler
        self._host = host
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self.handlers_done = asyncio.Event()
        self._running = 0

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._on_connection, self._host, 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._running += 1
        try:
            await self._handler(reader, writer)
        finally:
            self._running -= 1
            if not self._running:
                self.handlers_done.set()
            writer.close()


async def upper_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo upper-cased until EOF, then close."""
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()


def pattern(total: int, seed: int) -> Callable[[], bytes | None]:
    """Deterministic non-repeating-looking data, produced in 1 MiB chunks."""
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB
    sent = 0

    def next_chunk() -> bytes | None:
        nonlocal sent
        if sent >= total:
            return None
        n = min(len(block), total - sent)
        sent += n
        return block[:n]

    return next_chunk


async def pump(writer: asyncio.StreamWriter, total: int, seed: int) -> str:
    """Write ``total`` pattern bytes, then FIN; return their sha256."""
    digest = hashlib.sha256()
    chunks = pattern(total, seed)
    while (chunk := chunks()) is not None:
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    return digest.hexdigest()


async def drain_all(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read to EOF; return (byte count, sha256)."""
    digest = hashlib.sha256()
    n = 0
    while data := await reader.read(1 << 20):
        digest.update(data)
        n += len(data)
    return n, digest.hexdigest()


async def local_pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], socket.socket]:
    """Two connected ends of a unix socketpair: (the program's side as streams, ktrace's socket)."""
    a, b = socket.socketpair()
    program = await asyncio.open_connection(sock=a, limit=1 << 20)
    return program, b


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from ktrace_agent.main import main; sys.exit(main())", *args]


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """Kill an agent process started with ``agent_command`` if it still runs, reap it, close its stderr."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def wait_for_line(proc: subprocess.Popen[bytes], needle: str, deadline: float) -> str:
    """Read the agent's stderr until a line containing ``needle``; fail at the deadline or on exit."""
    assert proc.stderr is not None
    end = time.monotonic() + deadline
    buffered = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {needle!r} line from the agent within {deadline}s: {buffered!r}")
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"agent exited ({proc.wait()}) before {needle!r}: {buffered!r}")
            buffered += chunk
            for line in buffered.decode(errors="replace").splitlines():
                if needle in line:
                    return line


async def tcp_pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], socket.socket]:
    """A loopback TCP connection: (the program's end as streams, ktrace's end as a socket)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        program = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1], limit=1 << 20)
        ktrace_end, _ = await accepting
    finally:
        listener.close()
    return program, ktrace_end


def ready_then_observe(seen: asyncio.Future[str]) -> Handler:
    """A server that says ``ready``, then tells ``seen`` how the connection ended: EOF or reset."""

    async def observe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        await writer.drain()
        try:
            seen.set_result(f"eof after {len(await reader.read())}")
        except ConnectionResetError:
            seen.set_result("reset")

    return observe


async def spliced(
    stream: Connection,
) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], asyncio.Task[TcpStats]]:
    """A program's connection (``tcp_pair``) carried by ``stream``: the program's end as streams,
    and the splice's task (its stats once the connection ended)."""
    program, ktrace_end = await tcp_pair()
    return program, asyncio.create_task(stream.splice(ktrace_end))
