"""The real handlers wired to the fakes (as run.py wires them to the agent), the C structures a
program passes, and what the kernel does with an outcome that lets the call run (ptrace's
Rewrite and WatchExit): performed on the program's real socket, results written to the fake
memory as the kernel would, then the handler's exit hook."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import select
import socket
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from fake_agent import FakeAgent, FakeRelays
from fakes import FakeMemory, FakeProcess, FakeTracee

from ktrace.rules import RuleSet
from ktrace.tracer import sockaddr, sockops
from ktrace.tracer.decide import AgentSources, RoutingPolicy
from ktrace.tracer.dispatch import SessionHandler
from ktrace.tracer.files import FileViews
from ktrace.tracer.network import NetworkHandler
from ktrace.tracer.sockets import SocketTable, TcpRecord
from ktrace.tracer.tcp import ConnectEvent, TcpConnects
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import (
    Complete,
    Deferred,
    InstallFd,
    NeedScratch,
    Outcome,
    Resume,
    Rewrite,
    WatchExit,
)
from ktrace.tracer.udp import UdpEvent, UdpRedirector
from ktrace.tunnel.types import Endpoint

T = TypeVar("T")

# A test taking ``can_rewrite`` runs once per backend (ptrace, notify) with the same assertions.
both_backends = pytest.mark.parametrize("can_rewrite", [True, False], ids=["ptrace", "notify"])


# ---- the handlers, wired ------------------------------------------------------------------------


@dataclass
class Wired:
    table: SocketTable
    agent: FakeAgent
    relays: FakeRelays
    tcp: TcpConnects
    udp: UdpRedirector
    network: NetworkHandler
    session: SessionHandler
    files: FileViews
    connects: list[ConnectEvent] = field(default_factory=list)
    udp_events: list[UdpEvent] = field(default_factory=list)


@contextlib.asynccontextmanager
async def wired(
    local: Sequence[str] = (),
    remote: Sequence[str] = (),
    connect_timeout: float | None = None,
    sources: AgentSources | None = None,
    served: dict[bytes, bytes] | None = None,
    nameservers: frozenset[Endpoint] = frozenset(),
) -> AsyncIterator[Wired]:
    """NetworkHandler (TcpConnects + UdpRedirector) and FileViews behind a SessionHandler, talking
    to a FakeAgent and FakeRelays. ``local``/``remote``: the user's --local/--remote rules."""
    rule_set = RuleSet.parse([(r, "--local") for r in local], [(r, "--remote") for r in remote])
    policy = RoutingPolicy(rule_set, None, nameservers)
    threads = ThreadGroups()
    table = SocketTable()  # one record per program socket, shared, as run.py makes it
    relays = FakeRelays()
    async with FakeAgent() as agent:
        connects: list[ConnectEvent] = []
        udp_events: list[UdpEvent] = []
        tcp = TcpConnects(
            agent, policy, connect_timeout=connect_timeout, on_event=connects.append, threads=threads, table=table
        )
        udp = UdpRedirector(
            relays, policy, on_event=udp_events.append, threads=threads, sources=sources or AgentSources(), table=table
        )
        network = NetworkHandler(tcp, udp, threads)
        files = FileViews(served=served or {})
        w = Wired(
            table,
            agent,
            relays,
            tcp,
            udp,
            network,
            SessionHandler(network, files, threads),
            files,
            connects,
            udp_events,
        )
        try:
            yield w
        finally:
            tcp.finish()
            relays.close()


def decide(w: Wired, proc: FakeProcess, syscall: str, *args: int) -> Outcome:
    """One stop through the dispatch; a `NeedScratch` is carried out as the backend does (the
    scratch area mapped, the same syscall stopping again) and must come only once."""
    outcome = w.session.on_syscall(proc.stop(syscall, *args))
    if isinstance(outcome, NeedScratch):
        assert proc.can_rewrite and not proc.scratch.mapped
        proc.scratch.map()
        outcome = w.session.on_syscall(proc.stop(syscall, *args))
        assert not isinstance(outcome, NeedScratch)
    return outcome


async def settle(outcome: Outcome) -> Resume | Complete | InstallFd | Rewrite | WatchExit:
    """What a Deferred resolves to (the program waits meanwhile); other outcomes as they are."""
    if isinstance(outcome, Deferred):
        return await outcome.outcome
    assert not isinstance(outcome, NeedScratch)
    return outcome


# ---- C structures -------------------------------------------------------------------------------


def name_of(host: str, port: int, family: int | None = None) -> bytes:
    """A struct sockaddr_in/in6 as a program writes it (an IPv4 host for AF_INET6: v4-mapped)."""
    address = ipaddress.ip_address(host)
    fam = family if family is not None else (socket.AF_INET6 if address.version == 6 else socket.AF_INET)
    return sockaddr.encode(fam, address, port)


def msghdr(
    name: int = 0,
    namelen: int = 0,
    iov: int = 0,
    iovlen: int = 0,
    control: int = 0,
    controllen: int = 0,
    flags: int = 0,
) -> bytes:
    return struct.pack("=QI4xQQQQi4x", name, namelen, iov, iovlen, control, controllen, flags)


def iovecs(memory: FakeMemory, *buffers: tuple[int, int]) -> int:
    return memory.put(b"".join(struct.pack("=QQ", base, length) for base, length in buffers))


def read_msghdr(memory: FakeMemory, address: int) -> tuple[int, int, int, int, int, int, int]:
    name, namelen, iov, iovlen, control, controllen, flags = struct.unpack("=QI4xQQQQi4x", memory.peek(address, 56))
    return name, namelen, iov, iovlen, control, controllen, flags


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def i32(value: int) -> bytes:
    return struct.pack("=i", value)


