"""The program scripts/soak runs under `ktrace run` on the laptop side: a mixed, bounded load.

    soak_workload.py --seconds S --idle S [--pause S]

Every cycle: a glibc lookup of a service and an HTTP GET to it, a TCP echo, a UDP echo to a
looked-up address, a lookup of a name that does not exist (NXDOMAIN: the report's failure path),
a refused connect, a DNS query on a socket of its own (sendto/recvfrom), and every
CHILD_EVERY cycles a child process that looks a name up itself (`getent hosts`) and one that
just exits. Destinations and names come from small fixed sets, so nothing ktrace must remember
grows with time, only with the work in flight.

Prints ``load-done <cycles> <errors>`` when the load ends, then idles (no syscall ktrace sees)
for --idle seconds, prints ``idle-done`` and exits 0. Lines go to stdout, flushed.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import subprocess
import sys
import time

HELLO_PORT = 8080
ECHO_PORT = 7
REFUSED = ("10.96.1.12", 80)
DNS_SERVER = ("10.96.0.10", 53)
MISSING = tuple(f"soak-missing-{i}" for i in range(5))
CHILD_EVERY = 20


def _lookup(name: str, port: int, kind: int = socket.SOCK_STREAM) -> tuple[str, int]:
    for family, _, _, _, addr in socket.getaddrinfo(name, port, socket.AF_INET, kind):
        if family == socket.AF_INET:
            return str(addr[0]), int(addr[1])
    raise OSError(f"no IPv4 address for {name}")


def _http_get(name: str) -> None:
    with socket.create_connection(_lookup(name, HELLO_PORT), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass


def _tcp_echo() -> None:
    with socket.create_connection(_lookup("echo", ECHO_PORT), timeout=10) as s:
        s.sendall(b"soak\n" * 100)
        s.shutdown(socket.SHUT_WR)
        got = 0
        while data := s.recv(65536):
            got += len(data)
        if got != 500:
            raise OSError(f"echo returned {got} bytes")


def _udp_echo() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"soak-udp", _lookup("echo", ECHO_PORT, socket.SOCK_DGRAM))
        if s.recvfrom(2048)[0] != b"soak-udp":
            raise OSError("wrong UDP echo")


def _missing(i: int) -> None:
    try:
        socket.getaddrinfo(MISSING[i % len(MISSING)], 80, socket.AF_INET)
    except socket.gaierror:
        return
    raise OSError("a missing name resolved")


def _refused() -> None:
    with socket.socket() as s:
        s.settimeout(10)
        if s.connect_ex(REFUSED) == 0:
            raise OSError("the refused address accepted")


def _raw_query(i: int) -> None:
    """A DNS question on a socket of the program's own (not glibc's), as some clients do."""
    qid = random.getrandbits(16)
    name = b"".join(bytes([len(label)]) + label for label in b"hello.default.svc.cluster.local".split(b"."))
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query, DNS_SERVER)
        answer, _ = s.recvfrom(4096)
        if answer[:2] != query[:2]:
            raise OSError("DNS answer with another id")


def _children() -> None:
    subprocess.run(["getent", "hosts", "hello"], stdout=subprocess.DEVNULL, check=True, timeout=30)
    subprocess.run(["true"], check=True, timeout=30)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--idle", type=float, default=0.0)
    p.add_argument("--pause", type=float, default=0.005, help="between cycles, to share the CPU")
    args = p.parse_args()
    steps = (
        lambda i: _http_get("hello"),
        lambda i: _tcp_echo(),
        lambda i: _udp_echo(),
        _missing,
        lambda i: _refused(),
        _raw_query,
    )
    end = time.monotonic() + args.seconds
    cycles = errors = 0
    while time.monotonic() < end:
        for step in steps:
            try:
                step(cycles)
            except (OSError, subprocess.SubprocessError) as exc:
                errors += 1
                print(f"error {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if cycles % CHILD_EVERY == 0:
            try:
                _children()
            except (OSError, subprocess.SubprocessError) as exc:
                errors += 1
                print(f"error {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        cycles += 1
        time.sleep(args.pause)
    print(f"load-done {cycles} {errors}", flush=True)
    # Idle: one long sleep, no syscall that stops under ktrace.
    time.sleep(args.idle)
    print("idle-done", flush=True)
    os.close(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
