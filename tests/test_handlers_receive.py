"""recvfrom/recvmsg/recvmmsg on a relayed UDP socket through the real handlers: a reply comes
from the relay's loopback address, the program must see the remote peer the relay stands for.
ptrace: received by ktrace at the entry when it can (one stop), else the source the kernel wrote
is rewritten at the exit (`kernel_recvfrom`/`kernel_recvmsg` play the kernel here); notify:
always received by ktrace, which writes data, source, lengths and flags where the kernel would.
Every case asserts the exact parts written into the program's memory."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from fakes import FakeProcess, no_fd_leak, run
from handler_helpers import (
    Wired,
    at_exit,
    both_backends,
    decide,
    i32,
    iovecs,
    kernel_recvfrom,
    kernel_recvmsg,
    msghdr,
    name_of,
    settle,
    u32,
    udp_socket,
    wired,
)

from ktrace.tracer.tracee import Complete, Deferred, Resume, WatchExit

pytestmark = pytest.mark.timeout(30)

PEER = name_of("10.96.0.10", 53)
MSG_PEEK, MSG_TRUNC, MSG_DONTWAIT, MSG_WAITALL = socket.MSG_PEEK, socket.MSG_TRUNC, socket.MSG_DONTWAIT, 0x100
MSG_ERRQUEUE, MSG_WAITFORONE = 0x2000, 0x10000
IP_PKTINFO = 8  # linux/in.h (not in Python's socket module)
FILL = b"\xaa"


def _relayed(w: Wired, proc: FakeProcess, family: int = socket.AF_INET) -> tuple[socket.socket, int, socket.socket]:
    """A program UDP socket ktrace connected to the relay of 10.96.0.10:53: (socket, fd, relay)."""
    program = udp_socket(family)
    fd = proc.add(program)
    name = name_of("10.96.0.10", 53, family)
    assert decide(w, proc, "connect", fd, proc.memory.put(name), len(name)) == Complete(0)
    inode = proc.inode(fd)
    return program, fd, w.relays.relay(inode, "10.96.0.10:53")


def _reply(relay: socket.socket, program: socket.socket, payload: bytes) -> None:
    relay.sendto(payload, program.getsockname())  # loopback: queued when this returns


# ---- recvfrom ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "room", "flags", "expected_len", "data"),
    [
        ("queued", 128, 0, 6, b"answer"),
        ("name buffer smaller than the name", 8, 0, 6, b"answer"),
        ("MSG_TRUNC with a small buffer", 128, MSG_TRUNC, 6, b"ans"),
        ("MSG_PEEK", 128, MSG_PEEK, 6, b"answer"),
    ],
)
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@both_backends
def test_recvfrom_of_a_queued_reply_is_done_by_ktrace_with_the_true_source(
    can_rewrite: bool, family: int, case: str, room: int, flags: int, expected_len: int, data: bytes
) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd, relay = _relayed(w, proc, family)
            with program:
                peer = name_of("10.96.0.10", 53, family)
                shown = peer[:room]
                _reply(relay, program, b"answer")
                size = 3 if flags & MSG_TRUNC else 100
                buf, name_ptr, len_ptr = proc.memory.reserve(100), proc.memory.reserve(128), proc.memory.put(i32(room))
                proc.memory.writes.clear()
                outcome = decide(w, proc, "recvfrom", fd, buf, size, flags, name_ptr, len_ptr)
                assert outcome == Complete(expected_len)  # one stop, both backends
                assert proc.memory.writes == [((buf, data), (name_ptr, shown), (len_ptr, u32(len(peer))))]
                assert proc.memory.peek(name_ptr + len(shown), 1) == FILL
                queued = program.recv(100, MSG_DONTWAIT) if flags & MSG_PEEK else None
                assert queued in (None, b"answer")

    with no_fd_leak():
        run(scenario())


@both_backends
def test_a_blocking_recvfrom_with_nothing_queued_waits_then_shows_the_true_source(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd, relay = _relayed(w, proc)
            with program:
                buf, name_ptr, len_ptr = proc.memory.reserve(100), proc.memory.reserve(128), proc.memory.put(i32(128))
                t = proc.stop("recvfrom", fd, buf, 100, 0, name_ptr, len_ptr)
                outcome = w.session.on_syscall(t)
                proc.memory.writes.clear()
                if can_rewrite:
                    # The program's own call runs; its source is rewritten at the exit.
                    assert isinstance(outcome, WatchExit)
                    _reply(relay, program, b"late answer")
                    result = at_exit(proc.memory, outcome.on_exit, kernel_recvfrom(proc.memory, t, program))
                    assert result == 11
                    assert proc.memory.writes == [((name_ptr, PEER), (len_ptr, (16).to_bytes(4, "little")))]
                else:
                    assert isinstance(outcome, Deferred)
                    _reply(relay, program, b"late answer")
                    assert await settle(outcome) == Complete(11)
                    assert proc.memory.writes == [((buf, b"late answer"), (name_ptr, PEER), (len_ptr, u32(16)))]
                assert proc.memory.peek(buf, 11) == b"late answer"

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize("room", [8, 4, 2])
def test_at_the_exit_a_source_cut_short_by_the_program_s_buffer_is_still_rewritten(room: int) -> None:
    """ptrace: the kernel wrote only the first ``room`` bytes of the relay's address; the family
    and port are enough to find the relay (with 2 bytes, not even the port: left alone)."""

    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            program, fd, relay = _relayed(w, proc)
            with program:
                buf, name_ptr, len_ptr = proc.memory.reserve(100), proc.memory.reserve(128), proc.memory.put(i32(room))
                t = proc.stop("recvfrom", fd, buf, 100, MSG_WAITALL, name_ptr, len_ptr)
                outcome = w.session.on_syscall(t)
                assert isinstance(outcome, WatchExit)
                _reply(relay, program, b"x")
                proc.memory.writes.clear()
                assert at_exit(proc.memory, outcome.on_exit, kernel_recvfrom(proc.memory, t, program)) == 1
                if room >= 4:
                    assert proc.memory.writes == [((name_ptr, PEER[:room]), (len_ptr, (16).to_bytes(4, "little")))]
                else:
                    assert proc.memory.writes == []

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("case", "ptrace", "notify"),
    [
        ("nothing queued, MSG_DONTWAIT", "exit", Complete(-errno.EAGAIN)),
        ("nothing queued, O_NONBLOCK", "exit", Complete(-errno.EAGAIN)),
        ("flags ktrace cannot reproduce", "exit", Resume()),
        ("no source asked for", Resume(), Resume()),
        ("length unreadable", Resume(), Complete(-errno.EFAULT)),
        ("buffer unwritable", Complete(-errno.EFAULT), Complete(-errno.EFAULT)),
        ("a socket without relays", Resume(), Resume()),
    ],
)
@both_backends
def test_recvfrom_cases(can_rewrite: bool, case: str, ptrace: object, notify: object) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd, relay = _relayed(w, proc)
            with program, udp_socket() as other:
                buf, name_ptr, len_ptr = proc.memory.reserve(100), proc.memory.reserve(128), proc.memory.put(i32(128))
                flags = 0
                if case == "nothing queued, MSG_DONTWAIT":
                    flags = MSG_DONTWAIT
                elif case == "nothing queued, O_NONBLOCK":
                    program.setblocking(False)
                elif case == "flags ktrace cannot reproduce":
                    flags = MSG_ERRQUEUE
                    _reply(relay, program, b"x")
                elif case == "no source asked for":
                    name_ptr = 0
                    _reply(relay, program, b"x")
                elif case == "length unreadable":
                    len_ptr = 4096
                    _reply(relay, program, b"x")
                elif case == "buffer unwritable":
                    buf = 4096
                    _reply(relay, program, b"x")
                elif case == "a socket without relays":
                    fd = proc.add(other)
                duplicates = proc.duplicates
                proc.memory.writes.clear()
                outcome = decide(w, proc, "recvfrom", fd, buf, 100, flags, name_ptr, len_ptr)
                expected = ptrace if can_rewrite else notify
                if expected == "exit":
                    assert isinstance(outcome, WatchExit)
                else:
                    assert outcome == expected
                if case in ("buffer unwritable",):
                    with pytest.raises(BlockingIOError):
                        program.recv(10, MSG_DONTWAIT)  # taken: the kernel too drops what it cannot copy
                if case == "a socket without relays":
                    assert proc.duplicates == duplicates
                if outcome == Complete(-errno.EFAULT) or outcome == Complete(-errno.EAGAIN):
                    assert [part for write in proc.memory.writes for part in write if part[0] != buf] == []

    with no_fd_leak():
        run(scenario())


@both_backends
def test_a_datagram_from_anyone_but_a_relay_keeps_its_source(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with udp_socket() as program, udp_socket() as local:
                program.bind(("127.0.0.1", 0))
                fd = proc.add(program)
                # Unconnected, with a relay (it sent to the cluster), so its receives stop.
                payload, peer = proc.memory.put(b"q"), proc.memory.put(PEER)
                assert decide(w, proc, "sendto", fd, payload, 1, 0, peer, 16) == Complete(1)
                local.bind(("127.0.0.1", 0))
                local.sendto(b"local", program.getsockname())
                buf, name_ptr, len_ptr = proc.memory.reserve(100), proc.memory.reserve(128), proc.memory.put(i32(128))
                assert decide(w, proc, "recvfrom", fd, buf, 100, 0, name_ptr, len_ptr) == Complete(5)
                assert proc.memory.peek(name_ptr, 16) == name_of(*local.getsockname())

    with no_fd_leak():
        run(scenario())


def test_a_blocking_recvfrom_under_notify_ends_at_so_rcvtimeo() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            program, fd, _relay = _relayed(w, proc)
            with program:
                program.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("=qq", 0, 20_000))
                buf, name_ptr, len_ptr = proc.memory.reserve(100), proc.memory.reserve(128), proc.memory.put(i32(128))
                outcome = decide(w, proc, "recvfrom", fd, buf, 100, 0, name_ptr, len_ptr)
                assert isinstance(outcome, Deferred)
                assert await settle(outcome) == Complete(-errno.EAGAIN)

    with no_fd_leak():
        run(scenario())


# ---- recvmsg ----------------------------------------------------------------------------------


def _recvmsg_header(proc: FakeProcess, name_room: int = 128, control_room: int = 0) -> tuple[int, int, int, int, int]:
    """A msghdr with a name buffer, two iovecs (4 and 100 bytes) and an optional control buffer:
    (header, name, first buffer, second buffer, control)."""
    first, second = proc.memory.reserve(4), proc.memory.reserve(100)
    iov = iovecs(proc.memory, (first, 4), (second, 100))
    name = proc.memory.reserve(128) if name_room else 0
    control = proc.memory.reserve(control_room) if control_room else 0
    hdr = proc.memory.put(msghdr(name, name_room, iov, 2, control, control_room, 0x7777))
    return hdr, name, first, second, control


@both_backends
def test_recvmsg_scatters_the_reply_and_shows_the_true_source(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd, relay = _relayed(w, proc)
            with program:
                hdr, name, first, second, _control = _recvmsg_header(proc)
                t = proc.stop("recvmsg", fd, hdr, 0)
                outcome = w.session.on_syscall(t)
                _reply(relay, program, b"scattered reply")
                proc.memory.writes.clear()
                if can_rewrite:
                    assert isinstance(outcome, WatchExit)
                    assert at_exit(proc.memory, outcome.on_exit, kernel_recvmsg(proc.memory, hdr, program)) == 15
                    assert proc.memory.writes == [((name, PEER), (hdr + 8, (16).to_bytes(4, "little")))]
                else:
                    assert isinstance(outcome, Deferred)  # blocking, nothing was queued at the stop
                    assert await settle(outcome) == Complete(15)
                    assert proc.memory.writes == [
                        (
                            (first, b"scat"),
                            (second, b"tered reply"),
                            (name, PEER),
                            (hdr + 8, u32(16)),
                            (hdr + 40, struct.pack("=Q", 0)),
                            (hdr + 48, i32(0)),
                        )
                    ]
                assert proc.memory.peek(first, 4) + proc.memory.peek(second, 11) == b"scattered reply"

    with no_fd_leak():
        run(scenario())


def test_recvmsg_under_notify_copies_the_control_messages() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            program, fd, relay = _relayed(w, proc)
            with program:
                program.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                _reply(relay, program, b"with pktinfo")
                hdr, _name, _first, _second, control = _recvmsg_header(proc, control_room=64)
                assert decide(w, proc, "recvmsg", fd, hdr, socket.MSG_CMSG_CLOEXEC) == Complete(12)
                written = dict(part for write in proc.memory.writes for part in write)
                # struct cmsghdr: len (8), level, type, then struct in_pktinfo (12 bytes): 32 in all.
                cmsg_len, level, kind = struct.unpack_from("=Qii", written[control])
                assert (cmsg_len, level, kind) == (28, socket.IPPROTO_IP, IP_PKTINFO)
                assert written[hdr + 40] == struct.pack("=Q", len(written[control]))
                assert len(written[control]) == 32

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("case", "ptrace", "notify"),
    [
        ("no name buffer", Resume(), Complete(8)),
        ("flags ktrace cannot reproduce", "exit", Resume()),
        ("msghdr unreadable", Resume(), Complete(-errno.EFAULT)),
        ("iovec array unreadable", "exit", Complete(-errno.EFAULT)),
        ("more iovecs than UIO_MAXIOV", "exit", Complete(-errno.EMSGSIZE)),  # the kernel's __copy_msghdr
        ("an absurd iovec count", "exit", Complete(-errno.EMSGSIZE)),  # checked before anything is read
        ("nonblocking, nothing queued", "exit", Complete(-errno.EAGAIN)),
    ],
)
@both_backends
def test_recvmsg_cases(can_rewrite: bool, case: str, ptrace: object, notify: object) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd, relay = _relayed(w, proc)
            with program:
                data = proc.memory.reserve(100)
                name, namelen = proc.memory.reserve(128), 128
                iov, iovlen, flags = iovecs(proc.memory, (data, 100)), 1, 0
                if case != "nonblocking, nothing queued":
                    _reply(relay, program, b"datagram")
                if case == "no name buffer":
                    name, namelen = 0, 0
                elif case == "flags ktrace cannot reproduce":
                    flags = MSG_ERRQUEUE
                elif case == "iovec array unreadable":
                    iov = 4096
                elif case == "more iovecs than UIO_MAXIOV":
                    iov, iovlen = iovecs(proc.memory, *[(data, 1)] * 1025), 1025
                elif case == "an absurd iovec count":
                    iovlen = 1 << 40
                elif case == "nonblocking, nothing queued":
                    flags = MSG_DONTWAIT
                hdr = proc.memory.put(msghdr(name, namelen, iov, iovlen))
                if case == "msghdr unreadable":
                    hdr = 4096
                outcome = decide(w, proc, "recvmsg", fd, hdr, flags)
                expected = ptrace if can_rewrite else notify
                if expected == "exit":
                    assert isinstance(outcome, WatchExit)
                else:
                    assert outcome == expected

    with no_fd_leak():
        run(scenario())


# ---- recvmmsg ---------------------------------------------------------------------------------


def _mmsghdrs(proc: FakeProcess, count: int) -> tuple[int, list[tuple[int, int]]]:
    """An array of ``count`` struct mmsghdr, each with a 100-byte buffer and a name buffer:
    (array, [(buffer, name) per entry])."""
    entries, buffers = b"", []
    for _ in range(count):
        data, name = proc.memory.reserve(100), proc.memory.reserve(128)
        iov = iovecs(proc.memory, (data, 100))
        entries += msghdr(name, 128, iov, 1) + b"\xaa" * 8
        buffers.append((data, name))
    return proc.memory.put(entries), buffers


@both_backends
def test_recvmmsg_takes_what_is_queued_and_shows_each_true_source(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd, relay = _relayed(w, proc)
            with program:
                base, buffers = _mmsghdrs(proc, 3)
                _reply(relay, program, b"first")
                _reply(relay, program, b"second!")
                t = proc.stop("recvmmsg", fd, base, 3, MSG_WAITFORONE, 0)
                proc.memory.writes.clear()
                outcome = w.session.on_syscall(t)
                if can_rewrite:
                    assert isinstance(outcome, WatchExit)
                    for index in range(2):  # the kernel's receives
                        entry = base + 64 * index
                        kernel_recvmsg(proc.memory, entry, program, entry + 56)
                    assert at_exit(proc.memory, outcome.on_exit, 2) == 2
                    assert proc.memory.writes == [
                        ((buffers[i][1], PEER), (base + 64 * i + 8, (16).to_bytes(4, "little"))) for i in range(2)
                    ]
                else:
                    assert outcome == Complete(2)
                    assert [part for part in proc.memory.writes[0] if part[0] == base + 56] == [(base + 56, u32(5))]
                    assert [part for part in proc.memory.writes[1] if part[0] == base + 64 + 56] == [
                        (base + 64 + 56, u32(7))
                    ]
                    assert len(proc.memory.writes) == 2
                for index, payload in enumerate((b"first", b"second!")):
                    data, name = buffers[index]
                    assert proc.memory.peek(data, len(payload)) == payload
                    assert proc.memory.peek(name, 16) == PEER
                    assert proc.memory.peek(base + 64 * index + 56, 4) == u32(len(payload))
                assert proc.memory.peek(buffers[2][1], 1) == FILL  # the third entry untouched
                assert proc.memory.peek(base + 128 + 56, 4) == FILL * 4

    with no_fd_leak():
        run(scenario())


@both_backends
def test_recvmmsg_of_nothing_queued_without_waiting_is_eagain(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            program, fd, _relay = _relayed(w, proc)
            with program:
                base, _buffers = _mmsghdrs(proc, 2)
                outcome = decide(w, proc, "recvmmsg", fd, base, 2, MSG_DONTWAIT, 0)
                if can_rewrite:
                    assert isinstance(outcome, WatchExit)
                else:
                    assert outcome == Complete(-errno.EAGAIN)
                    assert decide(w, proc, "recvmmsg", fd, base, 0, 0, 0) == Resume()  # no message: the kernel's

    with no_fd_leak():
        run(scenario())
