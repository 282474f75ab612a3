"""connect() on TCP (and other IP) sockets through the real handlers, with a fake program and a
scripted agent: what the program's call returns, what its socket then is, what ktrace dialled.
Each scenario runs under both backends where they differ (ptrace: the program's own connect
rewritten to the parking address, run here by `kernel_connect`; notify: a thread of ktrace's)."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct

import pytest
from fake_agent import HANG, OK, Ok
from fakes import FakeProcess, endpoint, no_fd_leak, run
from handler_helpers import (
    Wired,
    both_backends,
    decide,
    i32,
    kernel_connect,
    loopback_server,
    name_of,
    only,
    poll_events,
    returned,
    settle,
    tcp_records,
    tcp_socket,
    through,
    until,
    wired,
)
from ktrace_agent.wire.connecting import tcp_state

from ktrace.tracer import sockops
from ktrace.tracer.sockets import Phase
from ktrace.tracer.tcp import ERESTART_RANGE
from ktrace.tracer.tracee import Complete, Deferred, NeedScratch, Resume, Rewrite

pytestmark = pytest.mark.timeout(30)

HELLO = "10.96.1.10:8080"
AGENT_SIDE = endpoint("10.244.0.7:41000")
SOL_SOCKET, SO_ERROR = 1, 4
UNSPEC = struct.pack("=H14x", socket.AF_UNSPEC)


async def _connect(w: Wired, proc: FakeProcess, fd: int, name: bytes, program: socket.socket) -> int:
    """The program's connect() of ``name`` from its stop to what it returns, under either backend."""
    address = proc.memory.put(name)
    t = proc.stop("connect", fd, address, len(name))
    return await returned(proc.memory, t, decide(w, proc, "connect", fd, address, len(name)), program)


def _so_error(w: Wired, proc: FakeProcess, fd: int, optlen: int = 4) -> tuple[object, bytes, int]:
    """getsockopt(SOL_SOCKET, SO_ERROR) at its stop: the outcome, the option's bytes, its length."""
    optval = proc.memory.reserve(4)
    optlen_ptr = proc.memory.put(i32(optlen))
    outcome = decide(w, proc, "getsockopt", fd, SOL_SOCKET, SO_ERROR, optval, optlen_ptr)
    return outcome, proc.memory.peek(optval, 4), struct.unpack("=i", proc.memory.peek(optlen_ptr, 4))[0]


