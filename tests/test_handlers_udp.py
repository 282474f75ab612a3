"""UDP connect() and sendto/sendmsg/sendmmsg through the real handlers: a datagram for a remote
peer leaves the program's own socket (its source port) for that peer's relay; anything else is
the kernel's send of ktrace's copy of the program's bytes. The relays are real loopback sockets
(FakeRelays), so each case checks what actually arrived where, and what the program's call
returned and had written into its memory."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

import pytest
from fakes import FakeProcess, endpoint, ip, no_fd_leak, run
from handler_helpers import (
    Wired,
    both_backends,
    decide,
    i32,
    iovecs,
    msghdr,
    name_of,
    settle,
    u32,
    udp_socket,
    wired,
)

from ktrace.tracer import sockops
from ktrace.tracer.decide import AgentSources
from ktrace.tracer.tracee import Complete, Deferred, Resume
from ktrace.tracer.udp import UdpEvent
from ktrace.tunnel.types import SourceRoute

pytestmark = pytest.mark.timeout(30)

DNS = "10.96.0.10:53"
ECHO = "10.96.1.11:7"
MSG_DONTWAIT = socket.MSG_DONTWAIT
SOURCES = AgentSources.from_routes([SourceRoute(4, ip("10.244.0.7")), SourceRoute(6, None, "ENETUNREACH")])


def _received(sock: socket.socket) -> tuple[bytes, tuple[str, int]]:
    """What a relay (or a local peer) got: a datagram is there already (loopback delivers within
    the send), so this never waits."""
    data, source = sock.recvfrom(70000, MSG_DONTWAIT)
    return data, (str(source[0]), int(source[1]))


def _source(program: socket.socket) -> tuple[str, int]:
    """Where the program's datagrams come from, as a loopback peer sees it."""
    return ("127.0.0.1" if program.family == socket.AF_INET else "::1"), program.getsockname()[1]


# ---- connect() --------------------------------------------------------------------------------


