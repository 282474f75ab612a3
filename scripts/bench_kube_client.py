"""The client scripts/bench-kube times: standard library only, so the same file runs in the
laptop namespace (under ktrace, or against a kubectl port-forward) and inside a pod (sent to
``kubectl exec ... python3 -``).

    python3 bench_kube_client.py newconn HOST PORT N     # N times: connect, GET /, read the answer, close
    python3 bench_kube_client.py keepalive HOST PORT N   # one connection, N GET / on it
    python3 bench_kube_client.py lookup NAME N           # N getaddrinfo(NAME) (A and AAAA, as glibc asks)
    python3 bench_kube_client.py udp HOST PORT N         # N UDP echo round trips
    python3 bench_kube_client.py hold HOST PORT N        # N connections held open together, then a GET on each

Prints one JSON object: the samples in microseconds (``hold``: whether all completed, and the
time from the first connect to the last answer).
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n"


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = content_length(head)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the body")
        body += chunk
    return body


def content_length(head: bytes) -> int:
    return next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))


def address(host: str, port: int) -> tuple[str, int]:
    """Resolved once, before timing: the request figures time no lookup."""
    sockaddr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    return str(sockaddr[0]), int(sockaddr[1])


def newconn(host: str, port: int, n: int) -> dict[str, list[float]]:
    """The request's time from connect() to the last byte of the answer, and connect()'s own."""
    where = address(host, port)
    samples, connects = [], []
    for _ in range(n):
        start = time.perf_counter()
        with socket.create_connection(where) as sock:
            connects.append((time.perf_counter() - start) * 1e6)
            sock.sendall(REQUEST)
            read_response(sock)
        samples.append((time.perf_counter() - start) * 1e6)
    return {"samples": samples, "connect_samples": connects}


def keepalive(host: str, port: int, n: int) -> list[float]:
    samples = []
    with socket.create_connection(address(host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            start = time.perf_counter()
            sock.sendall(REQUEST)
            read_response(sock)
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


def lookup(name: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        socket.getaddrinfo(name, 8080, type=socket.SOCK_STREAM)
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def udp(host: str, port: int, n: int) -> list[float]:
    sockaddr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
    where = (str(sockaddr[0]), int(sockaddr[1]))
    samples = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect(where)
        for i in range(n):
            payload = b"ping %d" % i
            start = time.perf_counter()
            sock.send(payload)
            while sock.recv(2048) != payload:
                pass
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


async def hold(host: str, port: int, n: int) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 100)), hard))
    where = address(host, port)
    start = time.perf_counter()
    opened = await asyncio.gather(*(asyncio.open_connection(*where) for _ in range(n)), return_exceptions=True)
    connections = [c for c in opened if not isinstance(c, BaseException)]
    connected = time.perf_counter()

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(REQUEST)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(content_length(head))
        writer.close()
        return body.startswith(b"hello from")

    results = await asyncio.gather(*(exchange(r, w) for r, w in connections), return_exceptions=True)
    done = time.perf_counter()
    completed = sum(1 for r in results if r is True)
    errors = sorted({repr(r)[:80] for r in [*opened, *results] if isinstance(r, BaseException)})
    return {
        "connections": n,
        "completed": completed,
        "connect_s": connected - start,
        "total_s": done - start,
        "errors": errors[:5],
    }


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "lookup":
        out: object = {"samples": lookup(args[0], int(args[1]))}
    elif mode == "hold":
        out = asyncio.run(hold(args[0], int(args[1]), int(args[2])))
    elif mode == "newconn":
        out = newconn(args[0], int(args[1]), int(args[2]))
    else:
        run = {"keepalive": keepalive, "udp": udp}[mode]
        out = {"samples": run(args[0], int(args[1]), int(args[2]))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