# ---- redirected: the agent connects ------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "dest", "dialled"),
    [
        (socket.AF_INET, ("10.96.1.10", 8080), HELLO),
        (socket.AF_INET6, ("fd00:96::1:10", 8080), "[fd00:96::1:10]:8080"),
        (socket.AF_INET6, ("::ffff:10.96.1.10", 8080), HELLO),  # v4-mapped: the agent dials IPv4
    ],
    ids=["ipv4", "ipv6", "v4-mapped"],
)
@both_backends
def test_a_nonblocking_connect_parks_then_the_agent_s_connection_is_the_program_s(
    can_rewrite: bool, family: int, dest: tuple[str, int], dialled: str
) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket(family, blocking=False) as program:
                fd = proc.add(program)
                name = name_of(*dest, family=family)
                address = proc.memory.put(name)
                dial = w.agent.expect_dial(dialled).answer(HANG)
                assert decide(w, proc, "connect", fd, address, len(name)) == Complete(-errno.EINPROGRESS)
                assert await dial.arrived is None  # no --connect-timeout: the agent's own
                assert tcp_state(program) == sockops.TCP_SYN_SENT  # parked, as towards a far host
                assert await poll_events(program, select.POLLOUT, timeout=0) == 0
                # Asked again while the agent dials: the kernel's own EALREADY.
                assert decide(w, proc, "connect", fd, address, len(name)) == Complete(-errno.EALREADY)
                dial.release(Ok(AGENT_SIDE))
                assert await poll_events(program, select.POLLOUT) & select.POLLOUT
                assert decide(w, proc, "getsockopt", fd, SOL_SOCKET, SO_ERROR, 0, 0) == Resume()
                # The first connect() after completion says 0, then EISCONN: the kernel's answers.
                assert decide(w, proc, "connect", fd, address, len(name)) == Complete(0)
                assert decide(w, proc, "connect", fd, address, len(name)) == Complete(-errno.EISCONN)
                assert await through(program, b"through the agent") == b"THROUGH THE AGENT"
                assert proc.memory.writes == []  # a connect writes nothing into the program
                event = w.connects[-1]
                assert (event.dest, event.outcome, event.local) == (endpoint(dialled), "ok", AGENT_SIDE)
                w.agent.verify()

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize("answered", ["at once", "once parked"])
@both_backends
def test_a_blocking_connect_waits_in_the_kernel_and_returns_0(can_rewrite: bool, answered: str) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket() as program:
                fd = proc.add(program)
                name = name_of("10.96.1.10", 8080)
                address = proc.memory.put(name)
                dial = w.agent.expect_dial(HELLO).answer(OK if answered == "at once" else HANG)
                t = proc.stop("connect", fd, address, len(name))
                first = w.session.on_syscall(t)
                if can_rewrite:
                    # The program's own call, pointed at a copy of the parking address in ktrace's
                    # scratch memory (mapped first: NeedScratch), so no other thread can change it.
                    assert isinstance(first, NeedScratch)
                    proc.scratch.map()
                    t = proc.stop("connect", fd, address, len(name))
                    outcome = w.session.on_syscall(t)
                    assert isinstance(outcome, Rewrite)
                    copy, length = dict(outcome.args)[1], dict(outcome.args)[2]
                    host, port = w.agent.parking(socket.AF_INET)
                    assert proc.memory.peek(copy, length) == name_of(host, port)
                    assert proc.memory.peek(address, len(name)) == name  # the program's bytes untouched
                else:
                    assert isinstance(first, Deferred)
                    outcome = first
                task = asyncio.ensure_future(returned(proc.memory, t, outcome, program))
                if answered == "once parked":
                    await until(lambda: tcp_state(program) == sockops.TCP_SYN_SENT, "the connect to park")
                    assert not task.done()
                    dial.release(OK)
                assert await task == 0
                assert await through(program, b"ping") == b"PING"
                assert only(tcp_records(w)).phase is Phase.CONNECTED
                assert proc.memory.writes == []

    with no_fd_leak():
        run(scenario())


# ---- redirected: the agent fails ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("ECONNREFUSED", errno.ECONNREFUSED), ("ETIMEDOUT", errno.ETIMEDOUT), ("EHOSTUNREACH", errno.EHOSTUNREACH)],
)
@pytest.mark.parametrize("answered", ["before the call reaches the kernel", "once parked"])
@both_backends
def test_a_blocking_connect_the_agent_fails_returns_the_agent_s_errno(
    can_rewrite: bool, answered: str, answer: str, expected: int
) -> None:
    """Whenever the agent's answer comes: also before the thread that waits (the program's under
    ptrace, ktrace's under notify) has entered connect() in the kernel, a race the agent wins when
    it answers faster than that thread is scheduled."""

    async def scenario() -> None:
        async with wired(connect_timeout=7.5) as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket() as program:
                fd = proc.add(program)
                early = answered == "before the call reaches the kernel"
                dial = w.agent.expect_dial(HELLO).answer(answer if early else HANG)
                address = proc.memory.put(name_of("10.96.1.10", 8080))
                t = proc.stop("connect", fd, address, 16)
                outcome = decide(w, proc, "connect", fd, address, 16)
                assert only(tcp_records(w)).waiters == 1
                # An answer given already is ktrace's as soon as it dials (in the same step).
                assert await dial.arrived == 7.5  # --connect-timeout is the agent's dial timeout
                call = asyncio.ensure_future(returned(proc.memory, t, outcome, program))
                if not early:
                    await until(lambda: tcp_state(program) == sockops.TCP_SYN_SENT, "the connect to park")
                    dial.release(answer)
                assert await call == -expected
                assert tcp_records(w) == []  # told: forgotten, the socket is free for another connect
                assert tcp_state(program) == sockops.TCP_CLOSE
                assert w.connects[-1].outcome == errno.errorcode[expected]

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("ECONNREFUSED", errno.ECONNREFUSED), ("ETIMEDOUT", errno.ETIMEDOUT), ("ENETUNREACH", errno.ENETUNREACH)],
)
@both_backends
def test_a_nonblocking_connect_that_fails_reports_the_agent_s_errno_by_so_error_then_econnaborted(
    can_rewrite: bool, answer: str, expected: int
) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                w.agent.expect_dial(HELLO).answer(answer)
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.EINPROGRESS)
                events = await poll_events(program, select.POLLOUT | select.POLLIN)
                assert events & (select.POLLERR | select.POLLHUP) == select.POLLERR | select.POLLHUP
                outcome, value, length = _so_error(w, proc, fd)
                assert (outcome, value, length) == (Complete(0), i32(expected), 4)
                assert proc.memory.writes[-1][0][1] == i32(expected)
                # The kernel's sock_error path: once read, the next connect() says ECONNABORTED...
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.ECONNABORTED)
                assert tcp_records(w) == []
                # ...and the socket can connect afresh.
                w.agent.expect_dial(HELLO).answer(OK)
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.EINPROGRESS)
                assert await poll_events(program, select.POLLOUT) == select.POLLOUT
                w.agent.verify()

    with no_fd_leak():
        run(scenario())