# ---- the kernel, for calls a handler lets run (ptrace) ------------------------------------------


def rewritten(t: FakeTracee, outcome: Rewrite) -> list[int]:
    args = list(t.args)
    for index, value in outcome.args:
        args[index] = value
    return args


async def kernel_connect(memory: FakeMemory, t: FakeTracee, outcome: Rewrite, program: socket.socket) -> int:
    """The program's own connect() with the rewritten arguments, blocking in the kernel (on a
    thread: the program's, not the loop's), then the exit hook: what the program gets."""
    args = rewritten(t, outcome)
    name = memory.peek(args[1], args[2] & 0xFFFFFFFF)
    fd = program.fileno()
    err = await asyncio.get_running_loop().run_in_executor(None, sockops.connect, fd, name)
    return at_exit(memory, outcome.on_exit, -err)


async def returned(memory: FakeMemory, t: FakeTracee, outcome: Outcome, program: socket.socket) -> int:
    """What the program's connect() returns, from the handler's outcome at its stop: a Rewrite
    run by the kernel (`kernel_connect`), a Deferred awaited, a Complete as it is."""
    if isinstance(outcome, Rewrite):
        return await kernel_connect(memory, t, outcome, program)
    done = await settle(outcome)
    assert isinstance(done, Complete), done
    return done.retval


def at_exit(memory: FakeMemory, on_exit: Callable[[int, FakeMemory], int | None] | None, result: int) -> int:
    if on_exit is None:
        return result
    replaced = on_exit(result, memory)
    return result if replaced is None else replaced


def kernel_recvfrom(memory: FakeMemory, t: FakeTracee, program: socket.socket) -> int:
    """recvfrom() as the kernel does it for the program: data, source (as much as the buffer
    holds) and its full length written to the program's memory; the byte count or -errno."""
    buf, size, flags, name_ptr, len_ptr = t.arg(1), t.arg(2), t.arg(3), t.arg(4), t.arg(5)
    try:
        data, source = program.recvfrom(size, flags | socket.MSG_DONTWAIT)
    except OSError as exc:
        return -(exc.errno or 0)
    memory.poke(buf, data)
    if name_ptr and len_ptr:
        name = sockaddr.encode(program.family, ipaddress.ip_address(source[0]), source[1])
        room = struct.unpack("=i", memory.peek(len_ptr, 4))[0]
        memory.poke(name_ptr, name[:room])
        memory.poke(len_ptr, u32(len(name)))
    return len(data)


def kernel_recvmsg(memory: FakeMemory, hdr_ptr: int, program: socket.socket, length_ptr: int | None = None) -> int:
    """recvmsg() as the kernel does it, into the buffers of the msghdr at ``hdr_ptr``."""
    name_ptr, namelen, iov, iovlen, _control, _controllen, _flags = read_msghdr(memory, hdr_ptr)
    buffers = [struct.unpack_from("=QQ", memory.peek(iov, 16 * iovlen), 16 * i) for i in range(iovlen)]
    try:
        data, _anc, flags, source = program.recvmsg(sum(length for _b, length in buffers), 0, socket.MSG_DONTWAIT)
    except OSError as exc:
        return -(exc.errno or 0)
    offset = 0
    for base, length in buffers:
        memory.poke(base, data[offset : offset + length])
        offset += length
    if name_ptr and namelen:
        name = sockaddr.encode(program.family, ipaddress.ip_address(source[0]), source[1])
        memory.poke(name_ptr, name[:namelen])
        memory.poke(hdr_ptr + 8, u32(len(name)))
    memory.poke(hdr_ptr + 48, i32(flags))
    if length_ptr is not None:
        memory.poke(length_ptr, u32(len(data)))
    return len(data)


# ---- waiting on the program's sockets, never sleeping --------------------------------------------


async def poll_events(sock: socket.socket, events: int, timeout: float = 5.0) -> int:
    """The poll() events of ``sock`` once any of ``events`` is there (the kernel tells: no polling
    loop), 0 at the timeout."""

    def wait() -> int:
        poller = select.poll()
        poller.register(sock.fileno(), events)
        got = poller.poll(int(timeout * 1000))
        return got[0][1] if got else 0

    return await asyncio.get_running_loop().run_in_executor(None, wait)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait for a kernel state that offers no notification (a socket reaching SYN_SENT), with a
    deadline; never a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.001)


async def through(program: socket.socket, data: bytes) -> bytes:
    """Send ``data`` on the program's connected socket and read the answer (the fake agent's
    connection upper-cases it). Non-blocking from here on: the splice runs on this loop."""
    loop = asyncio.get_running_loop()
    program.setblocking(False)
    await loop.sock_sendall(program, data)
    got = b""
    while len(got) < len(data):
        chunk = await loop.sock_recv(program, 65536)
        if not chunk:
            break
        got += chunk
    return got


def loopback_server(family: int = socket.AF_INET) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    server.listen(8)
    return server


def tcp_socket(family: int = socket.AF_INET, blocking: bool = True, proto: int = 0) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setblocking(blocking)
    return sock


def udp_socket(family: int = socket.AF_INET, blocking: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(blocking)
    return sock


def only(items: Sequence[T]) -> T:
    assert len(items) == 1, items
    return items[0]


def tcp_records(w: Wired) -> list[TcpRecord]:
    """The TCP sockets ktrace holds a record of (redirected, connecting, failed)."""
    return list(w.table.tcp_records())
