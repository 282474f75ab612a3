"""The session's dispatch, the resolver view, the io_uring refusal, and the error paths of every
syscall path: the program gone mid-stop or its memory failing at each of the handler's accesses
in turn, under both backends."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import select
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from fake_agent import HANG, OK
from fakes import FakeProcess, no_fd_leak, run
from handler_helpers import (
    Wired,
    both_backends,
    decide,
    i32,
    iovecs,
    msghdr,
    name_of,
    poll_events,
    settle,
    tcp_socket,
    udp_socket,
    wired,
)

from ktrace.tracer import arch, seccomp, syscalls
from ktrace.tracer.tracee import Complete, Deferred, InstallFd, Outcome, Resume, Rewrite, TraceeGone

pytestmark = pytest.mark.timeout(60)

AT_FDCWD = -100
RESOLV = b"nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"


# ---- the dispatch -----------------------------------------------------------------------------


def test_a_syscall_without_a_row_or_without_a_handler_runs_untouched() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            for name in ("io_uring_setup", "getppid", "close"):
                assert w.session.on_syscall(proc.stop(name, 3, 4096, 16)) == Resume()
            assert (proc.memory.accesses, proc.duplicates) == (0, 0)

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize("on", list(arch.ARCHES.values()), ids=lambda a: a.name)
@pytest.mark.parametrize("features", [frozenset(), frozenset({"files"})], ids=["default", "files"])
@pytest.mark.parametrize("stop", [seccomp.RET_TRACE, seccomp.RET_USER_NOTIF], ids=["ptrace", "notify"])
def test_io_uring_setup_fails_with_enosys_in_the_filter_whatever_the_session(
    on: arch.Arch, features: frozenset[str], stop: int
) -> None:
    """io_uring could connect and send without a syscall ktrace sees: the filter refuses it
    before any stop, under both backends' filters, on every architecture of the table."""
    program = seccomp.build(syscalls.filter_rules(features, on=on), on=on, stop=stop)
    nr = syscalls.number("io_uring_setup", on)
    assert nr is not None
    assert seccomp.evaluate(program, nr, on.audit_arch, (16, 4096, 0, 0, 0, 0)) == seccomp.RET_ERRNO | errno.ENOSYS
    # ...while the rows that stop do stop, with this backend's action.
    connect = syscalls.number("connect", on)
    assert connect is not None
    assert seccomp.evaluate(program, connect, on.audit_arch) & 0xFFFF0000 == stop


# ---- the resolver view ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenCase:
    syscall: str
    path: bytes
    flags: int = os.O_RDONLY
    dirfd: int = AT_FDCWD
    cwd: bytes = b"/"
    served: bool = True


OPENS = [
    OpenCase("open", b"/etc/resolv.conf"),
    OpenCase("openat", b"/etc/resolv.conf", os.O_RDONLY | os.O_CLOEXEC),
    OpenCase("openat2", b"/etc/resolv.conf", os.O_RDONLY | os.O_CLOEXEC),
    OpenCase("openat", b"resolv.conf", dirfd=7),  # a directory descriptor of /etc
    OpenCase("openat", b"../etc/resolv.conf", cwd=b"/tmp"),
    OpenCase("open", b"etc/./resolv.conf"),
    OpenCase("openat", b"//etc//resolv.conf"),
    OpenCase("openat", b"/etc/hosts", served=False),
    OpenCase("openat", b"/tmp/resolv.conf", served=False),  # the same name elsewhere
    OpenCase("openat", b"resolv.conf", dirfd=9, served=False),  # a directory ktrace cannot name
]