def test_a_failed_nonblocking_connect_asked_again_without_so_error_says_the_agent_s_errno() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                w.agent.expect_dial(HELLO).answer("ECONNREFUSED")
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.EINPROGRESS)
                await poll_events(program, select.POLLOUT)
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.ECONNREFUSED)
                # The pending error is consumed with it: SO_ERROR is the kernel's (0) again.
                assert decide(w, proc, "getsockopt", fd, SOL_SOCKET, SO_ERROR, 0, 0) == Resume()
                assert program.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("optlen", "outcome", "value", "length"),
    [
        (4, Complete(0), i32(errno.ECONNREFUSED), 4),
        (8, Complete(0), i32(errno.ECONNREFUSED), 4),
        (2, Complete(0), i32(errno.ECONNREFUSED)[:2] + b"\xaa\xaa", 2),
        (0, Complete(0), b"\xaa" * 4, 0),
        (-1, Complete(-errno.EINVAL), b"\xaa" * 4, -1),
    ],
)
def test_so_error_fills_the_program_s_buffer_as_the_kernel_does(
    optlen: int, outcome: Complete, value: bytes, length: int
) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                w.agent.expect_dial(HELLO).answer("ECONNREFUSED")
                decide(w, proc, "connect", fd, name, 16)
                await poll_events(program, select.POLLOUT)
                assert _so_error(w, proc, fd, optlen) == (outcome, value, length)

    with no_fd_leak():
        run(scenario())


def test_so_error_with_an_unreadable_length_is_efault() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                w.agent.expect_dial(HELLO).answer("ECONNREFUSED")
                decide(w, proc, "connect", fd, name, 16)
                await poll_events(program, select.POLLOUT)
                assert decide(w, proc, "getsockopt", fd, SOL_SOCKET, SO_ERROR, 16, 32) == Complete(-errno.EFAULT)

    with no_fd_leak():
        run(scenario())


# ---- ptrace: the blocking connect's exit ------------------------------------------------------


@pytest.mark.parametrize(
    "result", [*ERESTART_RANGE, -errno.EINTR, -errno.EINPROGRESS], ids=lambda r: errno.errorcode.get(-r, str(r))
)
def test_an_interrupted_blocking_connect_keeps_dialling_and_the_restarted_call_waits_again(result: int) -> None:
    """ptrace: a signal ends the program's wait in the parking lot (EINTR, a restart, SO_SNDTIMEO's
    EINPROGRESS): the kernel's answer stands, the dial goes on, the next connect() waits again."""

    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            proc.scratch.map()
            with tcp_socket() as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                dial = w.agent.expect_dial(HELLO).answer(HANG)
                t = proc.stop("connect", fd, name, 16)
                first = w.session.on_syscall(t)
                assert isinstance(first, Rewrite) and first.on_exit is not None
                record = only(tcp_records(w))
                assert record.waiters == 1
                assert first.on_exit(result, proc.memory) is None
                assert (record.waiters, record.phase) == (0, Phase.CONNECTING)
                assert not dial.cancelled.done()
                # The restarted call (or the program's next connect()) stops again and waits again.
                t = proc.stop("connect", fd, name, 16)
                again = w.session.on_syscall(t)
                assert isinstance(again, Rewrite)
                assert record.waiters == 1
                dial.release(OK)
                assert await kernel_connect(proc.memory, t, again, program) == 0

    with no_fd_leak():
        run(scenario())


