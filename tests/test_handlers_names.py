"""getpeername()/getsockname() through the real handlers: what a redirected socket shows is the
pod's view (the destination as the program wrote it, the agent socket's address), written into
the program's buffer exactly as the kernel fills it; everything else is the kernel's answer."""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest
from fake_agent import HANG, Ok
from fakes import FakeProcess, endpoint, ip, no_fd_leak, run
from handler_helpers import Wired, both_backends, decide, i32, name_of, poll_events, tcp_socket, udp_socket, wired

from ktrace.tracer.decide import AgentSources
from ktrace.tracer.tracee import Complete, Outcome, Resume
from ktrace.tunnel.types import Endpoint, SourceRoute

pytestmark = pytest.mark.timeout(30)

FILL4 = b"\xaa" * 4


def _names(w: Wired, proc: FakeProcess, syscall: str, fd: int, room: int) -> tuple[Outcome, int, int]:
    """getpeername/getsockname at its stop with a ``room``-byte buffer: (outcome, buffer, length)."""
    buffer = proc.memory.reserve(128)
    length = proc.memory.put(i32(room))
    return decide(w, proc, syscall, fd, buffer, length), buffer, length


async def _redirected(w: Wired, proc: FakeProcess, family: int, host: str, local: str) -> tuple[socket.socket, int]:
    """A program socket ktrace redirected to ``host``:8080, connected through the agent (whose
    socket there is ``local``); its descriptor in the program."""
    program = tcp_socket(family, blocking=False)
    fd = proc.add(program)
    name = name_of(host, 8080, family)
    address = proc.memory.put(name)
    dest = ip(host)
    mapped = getattr(dest, "ipv4_mapped", None)
    w.agent.expect_dial(Endpoint(mapped or dest, 8080)).answer(Ok(endpoint(local)))
    assert decide(w, proc, "connect", fd, address, len(name)) == Complete(-errno.EINPROGRESS)
    assert await poll_events(program, select.POLLOUT) == select.POLLOUT
    proc.memory.writes.clear()
    return program, fd


@pytest.mark.parametrize(
    ("family", "host", "local", "peer_name", "sock_name"),
    [
        (socket.AF_INET, "10.96.1.10", "10.244.0.7:41000", name_of("10.96.1.10", 8080), name_of("10.244.0.7", 41000)),
        (
            socket.AF_INET6,
            "fd00:96::1:10",
            "[fd00:244::7]:41000",
            name_of("fd00:96::1:10", 8080),
            name_of("fd00:244::7", 41000),
        ),
        # v4-mapped as the program wrote it; the agent's IPv4 address shown v4-mapped, as a
        # dual-stack socket's own name is.
        (
            socket.AF_INET6,
            "::ffff:10.96.1.10",
            "10.244.0.7:41000",
            name_of("::ffff:10.96.1.10", 8080),
            name_of("10.244.0.7", 41000, socket.AF_INET6),
        ),
    ],
    ids=["ipv4", "ipv6", "v4-mapped"],
)
@both_backends
def test_a_redirected_socket_shows_the_destination_and_the_agent_s_address(
    can_rewrite: bool, family: int, host: str, local: str, peer_name: bytes, sock_name: bytes
) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd = await _redirected(w, proc, family, host, local)
            with program:
                for syscall, expected in (("getpeername", peer_name), ("getsockname", sock_name)):
                    outcome, buffer, length = _names(w, proc, syscall, fd, 128)
                    assert outcome == Complete(0)
                    assert proc.memory.writes[-1] == ((buffer, expected), (length, i32(len(expected))))

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("room", "outcome", "written"),
    [
        (16, Complete(0), name_of("10.96.1.10", 8080)),
        (64, Complete(0), name_of("10.96.1.10", 8080)),
        (8, Complete(0), name_of("10.96.1.10", 8080)[:8]),  # truncated; the full length still says 16
        (0, Complete(0), b""),
        (-1, Complete(-errno.EINVAL), None),
    ],
)
def test_the_name_fills_the_program_s_buffer_as_the_kernel_does(
    room: int, outcome: Complete, written: bytes | None
) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            program, fd = await _redirected(w, proc, socket.AF_INET, "10.96.1.10", "10.244.0.7:41000")
            with program:
                got, buffer, length = _names(w, proc, "getpeername", fd, room)
                assert got == outcome
                if written is None:
                    assert proc.memory.writes == []
                else:
                    assert proc.memory.writes == [((buffer, written), (length, i32(16)))]
                    assert proc.memory.peek(buffer + len(written), 4) == FILL4  # nothing past it

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize("where", ["length unreadable", "buffer unwritable"])
def test_a_name_the_program_s_memory_cannot_take_is_efault(where: str) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            program, fd = await _redirected(w, proc, socket.AF_INET, "10.96.1.10", "10.244.0.7:41000")
            with program:
                length = proc.memory.put(i32(16))
                args = (fd, 4096, length) if where == "buffer unwritable" else (fd, proc.memory.reserve(16), 4096)
                assert decide(w, proc, "getpeername", *args) == Complete(-errno.EFAULT)

    with no_fd_leak():
        run(scenario())


