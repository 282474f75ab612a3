"""The tunnel's own costs, without a program or a tracer (scripts/bench's floors of a connection).

    python bench_tunnel_rtt.py AGENT TOKEN_FILE HOST PORT N [echo|connect]

Against the benchmark's echo server (cbenchsrv, 'e'):
- ``echo`` (the default): one ``Connect`` stream is opened, spliced to one end of a socketpair as
  ktrace splices a program's socket, and N times one byte is written on the other end and read
  back: the tunnel's round trip.
- ``connect``: N times a connection as ktrace makes one for a program, through the agent's desk
  when it offers one (a same-host agent): the agent dials, ktrace's end of a loopback TCP pair is
  handed to it, one byte is written on the program's end and read back. Timed from the dial to
  that byte: connect → first byte without the stops and the parking.
Prints ``lat_ns ...``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Endpoint, TcpStats


async def echo(agent: str, token: str, dest: Endpoint, n: int) -> list[int]:
    loop = asyncio.get_running_loop()
    client = await AgentClient.connect(agent, token)
    try:
        stream = await client.open_tcp(dest)
        program, ours = socket.socketpair()
        program.setblocking(False)
        splice = asyncio.create_task(stream.splice(ours))
        await loop.sock_sendall(program, b"e")
        assert await loop.sock_recv(program, 1) == b"e"
        echoes = []
        for _ in range(n):
            start = time.perf_counter_ns()
            await loop.sock_sendall(program, b"x")
            if await loop.sock_recv(program, 1) != b"x":
                raise SystemExit("echo: wrong byte back")
            echoes.append(time.perf_counter_ns() - start)
        await _end(program, splice)
        return echoes
    finally:
        await client.close()


async def connect(agent: str, token: str, dest: Endpoint, n: int) -> list[int]:
    loop = asyncio.get_running_loop()
    client = await AgentClient.connect(agent, token, handover=True)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        firsts = []
        for _ in range(n):
            program = socket.socket()
            program.setblocking(False)
            start = time.perf_counter_ns()
            stream = await client.open_tcp(dest)
            accepting = asyncio.ensure_future(loop.sock_accept(listener))
            await loop.sock_connect(program, listener.getsockname())
            ours, _ = await accepting
            stream.take(ours)
            splice = asyncio.create_task(stream.splice(ours))
            await loop.sock_sendall(program, b"e")
            if await loop.sock_recv(program, 1) != b"e":
                raise SystemExit("connect: wrong byte back")
            firsts.append(time.perf_counter_ns() - start)
            await _end(program, splice)
        return firsts
    finally:
        listener.close()
        await client.close()


async def _end(program: socket.socket, splice: asyncio.Task[TcpStats]) -> None:
    """Close the connection as a program does (FIN, then the rest until EOF) and wait for its splice."""
    loop = asyncio.get_running_loop()
    program.shutdown(socket.SHUT_WR)
    while await loop.sock_recv(program, 4096):
        pass
    program.close()
    await splice


def main() -> None:
    agent, token_file, host, port, n = sys.argv[1:6]
    mode = sys.argv[6] if len(sys.argv) > 6 else "echo"
    with open(token_file, encoding="utf-8") as f:
        token = f.readline().strip()
    measure = connect if mode == "connect" else echo
    samples = asyncio.run(measure(agent, token, Endpoint.parse(f"{host}:{port}"), int(n)))
    print("lat_ns " + " ".join(map(str, samples)))


if __name__ == "__main__":
    main()