def test_a_blocking_connect_the_kernel_gave_up_on_keeps_the_kernel_s_answer() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            proc.scratch.map()
            with tcp_socket() as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                dial = w.agent.expect_dial(HELLO).answer(HANG)
                outcome = w.session.on_syscall(proc.stop("connect", fd, name, 16))
                assert isinstance(outcome, Rewrite) and outcome.on_exit is not None
                await dial.arrived
                # Its SYN retries ran out before the agent answered: ETIMEDOUT stands, the dial goes.
                assert outcome.on_exit(-errno.ETIMEDOUT, proc.memory) is None
                assert tcp_records(w) == []
                await dial.cancelled

    with no_fd_leak():
        run(scenario())


@both_backends
def test_a_blocking_connect_with_so_sndtimeo_returns_einprogress_and_goes_on(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket() as program:
                program.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("=qq", 0, 20_000))
                fd = proc.add(program)
                dial = w.agent.expect_dial(HELLO).answer(HANG)
                assert await _connect(w, proc, fd, name_of("10.96.1.10", 8080), program) == -errno.EINPROGRESS
                record = only(tcp_records(w))
                assert (record.phase, record.waiters) == (Phase.CONNECTING, 0)
                dial.release(OK)
                assert await poll_events(program, select.POLLOUT) == select.POLLOUT
                assert await through(program, b"late") == b"LATE"

    with no_fd_leak():
        run(scenario())


# ---- AF_UNSPEC -------------------------------------------------------------------------------


@both_backends
def test_af_unspec_on_a_connecting_socket_gives_the_dial_up_and_frees_the_socket(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                dial = w.agent.expect_dial(HELLO).answer(HANG)
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.EINPROGRESS)
                await dial.arrived
                unspec = proc.memory.put(UNSPEC)
                assert decide(w, proc, "connect", fd, unspec, 16) == Complete(0)
                await dial.cancelled
                assert tcp_records(w) == []
                assert tcp_state(program) == sockops.TCP_CLOSE
                # Free for another destination.
                w.agent.expect_dial("10.96.1.11:7").answer(OK)
                other = proc.memory.put(name_of("10.96.1.11", 7))
                assert decide(w, proc, "connect", fd, other, 16) == Complete(-errno.EINPROGRESS)
                assert await poll_events(program, select.POLLOUT) == select.POLLOUT
                w.agent.verify()

    with no_fd_leak():
        run(scenario())


def test_af_unspec_on_a_socket_ktrace_never_saw_is_the_kernel_s() -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            with tcp_socket() as program:
                fd = proc.add(program)
                unspec = proc.memory.put(UNSPEC)
                assert decide(w, proc, "connect", fd, unspec, 16) == Complete(0)

    with no_fd_leak():
        run(scenario())


# ---- local destinations: the kernel's connect on ktrace's copy of the address -----------------


