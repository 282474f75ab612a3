"""The services of the namespace "cluster", all in one asyncio process.

Run inside the cluster network namespace (``ip netns exec``) by tests/nscluster.py.
It binds every socket first and only then prints one line ``READY <json>`` on stdout, so the
fixture can wait for readiness with a deadline instead of sleeping. Logs go to stderr.

Services (addresses are arguments so the fixture stays the single source of truth):

* hello (HTTP/1.1, keep-alive aware): every request gets
  ``hello from cluster, you are <client ip>:<client port>\\n`` so a test can see the
  source address the cluster observed.
* echo (TCP): echoes bytes until the client half-closes, then closes.
* bulk (TCP): the client sends a 16-byte header ``b"KTBULK01" + N (u64 big-endian)``,
  then any number of bytes and half-closes. Only after EOF the server answers
  ``b"KTBULKOK" + uploaded length (u64 BE) + sha256(uploaded)`` followed by N bytes of
  :func:`pattern` and closes. Both directions can be checked with sha256.
* echo (UDP): every datagram is sent back to its source, unchanged.
* DNS (optional, ``--dnsmasq-conf``): a dnsmasq child authoritative for cluster.local, started
  here so that READY also means "it answers a query".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import sys
import typing

BULK_MAGIC = b"KTBULK01"
BULK_REPLY = b"KTBULKOK"
CHUNK = 1 << 16
_BASE = bytes((k % 251) for k in range(CHUNK))


def pattern_chunk(index: int) -> bytes:
    """Chunk ``index`` (64 KiB) of the bulk pattern: byte k = ((k & 0xffff) % 251) ^ ((k >> 16) & 0xff)."""
    x = index & 0xFF
    return _BASE.translate(bytes(b ^ x for b in range(256)))


def pattern(n: int) -> bytes:
    """The first ``n`` bytes of the bulk pattern (shared with tests/programs/cbulk.c)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += pattern_chunk(i)
        i += 1
    return bytes(out[:n])


def _peer(writer: asyncio.StreamWriter) -> str:
    host, port = writer.get_extra_info("peername")[:2]
    return f"{host}:{port}"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            version = lines[0].rsplit(" ", 1)[-1]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            length = int(headers.get("content-length", "0") or "0")
            if length:
                await reader.readexactly(length)
            body = f"hello from cluster, you are {_peer(writer)}\n".encode()
            keep = version == "HTTP/1.1" and headers.get("connection") != "close"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + (b"" if keep else b"Connection: close\r\n")
                + b"\r\n"
                + body
            )
            await writer.drain()
            if not keep:
                return
    except (ConnectionError, OSError) as exc:
        print(f"hello: {exc!r}", file=sys.stderr)
    finally:
        await _close(writer)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError) as exc:
        print(f"echo: {exc!r}", file=sys.stderr)
    finally:
        await _close(writer)


async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        header = await reader.readexactly(16)
        if header[:8] != BULK_MAGIC:
            print(f"bulk: bad header {header!r}", file=sys.stderr)
            return
        (want,) = struct.unpack(">Q", header[8:])
        digest = hashlib.sha256()
        got = 0
        while data := await reader.read(1 << 20):
            digest.update(data)
            got += len(data)
        writer.write(BULK_REPLY + struct.pack(">Q", got) + digest.digest())
        i = 0
        sent = 0
        while sent < want:
            chunk = pattern_chunk(i)[: want - sent]
            writer.write(chunk)
            sent += len(chunk)
            i += 1
            await writer.drain()
        print(f"bulk: {_peer(writer)} up {got} down {sent}", file=sys.stderr)
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
        print(f"bulk: {exc!r}", file=sys.stderr)
    finally:
        await _close(writer)


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport is not a DatagramTransport subclass.
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.transport.sendto(data, addr)


async def serve(args: argparse.Namespace) -> None:
    servers: list[asyncio.Server] = []
    bound: list[str] = []
    loop = asyncio.get_running_loop()
    for host in args.hello:
        servers.append(await asyncio.start_server(hello, host, args.hello_port, reuse_address=True))
        bound.append(f"tcp {host} {args.hello_port}")
    for host in args.echo:
        servers.append(await asyncio.start_server(echo, host, args.echo_port, reuse_address=True))
        servers.append(await asyncio.start_server(bulk, host, args.bulk_port, reuse_address=True))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, args.echo_port), family=family)
        bound += [f"tcp {host} {args.echo_port}", f"tcp {host} {args.bulk_port}"]
        bound.append(f"udp {host} {args.echo_port}")
    if args.dnsmasq_conf:
        await start_dnsmasq(args.dnsmasq_conf, args.dns)
        bound.append(f"dns {args.dns} 53")
    print("READY " + json.dumps(bound), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _dns_query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)


async def start_dnsmasq(conf: str, addr: str) -> None:
    """Start dnsmasq and return once it answers a query on ``addr`` (retried until a deadline)."""
    await asyncio.create_subprocess_exec("dnsmasq", f"--conf-file={conf}", stdin=asyncio.subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        query = _dns_query(0x4B54, "kubernetes.default.svc.cluster.local")
        while loop.time() < deadline:
            await loop.sock_sendto(sock, query, (addr, 53))
            try:
                reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.2)
            except (TimeoutError, ConnectionRefusedError):
                continue
            if reply[:2] == query[:2]:
                return
    raise SystemExit("dnsmasq did not answer in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hello", action="append", default=[], help="address of the hello HTTP server")
    parser.add_argument("--hello-port", type=int, default=8080)
    parser.add_argument("--echo", action="append", default=[], help="address of the echo/bulk services")
    parser.add_argument("--echo-port", type=int, default=7)
    parser.add_argument("--bulk-port", type=int, default=9000)
    parser.add_argument("--dnsmasq-conf", help="start dnsmasq with this configuration file")
    parser.add_argument("--dns", default="10.96.0.10", help="the address dnsmasq listens on")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