@both_backends
def test_sockets_ktrace_did_not_redirect_get_the_kernel_s_names(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=False) as connecting, tcp_socket() as plain, udp_socket() as unconnected:
                connecting_fd, plain_fd, udp_fd = proc.add(connecting), proc.add(plain), proc.add(unconnected)
                address = proc.memory.put(name_of("10.96.1.10", 8080))
                dial = w.agent.expect_dial("10.96.1.10:8080").answer(HANG)
                decide(w, proc, "connect", connecting_fd, address, 16)
                await dial.arrived
                r, wr = os.pipe()
                try:
                    pipe_fd = proc.add(r)
                    for fd in (connecting_fd, plain_fd, udp_fd, pipe_fd, 77):
                        for syscall in ("getpeername", "getsockname"):
                            assert _names(w, proc, syscall, fd, 128)[0] == Resume(), (fd, syscall)
                finally:
                    os.close(r)
                    os.close(wr)
                assert proc.memory.writes == []
                assert proc.duplicates == 1  # names never duplicate a descriptor: the inode is enough

    with no_fd_leak():
        run(scenario())


# ---- UDP ------------------------------------------------------------------------------------

SOURCES = AgentSources.from_routes(
    [SourceRoute(4, ip("10.244.0.7")), SourceRoute(6, None, "ENETUNREACH")], own=[ip("10.244.0.7")]
)


@pytest.mark.parametrize(
    ("peer", "agent_port", "sock_name"),
    [
        (("10.96.0.10", 53), 40001, name_of("10.244.0.7", 40001)),  # the port the peer sees
        (("10.96.0.10", 53), None, "own port"),  # the agent has not said it yet: the socket's own
        (("10.244.0.7", 53), 40001, name_of("10.244.0.7", 40001)),  # one of the agent's addresses
    ],
    ids=["agent port known", "agent port unknown", "agent's own address"],
)
@both_backends
def test_a_connected_udp_socket_shows_its_peer_and_the_agent_s_source(
    can_rewrite: bool, peer: tuple[str, int], agent_port: int | None, sock_name: bytes | str
) -> None:
    async def scenario() -> None:
        async with wired(sources=SOURCES) as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program:
                fd = proc.add(program)
                address = proc.memory.put(name_of(*peer))
                assert decide(w, proc, "connect", fd, address, 16) == Complete(0)
                inode = proc.inode(fd)
                if agent_port is not None:
                    w.relays.agent_ports[inode] = agent_port
                proc.memory.writes.clear()
                outcome, buffer, length = _names(w, proc, "getpeername", fd, 128)
                assert outcome == Complete(0)
                assert proc.memory.writes[-1] == ((buffer, name_of(*peer)), (length, i32(16)))
                expected = (
                    sock_name if isinstance(sock_name, bytes) else name_of("10.244.0.7", program.getsockname()[1])
                )
                outcome, buffer, length = _names(w, proc, "getsockname", fd, 128)
                assert outcome == Complete(0)
                assert proc.memory.writes[-1] == ((buffer, expected), (length, i32(16)))
                assert w.relays.agent_port_asked == [inode]

    with no_fd_leak():
        run(scenario())


def test_a_udp_socket_connected_to_port_0_has_no_peer_and_shows_the_agent_s_source() -> None:
    async def scenario() -> None:
        async with wired(sources=SOURCES) as w:
            proc = FakeProcess(False)
            with udp_socket() as program:
                fd = proc.add(program)
                address = proc.memory.put(name_of("10.96.1.10", 0))
                assert decide(w, proc, "connect", fd, address, 16) == Complete(0)
                assert program.getpeername() == w.relays.sink_for(socket.AF_INET)
                # Linux keeps it "connected" but getpeername() says ENOTCONN (inet_getname).
                assert _names(w, proc, "getpeername", fd, 128)[0] == Complete(-errno.ENOTCONN)
                outcome, buffer, _length = _names(w, proc, "getsockname", fd, 128)
                assert outcome == Complete(0)
                assert proc.memory.peek(buffer, 16) == name_of("10.244.0.7", program.getsockname()[1])
                assert w.relays.agent_port_asked == []  # no agent socket of its own

    with no_fd_leak():
        run(scenario())


def test_an_older_agent_without_sources_leaves_getsockname_to_the_kernel() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            with udp_socket() as program:
                fd = proc.add(program)
                address = proc.memory.put(name_of("10.96.0.10", 53))
                assert decide(w, proc, "connect", fd, address, 16) == Complete(0)
                assert _names(w, proc, "getsockname", fd, 128)[0] == Resume()
                assert _names(w, proc, "getpeername", fd, 128)[0] == Complete(0)

    with no_fd_leak():
        run(scenario())
