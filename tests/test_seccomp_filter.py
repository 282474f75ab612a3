"""The BPF filter, run through an interpreter that follows the kernel's rules."""

from __future__ import annotations

import pytest

from ktrace.run import filter_rules
from ktrace.tracer import arch, seccomp

SYS = arch.SYSCALLS
PROGRAM = seccomp.build(filter_rules())


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
    assert run(arch.X32_SYSCALL_BIT | SYS.connect) == seccomp.RET_ERRNO | 38


@pytest.mark.parametrize("nr", arch.I386_NETWORK_SYSCALLS)
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


def test_rules_after_a_conditional_rule_still_match() -> None:
    prog = seccomp.build([seccomp.trace(SYS.sendto, unless_arg_zero=4), seccomp.trace(SYS.connect)])
    assert seccomp.evaluate(prog, SYS.connect, arch.AUDIT_ARCH_X86_64) == seccomp.RET_TRACE | SYS.connect


def test_program_is_whole_instructions() -> None:
    assert len(PROGRAM) % 8 == 0
    assert len(seccomp.instructions(PROGRAM)) == len(PROGRAM) // 8


def test_getsockopt_so_error_stops_only_when_local_outcomes_are_wanted() -> None:
    with_local = seccomp.build(filter_rules(local_outcomes=True))
    so_error = (3, 1, 4, 0x7FFF0000, 0x7FFF0010, 0)  # fd, SOL_SOCKET, SO_ERROR, optval, optlen
    assert seccomp.evaluate(with_local, SYS.getsockopt, arch.AUDIT_ARCH_X86_64, so_error) == (
        seccomp.RET_TRACE | SYS.getsockopt
    )
    # The kernel reads level and optname as ints: garbage in the high half does not matter.
    high = (3, 1 | 1 << 32, 4 | 5 << 32, 0, 0, 0)
    assert seccomp.evaluate(with_local, SYS.getsockopt, arch.AUDIT_ARCH_X86_64, high) == (
        seccomp.RET_TRACE | SYS.getsockopt
    )
    for other in [(3, 1, 7, 0, 0, 0), (3, 6, 4, 0, 0, 0), (3, 0, 0, 0, 0, 0)]:  # SO_SNDBUF, IPPROTO_TCP level
        assert seccomp.evaluate(with_local, SYS.getsockopt, arch.AUDIT_ARCH_X86_64, other) == seccomp.RET_ALLOW
    assert seccomp.evaluate(with_local, SYS.connect, arch.AUDIT_ARCH_X86_64) == seccomp.RET_TRACE | SYS.connect
    assert run(SYS.getsockopt, args=so_error) == seccomp.RET_ALLOW  # the default filter never stops it


def test_a_rule_takes_one_kind_of_argument_condition() -> None:
    rule = seccomp.Rule(SYS.getsockopt, seccomp.RET_TRACE, unless_arg_zero=1, only_if_args=((2, 4),))
    with pytest.raises(ValueError, match="not both"):
        seccomp.build([rule])