@both_backends
def test_connect_to_a_remote_peer_connects_to_its_relay(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program:
                fd = proc.add(program)
                address = proc.memory.put(name_of("10.96.0.10", 53))
                assert decide(w, proc, "connect", fd, address, 16) == Complete(0)
                inode = proc.inode(fd)
                relay = w.relays.relay(inode, DNS)
                assert program.getpeername() == relay.getsockname()
                # Plain send() needs no stop: the kernel sends to the relay.
                program.send(b"question")
                assert _received(relay) == (b"question", _source(program))
                assert w.udp_events == [UdpEvent(proc.pid, endpoint(DNS), "connect", inode)]
                record = w.table.udp(inode)
                assert record is not None and record.where == (proc.pid, fd)
                assert proc.memory.writes == []

    with no_fd_leak():
        run(scenario())


@both_backends
def test_connect_to_port_0_connects_to_the_sink(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program:
                fd = proc.add(program)
                address = proc.memory.put(name_of("10.96.1.10", 0))
                assert decide(w, proc, "connect", fd, address, 16) == Complete(0)
                assert program.getpeername() == w.relays.sinks[socket.AF_INET].getsockname()
                inode = proc.inode(fd)
                assert w.relays.sink_users == [
                    (inode, socket.AF_INET, endpoint("10.96.1.10:0"), program.getsockname()[1])
                ]
                assert w.relays.relays == {}

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize("then", ["local peer", "AF_UNSPEC"])
@both_backends
def test_connect_to_a_local_peer_or_af_unspec_is_the_kernel_s_and_forgets_the_relay(
    can_rewrite: bool, then: str
) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program, udp_socket() as local:
                local.bind(("127.0.0.1", 0))
                fd = proc.add(program)
                assert decide(w, proc, "connect", fd, proc.memory.put(name_of("10.96.0.10", 53)), 16) == Complete(0)
                inode = proc.inode(fd)
                assert w.udp.connected_peer(inode) is not None
                name = name_of(*local.getsockname()) if then == "local peer" else struct.pack("=H14x", 0)
                assert decide(w, proc, "connect", fd, proc.memory.put(name), 16) == Complete(0)
                assert w.udp.connected_peer(inode) is None
                if then == "local peer":
                    assert program.getpeername() == local.getsockname()
                else:
                    with pytest.raises(OSError) as unconnected:
                        program.getpeername()
                    assert unconnected.value.errno == errno.ENOTCONN

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("case", "errno_"),
    [("an address too short", errno.EINVAL), ("another family's address", errno.EAFNOSUPPORT)],
)
@both_backends
def test_a_connect_the_kernel_refuses_leaves_the_socket_connected_to_its_peer(
    can_rewrite: bool, case: str, errno_: int
) -> None:
    """The kernel keeps a UDP socket's association when a new connect() fails: so does ktrace
    (getpeername still shows the peer, not the relay's loopback address)."""

    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program:
                fd = proc.add(program)
                assert decide(w, proc, "connect", fd, proc.memory.put(name_of("10.96.0.10", 53)), 16) == Complete(0)
                bad = name_of("10.96.0.11", 53)[:8] if case == "an address too short" else name_of("fd00::1", 53)
                assert decide(w, proc, "connect", fd, proc.memory.put(bad), len(bad)) == Complete(-errno_)
                assert program.getpeername() == w.relays.relay(proc.inode(fd), DNS).getsockname()
                buffer, length = proc.memory.reserve(128), proc.memory.put(i32(128))
                assert decide(w, proc, "getpeername", fd, buffer, length) == Complete(0)
                assert proc.memory.peek(buffer, 16) == name_of("10.96.0.10", 53)

    with no_fd_leak():
        run(scenario())


@both_backends
def test_connect_towards_a_family_the_agent_has_no_route_for_fails_as_in_the_pod(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired(sources=SOURCES) as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket(socket.AF_INET6) as program:
                fd = proc.add(program)
                address = proc.memory.put(name_of("fd00:96::10", 53))
                assert decide(w, proc, "connect", fd, address, 28) == Complete(-errno.ENETUNREACH)
                assert w.relays.relays == {}
                # A v4-mapped peer leaves as IPv4: the agent has a route for that.
                mapped = proc.memory.put(name_of("::ffff:10.96.0.10", 53))
                assert decide(w, proc, "connect", fd, mapped, 28) == Complete(0)
                assert list(w.relays.relays) == [(proc.inode(fd), endpoint(DNS))]

    with no_fd_leak():
        run(scenario())


def test_a_loopback_nameserver_of_the_agent_is_remote() -> None:
    async def scenario() -> None:
        async with wired(nameservers=frozenset({endpoint("127.0.0.53:53")})) as w:
            proc = FakeProcess(True)
            with udp_socket() as program:
                fd = proc.add(program)
                assert decide(w, proc, "connect", fd, proc.memory.put(name_of("127.0.0.53", 53)), 16) == Complete(0)
                assert list(w.relays.relays) == [(proc.inode(fd), endpoint("127.0.0.53:53"))]

    with no_fd_leak():
        run(scenario())


# ---- sendto ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@both_backends
def test_sendto_a_remote_peer_leaves_the_program_s_socket_for_the_relay(can_rewrite: bool, family: int) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket(family) as program:
                program.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
                fd = proc.add(program)
                payload = proc.memory.put(b"ping through the agent")
                name = name_of("10.96.1.11", 7, family)
                address = proc.memory.put(name)
                assert decide(w, proc, "sendto", fd, payload, 22, 0, address, len(name)) == Complete(22)
                inode = proc.inode(fd)
                relay = w.relays.relay(inode, ECHO)
                assert _received(relay) == (b"ping through the agent", _source(program))
                assert w.udp_events == [UdpEvent(proc.pid, endpoint(ECHO), "send", inode)]
                # Again: the same relay, reported once.
                assert decide(w, proc, "sendto", fd, payload, 4, 0, address, len(name)) == Complete(4)
                assert _received(relay) == (b"ping", _source(program))
                assert len(w.udp_events) == 1
                assert proc.memory.writes == []

    with no_fd_leak():
        run(scenario())


@both_backends
def test_sendto_a_local_peer_is_sent_by_ktrace_to_the_program_s_bytes(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program, udp_socket() as local:
                local.bind(("127.0.0.1", 0))
                fd = proc.add(program)
                payload = proc.memory.put(b"local")
                address = proc.memory.put(name_of(*local.getsockname()))
                assert decide(w, proc, "sendto", fd, payload, 5, 0, address, 16) == Complete(5)
                assert _received(local) == (b"local", _source(program))
                assert w.relays.relays == {}

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("payload unreadable", Complete(-errno.EFAULT)),
        ("payload larger than any datagram", Complete(-errno.EMSGSIZE)),
        ("address unreadable", Complete(-errno.EFAULT)),
        ("no route for the family", Complete(-errno.ENETUNREACH)),
    ],
)
@both_backends
def test_sendto_errors_are_the_kernel_s(can_rewrite: bool, case: str, expected: Complete) -> None:
    async def scenario() -> None:
        async with wired(sources=SOURCES) as w:
            proc = FakeProcess(can_rewrite)
            # Connected to a relay already: a send that went anywhere would arrive there.
            family = socket.AF_INET6 if case == "no route for the family" else socket.AF_INET
            with udp_socket(family) as program:
                fd = proc.add(program)
                peer = name_of("::ffff:10.96.1.11" if family == socket.AF_INET6 else "10.96.1.11", 7, family)
                assert decide(w, proc, "connect", fd, proc.memory.put(peer), len(peer)) == Complete(0)
                relay = w.relays.relay(proc.inode(fd), ECHO)
                payload, length = proc.memory.put(b"data"), 4
                name = name_of("fd00:96::1:11", 7) if family == socket.AF_INET6 else name_of("10.96.1.11", 7)
                address = proc.memory.put(name)
                if case == "payload unreadable":
                    payload = 4096
                elif case == "payload larger than any datagram":
                    payload, length = proc.memory.reserve(70000), 70000
                elif case == "address unreadable":
                    address = 4096
                assert decide(w, proc, "sendto", fd, payload, length, 0, address, len(name)) == expected
                with pytest.raises(BlockingIOError):
                    relay.recv(100, MSG_DONTWAIT)  # nothing was sent

    with no_fd_leak():
        run(scenario())


def test_sendto_on_a_tcp_socket_is_the_kernel_s() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            with socket.socket() as program:
                fd = proc.add(program)
                payload, address = proc.memory.put(b"data"), proc.memory.put(name_of("10.96.1.10", 80))
                assert decide(w, proc, "sendto", fd, payload, 4, 0, address, 16) == Resume()

    with no_fd_leak():
        run(scenario())


# ---- sendmsg ----------------------------------------------------------------------------------


def _sendmsg(w: Wired, proc: FakeProcess, fd: int, name: bytes | None, *chunks: bytes, flags: int = 0) -> object:
    buffers = [(proc.memory.put(chunk), len(chunk)) for chunk in chunks]
    iov = iovecs(proc.memory, *buffers)
    name_ptr = proc.memory.put(name) if name is not None else 0
    hdr = proc.memory.put(msghdr(name_ptr, len(name) if name else 0, iov, len(buffers)))
    return decide(w, proc, "sendmsg", fd, hdr, flags)


@both_backends
def test_sendmsg_gathers_the_iovecs_and_sends_to_the_relay_or_the_connected_peer(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program, udp_socket() as local:
                local.bind(("127.0.0.1", 0))
                fd = proc.add(program)
                assert _sendmsg(w, proc, fd, name_of("10.96.0.10", 53), b"que", b"", b"stion") == Complete(8)
                relay = w.relays.relay(proc.inode(fd), DNS)
                assert _received(relay) == (b"question", _source(program))
                # No name: the connected peer, whatever it is (here a local one).
                program.connect(local.getsockname())
                assert _sendmsg(w, proc, fd, None, b"to the peer") == Complete(11)
                assert _received(local) == (b"to the peer", _source(program))
                assert proc.memory.writes == []

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no name, not connected", Complete(-errno.EDESTADDRREQ)),
        ("payload larger than any datagram", Complete(-errno.EMSGSIZE)),
        ("an iovec unreadable", Complete(-errno.EFAULT)),
        ("the iovec array unreadable", Complete(-errno.EFAULT)),
        ("the name unreadable", Complete(-errno.EFAULT)),
        ("the msghdr unreadable", Complete(-errno.EFAULT)),
        ("more iovecs than UIO_MAXIOV", Complete(-errno.EMSGSIZE)),  # the kernel's __copy_msghdr
        ("an absurd iovec count", Complete(-errno.EMSGSIZE)),  # checked before anything is read
    ],
)
@both_backends
def test_sendmsg_errors_are_the_kernel_s(can_rewrite: bool, case: str, expected: Complete) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program:
                fd = proc.add(program)
                data = proc.memory.put(b"data")
                name, namelen = proc.memory.put(name_of("10.96.0.10", 53)), 16
                iov, iovlen = iovecs(proc.memory, (data, 4)), 1
                if case == "no name, not connected":
                    name, namelen = 0, 0
                elif case == "payload larger than any datagram":
                    big = proc.memory.reserve(40000)
                    iov, iovlen = iovecs(proc.memory, (big, 40000), (big, 40000)), 2
                elif case == "an iovec unreadable":
                    iov = iovecs(proc.memory, (data, 4), (4096, 4))
                    iovlen = 2
                elif case == "the iovec array unreadable":
                    iov = 4096
                elif case == "the name unreadable":
                    name = 4096
                elif case == "more iovecs than UIO_MAXIOV":
                    iov = iovecs(proc.memory, *[(data, 1)] * 1025)
                    iovlen = 1025
                elif case == "an absurd iovec count":
                    iovlen = 1 << 40
                hdr = proc.memory.put(msghdr(name, namelen, iov, iovlen))
                if case == "the msghdr unreadable":
                    hdr = 4096
                assert decide(w, proc, "sendmsg", fd, hdr, 0) == expected
                assert all(not relay_has_data(relay) for relay in w.relays.relays.values())

    with no_fd_leak():
        run(scenario())


