"""The BPF filter, run through an interpreter that follows the kernel's rules."""

from __future__ import annotations

import pytest

from ktrace.tracer import arch, seccomp, syscalls
from ktrace.tracer.syscalls import filter_rules


class _Numbers:
    """x86_64 syscall numbers by name (the table's, plus a few the filter must let run)."""

    read, write, mmap = 0, 1, 9

    def __getattr__(self, name: str) -> int:
        nr = syscalls.number(name, arch.X86_64)
        assert nr is not None
        return nr


SYS = _Numbers()
PROGRAM = seccomp.build(filter_rules(on=arch.X86_64), on=arch.X86_64)


def run(nr: int, audit_arch: int = arch.AUDIT_ARCH_X86_64, args: tuple[int, ...] = (0,) * 6) -> int:
    return seccomp.evaluate(PROGRAM, nr, audit_arch, args)


@pytest.mark.parametrize("nr", [SYS.connect, SYS.getpeername, SYS.getsockname])
def test_traced_syscalls_stop_with_their_number_as_tag(nr: int) -> None:
    assert run(nr) == seccomp.RET_TRACE | nr


@pytest.mark.parametrize("nr", [SYS.read, SYS.write, SYS.mmap, 39, 60, 231, SYS.sendto])
def test_everything_else_runs_natively(nr: int) -> None:
    assert run(nr) == seccomp.RET_ALLOW


def test_io_uring_setup_fails_with_enosys_without_a_stop() -> None:
    assert run(SYS.io_uring_setup) == seccomp.RET_ERRNO | 38


def test_x32_numbers_are_refused() -> None:
    assert run(arch.X86_64.x32_bit | SYS.connect) == seccomp.RET_ERRNO | 38


@pytest.mark.parametrize("nr", arch.X86_64.foreign_denied)
def test_i386_network_syscalls_cannot_bypass_the_tunnel(nr: int) -> None:
    assert run(nr, arch.AUDIT_ARCH_I386) == seccomp.RET_ERRNO | 38


def test_i386_other_syscalls_run() -> None:
    # 42 is pipe on i386, not connect: the table is per architecture.
    assert run(42, arch.AUDIT_ARCH_I386) == seccomp.RET_ALLOW