@pytest.mark.parametrize(
    "case", OPENS, ids=lambda c: f"{c.syscall} {c.path.decode()} dirfd={c.dirfd} cwd={c.cwd.decode()}"
)
@both_backends
def test_opening_resolv_conf_opens_the_agent_s(can_rewrite: bool, case: OpenCase, tmp_path: pathlib.Path) -> None:
    copy = tmp_path / "resolv.conf"
    copy.write_bytes(RESOLV)

    async def scenario() -> None:
        async with wired(served={b"/etc/resolv.conf": bytes(copy)}) as w:
            proc = FakeProcess(can_rewrite)
            proc.cwd, proc.dirs[7] = case.cwd, b"/etc"
            path = proc.memory.put(case.path + b"\0")
            index = 0 if case.syscall == "open" else 1
            if case.syscall == "open":
                args: tuple[int, ...] = (path, case.flags, 0)
            elif case.syscall == "openat":
                args = (case.dirfd, path, case.flags, 0)
            else:
                how = proc.memory.put(struct.pack("=QQQ", case.flags, 0, 0))
                args = (case.dirfd, path, how, 24)
            outcome = decide(w, proc, case.syscall, *args)
            if not case.served:
                assert outcome == Resume()
                assert not w.files.opened
                return
            assert w.files.opened == Counter({b"/etc/resolv.conf": 1})
            if can_rewrite:
                # The path argument points at ktrace's copy of the copy's path (scratch memory,
                # mapped at the first use: NeedScratch); the program's string is untouched.
                assert isinstance(outcome, Rewrite) and outcome.on_exit is None
                ((argument, slot),) = outcome.args
                assert argument == index
                assert proc.memory.peek(slot, len(bytes(copy)) + 1) == bytes(copy) + b"\0"
                assert proc.scratch.requests == 1
            else:
                assert isinstance(outcome, InstallFd)
                try:
                    assert outcome.cloexec == bool(case.flags & os.O_CLOEXEC)
                    assert os.read(outcome.fd, 4096) == RESOLV
                    assert os.get_inheritable(outcome.fd) is False  # ktrace's own is never inherited
                finally:
                    os.close(outcome.fd)
            assert proc.memory.peek(path, len(case.path)) == case.path
            assert proc.memory.writes == []

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("case", "ptrace", "notify"),
    [
        ("path unreadable", Resume(), Resume()),  # the kernel says EFAULT itself
        ("path longer than PATH_MAX", Resume(), Resume()),  # ENAMETOOLONG, the kernel's
        ("openat2's open_how unreadable", "rewrite", Complete(-errno.EFAULT)),
        ("the copy is gone", "rewrite", Complete(-errno.ENOENT)),
        ("no scratch page can be mapped", Resume(), "install"),  # ptrace: this machine's file
    ],
)
@both_backends
def test_resolver_view_errors(
    can_rewrite: bool, case: str, ptrace: object, notify: object, tmp_path: pathlib.Path
) -> None:
    copy = tmp_path / "resolv.conf"
    copy.write_bytes(RESOLV)

    async def scenario() -> None:
        async with wired(served={b"/etc/resolv.conf": bytes(copy)}) as w:
            proc = FakeProcess(can_rewrite)
            path = proc.memory.put(b"/etc/resolv.conf\0")
            how = proc.memory.put(struct.pack("=QQQ", os.O_RDONLY, 0, 0))
            if case == "path unreadable":
                path = 4096
            elif case == "path longer than PATH_MAX":
                path = proc.memory.put(b"/" * 5000 + b"etc/resolv.conf\0")
            elif case == "openat2's open_how unreadable":
                how = 4096
            elif case == "the copy is gone":
                copy.unlink()
            elif case == "no scratch page can be mapped":
                proc.scratch.unavailable = True
            outcome = decide(w, proc, "openat2", AT_FDCWD, path, how, 24)
            expected = ptrace if can_rewrite else notify
            if expected == "rewrite":
                assert isinstance(outcome, Rewrite)
            elif expected == "install":
                assert isinstance(outcome, InstallFd)
                os.close(outcome.fd)
            else:
                assert outcome == expected

    with no_fd_leak():
        run(scenario())


# ---- every path's error handling: the program gone, its memory failing -------------------------------


Setup = Callable[[Wired, FakeProcess, contextlib.ExitStack], Awaitable[tuple[str, tuple[int, ...]]]]


async def _tcp_connect(
    w: Wired, proc: FakeProcess, stack: contextlib.ExitStack, blocking: bool
) -> tuple[str, tuple[int, ...]]:
    fd = proc.add(stack.enter_context(tcp_socket(blocking=blocking)))
    w.agent.expect_dial("10.96.1.10:8080").answer(HANG)
    return "connect", (fd, proc.memory.put(name_of("10.96.1.10", 8080)), 16)