@both_backends
def test_a_blocking_connect_to_a_local_destination_is_performed_on_the_copy(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired(local=["127.0.0.1"]) as w:
            proc = FakeProcess(can_rewrite)
            with loopback_server() as server, tcp_socket() as program:
                fd = proc.add(program)
                name = name_of(*server.getsockname())
                address = proc.memory.put(name)
                t = proc.stop("connect", fd, address, len(name))
                outcome = decide(w, proc, "connect", fd, address, len(name))
                if can_rewrite:
                    assert isinstance(outcome, Rewrite)
                    copy = dict(outcome.args)[1]
                    assert copy != address and proc.memory.peek(copy, len(name)) == name
                    assert dict(outcome.args)[2] == len(name)
                    assert await kernel_connect(proc.memory, t, outcome, program) == 0
                else:
                    assert isinstance(outcome, Deferred)
                    assert await settle(outcome) == Complete(0)
                accepted, peer = server.accept()
                accepted.close()
                assert peer == program.getsockname()
                assert [(e.outcome, e.decision.by_user_rule if e.decision else None) for e in w.connects] == [
                    ("ok", True)
                ]
                w.agent.verify()  # no dial

    with no_fd_leak():
        run(scenario())


@both_backends
def test_a_nonblocking_local_connect_is_reported_when_the_program_learns_its_outcome(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired(local=["127.0.0.1"]) as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                name = proc.memory.put(name_of("127.0.0.1", 1))  # nothing listens: refused
                outcome = decide(w, proc, "connect", fd, name, 16)
                # The kernel's answer on the copy (a non-blocking connect never waits for the RST).
                assert outcome == Complete(-errno.EINPROGRESS)
                await poll_events(program, select.POLLOUT)
                assert w.connects == []  # not known yet: reported once the program asks
                got, value, _length = _so_error(w, proc, fd)
                assert (got, value) == (Complete(0), i32(errno.ECONNREFUSED))
                assert [e.outcome for e in w.connects] == ["ECONNREFUSED"]

    with no_fd_leak():
        run(scenario())


# ---- what is not redirected ------------------------------------------------------------------


@both_backends
def test_ip_protocols_the_tunnel_cannot_carry_are_unreachable_remotely_and_local_ones_run(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            try:
                lite = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)  # UDP-Lite
            except OSError as exc:
                pytest.skip(f"no UDP-Lite here: {exc}")
            with lite, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
                target.bind(("127.0.0.1", 0))
                fd = proc.add(lite)
                remote = proc.memory.put(name_of("10.96.1.10", 53))
                assert decide(w, proc, "connect", fd, remote, 16) == Complete(-errno.ENETUNREACH)
                local = name_of(*target.getsockname())
                assert await _connect(w, proc, fd, local, lite) == 0
                assert lite.getpeername() == target.getsockname()
                w.agent.verify()

    with no_fd_leak():
        run(scenario())


def test_mptcp_to_the_cluster_fails_with_enetunreach_and_locally_runs() -> None:
    """A parked MPTCP socket never completes the parking lot's simultaneous open (decide.py): MPTCP
    to a cluster address fails at once with ENETUNREACH, as protocols the tunnel cannot carry do;
    nothing is dialled."""

    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(False)
            try:
                mptcp = tcp_socket(blocking=False, proto=262)
            except OSError as exc:
                pytest.skip(f"no MPTCP here: {exc}")
            with mptcp:
                fd = proc.add(mptcp)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.ENETUNREACH)
                assert not tcp_records(w)

    with no_fd_leak():
        run(scenario())


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/var/run/nscd/socket", Complete(-errno.ECONNREFUSED)),
        (b"/run/systemd/resolve/io.systemd.Resolve", Complete(-errno.ECONNREFUSED)),
        (b"/run/some/other.sock", Resume()),
    ],
)
def test_unix_sockets_run_except_the_local_caching_resolvers(path: bytes, expected: object) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(True)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as program:
                fd = proc.add(program)
                name = struct.pack("=H", socket.AF_UNIX) + path + b"\0"
                address = proc.memory.put(name)
                assert decide(w, proc, "connect", fd, address, len(name)) == expected

    with no_fd_leak():
        run(scenario())


# ---- errors before anything is decided ---------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad descriptor", Resume()),  # the kernel's EBADF
        ("not a socket", Resume()),  # the kernel's ENOTSOCK
        ("fd not an int", Resume()),
        ("ktrace out of descriptors", Complete(-errno.ENOBUFS)),
        ("address unreadable", Complete(-errno.EFAULT)),
        ("address partly unreadable", Complete(-errno.EFAULT)),
        ("address longer than a sockaddr_storage", Complete(-errno.EINVAL)),
        ("address too short", Complete(-errno.EINVAL)),  # the kernel's, on the copy
    ],
)
@both_backends
def test_connect_errors_are_the_kernel_s(can_rewrite: bool, case: str, expected: object) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            r, wpipe = os.pipe()
            with tcp_socket() as program:
                fd = proc.add(program)
                name = name_of("10.96.1.10", 8080)
                address, length = proc.memory.put(name), len(name)
                if case == "bad descriptor":
                    fd = 99
                elif case == "not a socket":
                    fd = proc.add(r)
                elif case == "fd not an int":
                    fd = 1 << 33
                elif case == "ktrace out of descriptors":
                    proc.duplicate_error = OSError(errno.EMFILE, "too many open files")
                elif case == "address unreadable":
                    address = 4096
                elif case == "address partly unreadable":
                    address = proc.memory.edge(name[:8])
                elif case == "address longer than a sockaddr_storage":
                    length = 129
                elif case == "address too short":
                    length = 8
                assert decide(w, proc, "connect", fd, address, length) == expected
                assert tcp_records(w) == []
            os.close(r)
            os.close(wpipe)

    with no_fd_leak():
        run(scenario())


