"""The tunnel's own round trip, without a program or a tracer (scripts/bench's floor of a connection).

    python bench_tunnel_rtt.py AGENT TOKEN_FILE HOST PORT N

Against the benchmark's echo server (cbenchsrv, 'e'): one ``Connect`` stream is opened, spliced to
one end of a socketpair as ktrace splices a program's socket, and N times one byte is written on
the other end and read back. Prints ``lat_ns ...`` (those round trips).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Endpoint


async def measure(agent: str, token: str, dest: Endpoint, n: int) -> list[int]:
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
        program.shutdown(socket.SHUT_WR)
        while await loop.sock_recv(program, 4096):
            pass
        program.close()
        await splice
        return echoes
    finally:
        await client.close()


def main() -> None:
    agent, token_file, host, port, n = sys.argv[1:6]
    with open(token_file, encoding="utf-8") as f:
        token = f.readline().strip()
    echoes = asyncio.run(measure(agent, token, Endpoint.parse(f"{host}:{port}"), int(n)))
    print("lat_ns " + " ".join(map(str, echoes)))


if __name__ == "__main__":
    main()