async def nonblocking_connect(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    return await _tcp_connect(w, proc, stack, blocking=False)


async def blocking_connect(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    return await _tcp_connect(w, proc, stack, blocking=True)


async def local_connect(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    server = stack.enter_context(socket.socket())
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    fd = proc.add(stack.enter_context(tcp_socket()))
    return "connect", (fd, proc.memory.put(name_of(*server.getsockname())), 16)


async def udp_connect(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = proc.add(stack.enter_context(udp_socket()))
    return "connect", (fd, proc.memory.put(name_of("10.96.0.10", 53)), 16)


async def _redirected(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack, answer: str | object) -> int:
    program = stack.enter_context(tcp_socket(blocking=False))
    fd = proc.add(program)
    w.agent.expect_dial("10.96.1.10:8080").answer(answer)  # type: ignore[arg-type]
    assert decide(w, proc, "connect", fd, proc.memory.put(name_of("10.96.1.10", 8080)), 16) == Complete(
        -errno.EINPROGRESS
    )
    await poll_events(program, select.POLLOUT)
    return fd


async def getpeername(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = await _redirected(w, proc, stack, OK)
    return "getpeername", (fd, proc.memory.reserve(128), proc.memory.put(i32(128)))


async def so_error(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = await _redirected(w, proc, stack, "ECONNREFUSED")
    return "getsockopt", (fd, 1, 4, proc.memory.reserve(4), proc.memory.put(i32(4)))


async def sendto(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = proc.add(stack.enter_context(udp_socket()))
    return "sendto", (fd, proc.memory.put(b"query"), 5, 0, proc.memory.put(name_of("10.96.0.10", 53)), 16)


async def sendmsg(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = proc.add(stack.enter_context(udp_socket()))
    iov = iovecs(proc.memory, (proc.memory.put(b"qu"), 2), (proc.memory.put(b"ery"), 3))
    name = proc.memory.put(name_of("10.96.0.10", 53))
    return "sendmsg", (fd, proc.memory.put(msghdr(name, 16, iov, 2)), 0)


async def sendmmsg(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = proc.add(stack.enter_context(udp_socket()))
    entries = b""
    for payload in (b"A?", b"AAAA?"):
        iov = iovecs(proc.memory, (proc.memory.put(payload), len(payload)))
        entries += msghdr(proc.memory.put(name_of("10.96.0.10", 53)), 16, iov, 1) + bytes(8)
    return "sendmmsg", (fd, proc.memory.put(entries), 2, 0)


async def _queued(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> int:
    program = stack.enter_context(udp_socket())
    fd = proc.add(program)
    assert decide(w, proc, "connect", fd, proc.memory.put(name_of("10.96.0.10", 53)), 16) == Complete(0)
    inode = proc.inode(fd)
    relay = w.relays.relay(inode, "10.96.0.10:53")
    relay.sendto(b"answer one", program.getsockname())
    relay.sendto(b"answer two", program.getsockname())
    return fd


async def recvfrom(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = await _queued(w, proc, stack)
    return "recvfrom", (fd, proc.memory.reserve(100), 100, 0, proc.memory.reserve(128), proc.memory.put(i32(128)))


async def recvmsg(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = await _queued(w, proc, stack)
    iov = iovecs(proc.memory, (proc.memory.reserve(4), 4), (proc.memory.reserve(100), 100))
    return "recvmsg", (fd, proc.memory.put(msghdr(proc.memory.reserve(128), 128, iov, 2)), 0)


async def recvmmsg(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    fd = await _queued(w, proc, stack)
    entries = b""
    for _ in range(2):
        iov = iovecs(proc.memory, (proc.memory.reserve(100), 100))
        entries += msghdr(proc.memory.reserve(128), 128, iov, 1) + bytes(8)
    return "recvmmsg", (fd, proc.memory.put(entries), 2, 0, 0)


async def openat2(w: Wired, proc: FakeProcess, stack: contextlib.ExitStack) -> tuple[str, tuple[int, ...]]:
    how = proc.memory.put(struct.pack("=QQQ", os.O_RDONLY, 0, 0))
    return "openat2", (AT_FDCWD, proc.memory.put(b"/etc/resolv.conf\0"), how, 24)


PATHS: list[Setup] = [
    nonblocking_connect,
    blocking_connect,
    local_connect,
    udp_connect,
    getpeername,
    so_error,
    sendto,
    sendmsg,
    sendmmsg,
    recvfrom,
    recvmsg,
    recvmmsg,
    openat2,
]


async def _attempt(
    can_rewrite: bool, setup: Setup, served: dict[bytes, bytes], fault: tuple[int, BaseException] | None, gone: bool
) -> tuple[Outcome | TraceeGone, int]:
    """One stop of ``setup``'s syscall with a fault at access ``fault[0]`` (or the program gone
    before it): the outcome or the TraceeGone it raised, and how many accesses the handler made."""
    async with wired(served=served) as w:
        proc = FakeProcess(can_rewrite)
        proc.scratch.map()
        with contextlib.ExitStack() as stack:
            syscall, args = await setup(w, proc, stack)
            before = proc.memory.accesses
            if fault is not None:
                proc.memory.fail_at(*fault)
            proc.gone = gone
            try:
                outcome: Outcome | TraceeGone = w.session.on_syscall(proc.stop(syscall, *args))
            except TraceeGone as exc:
                outcome = exc
            accesses = proc.memory.accesses - before
            if isinstance(outcome, InstallFd):
                os.close(outcome.fd)
            if isinstance(outcome, Deferred):
                closing = getattr(outcome.outcome, "close", None)
                if closing is not None:
                    closing()  # never awaited: what the backend would have waited on
            return outcome, accesses


@pytest.mark.parametrize("setup", PATHS, ids=lambda s: s.__name__)
@both_backends
def test_at_every_access_a_gone_program_is_tracee_gone_and_a_fault_is_efault_or_the_kernel_s(
    can_rewrite: bool, setup: Setup, tmp_path: pathlib.Path
) -> None:
    """For each memory access the handler makes at the stop, in turn: the program vanishing
    there propagates TraceeGone (the backend drops the stop), and the access failing (a short
    read or write of process_vm_*: EFAULT) makes the call fail with EFAULT or run as issued, so
    the kernel reports it: never another errno, never an exception, never a descriptor left
    (sendmmsg/recvmmsg: or the count of the messages done before the one that failed)."""
    copy = tmp_path / "resolv.conf"
    copy.write_bytes(RESOLV)
    served = {b"/etc/resolv.conf": bytes(copy)}

    async def scenario() -> None:
        clean, accesses = await _attempt(can_rewrite, setup, served, None, False)
        assert not isinstance(clean, TraceeGone)
        assert accesses >= 1
        for index in range(accesses):
            gone, _ = await _attempt(can_rewrite, setup, served, (index, TraceeGone(0)), False)
            assert isinstance(gone, TraceeGone), (index, gone)
            fault, _ = await _attempt(can_rewrite, setup, served, (index, OSError(errno.EFAULT, "short")), False)
            # sendmmsg/recvmmsg: the messages done before the fault count, as the kernel's do.
            partial = isinstance(clean, Complete) and isinstance(fault, Complete) and 0 < fault.retval < clean.retval
            assert fault in (Resume(), Complete(-errno.EFAULT)) or (partial and setup.__name__.endswith("mmsg")), (
                index,
                fault,
            )
        vanished, _ = await _attempt(can_rewrite, setup, served, None, True)
        assert isinstance(vanished, TraceeGone) or vanished == Resume(), vanished

    with no_fd_leak():
        run(scenario(), timeout=30)


# ---- gone while a call waits ------------------------------------------------------------------------


def test_a_program_gone_while_its_receive_waited_is_tracee_gone_and_consumes_the_datagram() -> None:
    """notify: a blocking receive waits in ktrace (Deferred); the program killed meanwhile makes
    the wait end with TraceeGone when the reply comes (the notification is moot by then)."""

    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            with udp_socket() as program:
                fd = proc.add(program)
                assert decide(w, proc, "connect", fd, proc.memory.put(name_of("10.96.0.10", 53)), 16) == Complete(0)
                inode = proc.inode(fd)
                args = (fd, proc.memory.reserve(100), 100, 0, proc.memory.reserve(128), proc.memory.put(i32(128)))
                outcome = decide(w, proc, "recvfrom", *args)
                assert isinstance(outcome, Deferred)
                proc.gone = True
                w.relays.relay(inode, "10.96.0.10:53").sendto(b"too late", program.getsockname())
                with pytest.raises(TraceeGone):
                    await settle(outcome)
                assert proc.memory.writes == []

    with no_fd_leak():
        run(scenario())


@both_backends
def test_a_dial_for_a_program_that_is_gone_is_given_up(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                dial = w.agent.expect_dial("10.96.1.10:8080").answer(HANG)
                assert decide(w, proc, "connect", fd, proc.memory.put(name_of("10.96.1.10", 8080)), 16) == Complete(
                    -errno.EINPROGRESS
                )
                await dial.arrived
                w.tcp.cancel_dials()  # what the session does when the program has ended
                await dial.cancelled

    with no_fd_leak():
        run(scenario())