# ---- the agent gone, the hand-over failing -----------------------------------------------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
@both_backends
def test_with_the_agent_gone_a_connect_fails_with_etimedout_as_a_lost_network_would(
    can_rewrite: bool, blocking: bool
) -> None:
    """AgentClient.open_tcp waits for a tunnel that is down, up to the dial timeout, then fails
    with ETIMEDOUT (never a made-up error): the program sees what a SYN into a dead network gives."""

    async def scenario() -> None:
        async with wired() as w:
            w.agent.lost = True
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=blocking) as program:
                fd = proc.add(program)
                if blocking:
                    assert await _connect(w, proc, fd, name_of("10.96.1.10", 8080), program) == -errno.ETIMEDOUT
                else:
                    name = proc.memory.put(name_of("10.96.1.10", 8080))
                    assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.EINPROGRESS)
                    await poll_events(program, select.POLLOUT)
                    assert _so_error(w, proc, fd)[:2] == (Complete(0), i32(errno.ETIMEDOUT))
                assert [e.outcome for e in w.connects] == ["ETIMEDOUT"]

    with no_fd_leak():
        run(scenario())


@both_backends
def test_a_connection_that_cannot_be_handed_to_the_program_is_aborted(can_rewrite: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            w.agent.attach_fails = True
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=False) as program:
                fd = proc.add(program)
                dial = w.agent.expect_dial(HELLO).answer(OK)
                name = proc.memory.put(name_of("10.96.1.10", 8080))
                assert decide(w, proc, "connect", fd, name, 16) == Complete(-errno.EINPROGRESS)
                await poll_events(program, select.POLLOUT)
                assert _so_error(w, proc, fd)[:2] == (Complete(0), i32(errno.ECONNABORTED))
                assert dial.dialled is not None and dial.dialled.aborted
                assert [e.outcome for e in w.connects] == ["ECONNABORTED"]

    with no_fd_leak():
        run(scenario())


# ---- TCP fast open: sendto(MSG_FASTOPEN) connects, then sends ---------------------------------

MSG_FASTOPEN = 0x20000000


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
@both_backends
def test_a_fast_open_sendto_connects_through_the_agent_then_sends(can_rewrite: bool, blocking: bool) -> None:
    async def scenario() -> None:
        async with wired() as w:
            proc = FakeProcess(can_rewrite)
            with tcp_socket(blocking=blocking) as program:
                fd = proc.add(program)
                w.agent.expect_dial(HELLO).answer(OK)
                payload, name = proc.memory.put(b"GET / HTTP/1.0\r\n\r\n"), proc.memory.put(name_of("10.96.1.10", 8080))
                outcome = decide(w, proc, "sendto", fd, payload, 18, MSG_FASTOPEN, name, 16)
                if not blocking:
                    # As a pod's without a cookie for the server: no data in the SYN, EINPROGRESS.
                    assert outcome == Complete(-errno.EINPROGRESS)
                    assert await poll_events(program, select.POLLOUT) == select.POLLOUT
                    assert await through(program, b"get") == b"GET"
                    return
                assert isinstance(outcome, Deferred)
                assert await settle(outcome) == Complete(18)
                program.setblocking(False)
                reply = await asyncio.get_running_loop().sock_recv(program, 100)
                assert reply == b"GET / HTTP/1.0\r\n\r\n".upper()

    with no_fd_leak():
        run(scenario())