def test_conditional_rule_checks_both_halves_of_the_argument() -> None:
    prog = seccomp.build([seccomp.trace(SYS.sendto, unless_arg_zero=4)])
    tag = seccomp.RET_TRACE | SYS.sendto
    assert seccomp.evaluate(prog, SYS.sendto, arch.AUDIT_ARCH_X86_64, (3, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
    assert seccomp.evaluate(prog, SYS.sendto, arch.AUDIT_ARCH_X86_64, (3, 0, 0, 0, 0x7FFF0000, 0)) == tag
    assert seccomp.evaluate(prog, SYS.sendto, arch.AUDIT_ARCH_X86_64, (3, 0, 0, 0, 1 << 40, 0)) == tag
    assert seccomp.evaluate(prog, SYS.connect, arch.AUDIT_ARCH_X86_64) == seccomp.RET_ALLOW


def test_a_sendto_to_an_address_shorter_than_an_ip_one_does_not_stop() -> None:
    """The default filter: sendto stops only with an address of at least sizeof(sockaddr_in)
    (glibc's netlink request, a 12-byte sockaddr_nl, runs; the kernel refuses a shorter IP one)."""
    tag = seccomp.RET_TRACE | SYS.sendto
    for addr, length, expected in [
        (0, 16, seccomp.RET_ALLOW),  # no address: a connected socket
        (0x7FFF0000, 12, seccomp.RET_ALLOW),  # sockaddr_nl
        (0x7FFF0000, 0, seccomp.RET_ALLOW),
        (0x7FFF0000, 15, seccomp.RET_ALLOW),
        (0x7FFF0000, 16, tag),  # sockaddr_in
        (0x7FFF0000, 28, tag),  # sockaddr_in6
        (0x7FFF0000, 110, tag),  # a long AF_UNIX path: ktrace's handler lets it run
        (0x7FFF0000, 0xFFFFFFFF, tag),  # -1: the kernel's EINVAL, seen by ktrace as before
        (1 << 40, 16, tag),  # an address in the high half only
        (1 << 40, 12 | 1 << 32, seccomp.RET_ALLOW),  # the kernel reads an int: the high half is not it
        (0x7FFF0000, 16 | 1 << 32, tag),
    ]:
        assert run(SYS.sendto, args=(3, 0, 0, 0, addr, length)) == expected, (hex(addr), hex(length))
    # The other rules still match after the sendto block, whatever path it took.
    for length in (0, 12, 16):
        assert run(SYS.recvfrom, args=(3, 0, 0, 0, 0x7FFF0000, length)) == seccomp.RET_TRACE | SYS.recvfrom
    assert run(SYS.connect) == seccomp.RET_TRACE | SYS.connect


def test_at_least_needs_unless_arg_zero() -> None:
    rule = seccomp.Rule(SYS.sendto, seccomp.RET_TRACE, at_least=(5, 16))
    with pytest.raises(ValueError, match="unless_arg_zero"):
        seccomp.build([rule])


def test_rules_after_a_conditional_rule_still_match() -> None:
    prog = seccomp.build([seccomp.trace(SYS.sendto, unless_arg_zero=4), seccomp.trace(SYS.connect)])
    assert seccomp.evaluate(prog, SYS.connect, arch.AUDIT_ARCH_X86_64) == seccomp.RET_TRACE | SYS.connect


def test_program_is_whole_instructions() -> None:
    assert len(PROGRAM) % 8 == 0
    assert len(seccomp.instructions(PROGRAM)) == len(PROGRAM) // 8


def test_getsockopt_stops_only_for_so_error() -> None:
    so_error = (3, 1, 4, 0x7FFF0000, 0x7FFF0010, 0)  # fd, SOL_SOCKET, SO_ERROR, optval, optlen
    assert run(SYS.getsockopt, args=so_error) == seccomp.RET_TRACE | SYS.getsockopt
    # The kernel reads level and optname as ints: garbage in the high half does not matter.
    high = (3, 1 | 1 << 32, 4 | 5 << 32, 0, 0, 0)
    assert run(SYS.getsockopt, args=high) == seccomp.RET_TRACE | SYS.getsockopt
    for other in [(3, 1, 7, 0, 0, 0), (3, 6, 4, 0, 0, 0), (3, 0, 0, 0, 0, 0)]:  # SO_SNDBUF, IPPROTO_TCP level
        assert run(SYS.getsockopt, args=other) == seccomp.RET_ALLOW


def test_a_rule_takes_one_kind_of_argument_condition() -> None:
    rule = seccomp.Rule(SYS.getsockopt, seccomp.RET_TRACE, unless_arg_zero=1, only_if_args=((2, 4),))
    with pytest.raises(ValueError, match="not both"):
        seccomp.build([rule])


def test_the_notification_backend_gets_the_same_filter_with_another_stop_action() -> None:
    notify = seccomp.build(filter_rules(on=arch.X86_64), on=arch.X86_64, stop=seccomp.RET_USER_NOTIF)
    assert seccomp.evaluate(notify, SYS.connect, arch.AUDIT_ARCH_X86_64) == seccomp.RET_USER_NOTIF
    assert seccomp.evaluate(notify, SYS.io_uring_setup, arch.AUDIT_ARCH_X86_64) == seccomp.RET_ERRNO | 38
    assert seccomp.evaluate(notify, SYS.read, arch.AUDIT_ARCH_X86_64) == seccomp.RET_ALLOW


@pytest.mark.parametrize("row", [row for row in syscalls.TABLE if "aarch64" in row.numbers], ids=lambda r: r.name)
def test_aarch64_filter_stops_the_table_s_rows_by_their_aarch64_numbers(row: syscalls.Row) -> None:
    every_feature = frozenset(r.feature for r in syscalls.TABLE if r.feature is not None)
    program = seccomp.build(filter_rules(every_feature, on=arch.AARCH64), on=arch.AARCH64)
    nr = row.numbers["aarch64"]
    args = (3 | syscalls.CLONE_UNTRACED, 1, 4, 0x7FFF0000, 0x7FFF0000, 64)  # satisfies every row's condition
    expected = seccomp.RET_TRACE | nr
    if isinstance(row.when, syscalls.Fails):
        expected = seccomp.RET_ERRNO | row.when.errno
    assert seccomp.evaluate(program, nr, arch.AUDIT_ARCH_AARCH64, args) == expected
    # The same number from another audit arch is not this syscall there: it never stops.
    assert seccomp.evaluate(program, nr, arch.AUDIT_ARCH_X86_64, args) & 0xFFFF0000 != seccomp.RET_TRACE


@pytest.mark.parametrize("nr", arch.AARCH64.foreign_denied)
def test_aarch32_network_syscalls_cannot_bypass_the_tunnel(nr: int) -> None:
    program = seccomp.build(filter_rules(on=arch.AARCH64), on=arch.AARCH64)
    assert seccomp.evaluate(program, nr, arch.AUDIT_ARCH_ARM) == seccomp.RET_ERRNO | 38


def test_under_ptrace_only_an_untraced_clone_stops_and_clone3_is_refused() -> None:
    program = seccomp.build(filter_rules(frozenset({"ptrace"}), on=arch.X86_64), on=arch.X86_64)
    untraced, sigchld = syscalls.CLONE_UNTRACED, 17
    assert seccomp.evaluate(program, SYS.clone, arch.AUDIT_ARCH_X86_64, (untraced | sigchld, 0, 0, 0, 0, 0)) == (
        seccomp.RET_TRACE | SYS.clone
    )
    # A thread or a plain fork: no stop (threads are created often).
    assert seccomp.evaluate(program, SYS.clone, arch.AUDIT_ARCH_X86_64, (0x3D0F00, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
    assert seccomp.evaluate(program, SYS.clone, arch.AUDIT_ARCH_X86_64, (sigchld, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
    assert seccomp.evaluate(program, SYS.clone3, arch.AUDIT_ARCH_X86_64) == seccomp.RET_ERRNO | 38
    # Under notify neither row is in the filter (the guardian ends every process).
    assert run(SYS.clone, args=(untraced, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
    assert run(SYS.clone3) == seccomp.RET_ALLOW