def relay_has_data(sock: socket.socket) -> bool:
    try:
        sock.recv(1, MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True


# ---- sendmmsg ---------------------------------------------------------------------------------


def _mmsghdrs(proc: FakeProcess, messages: Sequence[tuple[bytes | None, bytes]]) -> int:
    """An array of struct mmsghdr (64 bytes each, msg_len FILL) for (name, payload) pairs."""
    entries = b""
    for name, payload in messages:
        data = proc.memory.put(payload)
        iov = iovecs(proc.memory, (data, len(payload)))
        name_ptr = proc.memory.put(name) if name is not None else 0
        entries += msghdr(name_ptr, len(name) if name else 0, iov, 1) + b"\xaa" * 8
    return proc.memory.put(entries)


@both_backends
def test_sendmmsg_sends_each_message_and_writes_each_msg_len(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program, udp_socket() as local:
                local.bind(("127.0.0.1", 0))
                fd = proc.add(program)
                messages = [
                    (name_of("10.96.0.10", 53), b"A question"),
                    (name_of("10.96.0.10", 53), b"AAAA question"),
                    (name_of(*local.getsockname()), b"local"),
                ]
                base = _mmsghdrs(proc, messages)
                assert decide(w, proc, "sendmmsg", fd, base, 3, 0) == Complete(3)
                relay = w.relays.relay(proc.inode(fd), DNS)
                assert [_received(relay)[0], _received(relay)[0], _received(local)[0]] == [
                    b"A question",
                    b"AAAA question",
                    b"local",
                ]
                assert proc.memory.writes == [
                    ((base + 56, u32(10)), (base + 64 + 56, u32(13)), (base + 128 + 56, u32(5)))
                ]
                assert proc.memory.peek(base + 60, 4) == b"\xaa" * 4  # the padding after msg_len

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("failing", "expected", "written"),
    [(0, Complete(-errno.EMSGSIZE), 0), (1, Complete(1), 1), (2, Complete(2), 2)],
)
def test_sendmmsg_stops_at_the_first_message_that_fails(failing: int, expected: Complete, written: int) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            with udp_socket() as program:
                fd = proc.add(program)
                messages: list[tuple[bytes | None, bytes]] = [(name_of("10.96.0.10", 53), b"q%d" % i) for i in range(3)]
                messages[failing] = (name_of("10.96.0.10", 53), bytes(70000))
                base = _mmsghdrs(proc, messages)
                assert decide(w, proc, "sendmmsg", fd, base, 3, 0) == expected
                assert proc.memory.writes == (
                    [tuple((base + 64 * i + 56, u32(2)) for i in range(written))] if written else []
                )

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(("unreadable", "expected"), [(0, Complete(-errno.EFAULT)), (1, Complete(1)), (2, Complete(2))])
@both_backends
def test_sendmmsg_sends_the_messages_before_one_whose_address_cannot_be_read(
    can_rewrite: bool, unreadable: int, expected: Complete
) -> None:
    """The kernel's sendmmsg stops at the message it cannot copy and counts those sent before."""

    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program:
                fd = proc.add(program)
                base = _mmsghdrs(proc, [(name_of("10.96.0.10", 53), b"q%d" % i) for i in range(3)])
                proc.memory.poke(base + 64 * unreadable, struct.pack("=Q", 4096))  # its msg_name
                assert decide(w, proc, "sendmmsg", fd, base, 3, 0) == expected
                relay = w.relays.relays.get((proc.inode(fd), endpoint(DNS)))
                sent = [_received(relay)[0] for _ in range(unreadable)] if relay is not None else []
                assert sent == [b"q%d" % i for i in range(unreadable)]
                assert relay is None or not relay_has_data(relay)

    with no_fd_leak():
        run(scenario())


def test_sendmmsg_of_no_message_sends_nothing() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            with udp_socket() as program:
                fd = proc.add(program)
                assert decide(w, proc, "sendmmsg", fd, proc.memory.reserve(64), 0, 0) == Complete(0)

    with no_fd_leak():
        run(scenario())


# ---- a full send buffer ---------------------------------------------------------------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
@both_backends
def test_a_full_send_buffer_waits_on_a_blocking_socket_and_is_eagain_otherwise(
    can_rewrite: bool, blocking: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's EAGAIN for a full UDP send buffer cannot be had on loopback (loopback_xmit
    releases the sender's memory at once): the first send ktrace makes is told EAGAIN, as the
    kernel would tell it, and every later one is real."""
    real_send = sockops.send
    calls: list[int] = []

    def send(fd: int, payload: bytes, name: bytes | None, control: bytes = b"", flags: int = 0) -> int:
        calls.append(flags)
        return -errno.EAGAIN if len(calls) == 1 else real_send(fd, payload, name, control, flags)

    monkeypatch.setattr(sockops, "send", send)

    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket(blocking=blocking) as program:
                fd = proc.add(program)
                payload, address = proc.memory.put(b"later"), proc.memory.put(name_of("10.96.0.10", 53))
                outcome = decide(w, proc, "sendto", fd, payload, 5, 0, address, 16)
                if not blocking:
                    assert outcome == Complete(-errno.EAGAIN)
                    return
                assert isinstance(outcome, Deferred)
                assert await settle(outcome) == Complete(5)
                assert _received(w.relays.relay(proc.inode(fd), DNS)) == (b"later", _source(program))
                assert all(flags & MSG_DONTWAIT for flags in calls)  # ktrace itself never blocks

    with no_fd_leak():
        run(scenario())
