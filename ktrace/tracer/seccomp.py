"""Build the classic-BPF seccomp program that decides which syscalls stop.

Pure: this module only produces bytes. `kernel.install_seccomp` loads them.

Layout of `struct seccomp_data` (linux/seccomp.h), all little-endian here:
    0  int   nr
    4  u32   arch
    8  u64   instruction_pointer
    16 u64   args[6]
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ktrace.tracer import arch
from ktrace.tracer.arch import Arch

# linux/filter.h instruction classes and modes
BPF_LD: Final = 0x00
BPF_W: Final = 0x00
BPF_ABS: Final = 0x20
BPF_JMP: Final = 0x05
BPF_JEQ: Final = 0x10
BPF_JGE: Final = 0x30
BPF_JSET: Final = 0x40
BPF_K: Final = 0x00
BPF_RET: Final = 0x06

# linux/seccomp.h return actions
RET_KILL_PROCESS: Final = 0x80000000
RET_ERRNO: Final = 0x00050000
RET_TRACE: Final = 0x7FF00000
RET_USER_NOTIF: Final = 0x7FC00000
RET_ALLOW: Final = 0x7FFF0000

OFF_NR: Final = 0
OFF_ARCH: Final = 4


def off_arg_low(index: int) -> int:
    return 16 + 8 * index


def off_arg_high(index: int) -> int:
    return 16 + 8 * index + 4


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int

    def pack(self) -> bytes:
        return struct.pack("<HBBI", self.code, self.jt, self.jf, self.k)


@dataclass(frozen=True)
class Rule:
    """What happens to one syscall number.

    `action` is a full seccomp return value (RET_TRACE | tag, RET_ERRNO | errno).
    With `unless_arg_zero = i`, the action applies only when args[i] != 0 and the
    syscall is allowed otherwise (e.g. `sendto` without a destination address is
    a plain send on a connected socket and need not stop).
    """

    nr: int
    action: int
    unless_arg_zero: int | None = None
    # (argument index, value): the action applies only when the low 32 bits of every
    # listed argument equal the value (ints like getsockopt's level and optname).
    only_if_args: tuple[tuple[int, int], ...] = ()
    # (argument index, minimum): with `unless_arg_zero`, the action applies only when the
    # low 32 bits of that argument are at least the minimum too (unsigned: a negative int
    # counts as large). For sendto's address length: see `filter_rules`.
    at_least: tuple[int, int] | None = None
    # (argument index, mask): the action applies only when the low 32 bits of that argument have
    # any of the mask's bits set (clone's CLONE_UNTRACED flag).
    any_bit: tuple[int, int] | None = None


def trace(
    nr: int,
    *,
    unless_arg_zero: int | None = None,
    only_if_args: tuple[tuple[int, int], ...] = (),
    at_least: tuple[int, int] | None = None,
    any_bit: tuple[int, int] | None = None,
) -> Rule:
    """A syscall that stops. Built with RET_TRACE; `build(stop=...)` swaps in another action
    (RET_USER_NOTIF) for every such rule."""
    # The 16-bit data of RET_TRACE is what PTRACE_GETEVENTMSG returns at the
    # stop; the syscall number is a convenient tag.
    return Rule(nr, RET_TRACE | (nr & 0xFFFF), unless_arg_zero, only_if_args, at_least, any_bit)


def fail(nr: int, errno: int) -> Rule:
    return Rule(nr, RET_ERRNO | (errno & 0xFFFF))


def _ld(offset: int) -> Insn:
    return Insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, offset)


def _ret(value: int) -> Insn:
    return Insn(BPF_RET | BPF_K, 0, 0, value)


def _jeq(k: int, jt: int, jf: int) -> Insn:
    return Insn(BPF_JMP | BPF_JEQ | BPF_K, jt, jf, k)


def _jset(k: int, jt: int, jf: int) -> Insn:
    return Insn(BPF_JMP | BPF_JSET | BPF_K, jt, jf, k)


def _jge(k: int, jt: int, jf: int) -> Insn:
    return Insn(BPF_JMP | BPF_JGE | BPF_K, jt, jf, k)


def _rule_block(rule: Rule) -> list[Insn]:
    """Instructions that run with the accumulator holding nr; fall through on no match."""
    if rule.any_bit is not None:
        index, mask = rule.any_bit
        # nr matches: the bit decides (ALLOW without it); every path then ends in a return.
        return [
            _jeq(rule.nr, 0, 4),
            _ld(off_arg_low(index)),
            _jset(mask & 0xFFFFFFFF, 0, 1),
            _ret(rule.action),
            _ret(RET_ALLOW),
        ]
    if rule.only_if_args:
        if rule.unless_arg_zero is not None:
            raise ValueError("a rule takes unless_arg_zero or only_if_args, not both")
        # nr matches: every argument must match too, else ALLOW. As below, reloading
        # clobbers the accumulator, so every path ends in a return once nr matched.
        count = len(rule.only_if_args)
        block = [_jeq(rule.nr, 0, 2 * count + 2)]
        for k, (index, value) in enumerate(rule.only_if_args):
            block += [_ld(off_arg_low(index)), _jeq(value & 0xFFFFFFFF, 0, 2 * (count - k - 1) + 1)]
        return [*block, _ret(rule.action), _ret(RET_ALLOW)]
    if rule.unless_arg_zero is None:
        if rule.at_least is not None:
            raise ValueError("at_least goes with unless_arg_zero")
        return [_jeq(rule.nr, 0, 1), _ret(rule.action)]
    i = rule.unless_arg_zero
    at_least: list[Insn] = []
    if rule.at_least is not None:
        index, minimum = rule.at_least
        # below the minimum: skip the action, to ALLOW
        at_least = [_ld(off_arg_low(index)), _jge(minimum & 0xFFFFFFFF, 0, 1)]
    # nr matches: the arguments decide. Reloading clobbers the accumulator, so
    # this block ends in a return on every path once nr matched.
    rest = [
        _ld(off_arg_low(i)),
        _jeq(0, 0, 2),  # low word zero? then check the high word; else on to at_least
        _ld(off_arg_high(i)),
        _jeq(0, len(at_least) + 1, 0),  # zero: over at_least and the action, to ALLOW
        *at_least,
        _ret(rule.action),
        _ret(RET_ALLOW),
    ]
    return [_jeq(rule.nr, 0, len(rest)), *rest]


def build(rules: Sequence[Rule], *, on: Arch = arch.NATIVE, stop: int = RET_TRACE, enosys: int = 38) -> bytes:
    """Assemble the filter for architecture ``on``.

    - A syscall from the arch's foreign (32-bit) ABI: its network syscalls fail with
      ENOSYS (they would bypass the tunnel); others run.
    - x32 syscall numbers fail with ENOSYS.
    - Native syscalls: the first matching rule decides; default ALLOW. A stopping rule's
      action is ``stop`` (RET_TRACE for ptrace, RET_USER_NOTIF for the notification backend).
    """
    native: list[Insn] = [_ld(OFF_NR)]
    if on.x32_bit:
        native += [_jge(on.x32_bit, 0, 1), _ret(RET_ERRNO | enosys)]
    for rule in rules:
        stopping = rule.action & 0xFFFF0000 == RET_TRACE and stop != RET_TRACE
        native.extend(_rule_block(dataclasses.replace(rule, action=stop) if stopping else rule))
    native.append(_ret(RET_ALLOW))

    foreign: list[Insn] = [_ld(OFF_NR)]
    for nr in on.foreign_denied:
        foreign.extend([_jeq(nr, 0, 1), _ret(RET_ERRNO | enosys)])
    foreign.append(_ret(RET_ALLOW))

    jump_to_foreign = len(native)
    if jump_to_foreign > 255:
        raise ValueError("seccomp filter too long for an 8-bit jump")
    # On the native arch fall through into the native block; on any other, jump over it.
    head = [_ld(OFF_ARCH), _jeq(on.audit_arch, 0, jump_to_foreign)]
    program = head + native + foreign
    if len(program) > 4096:
        raise ValueError("seccomp filter exceeds BPF_MAXINSNS")
    return b"".join(insn.pack() for insn in program)


def instructions(blob: bytes) -> list[Insn]:
    """Decode a packed program (used by tests and by the interpreter below)."""
    out = []
    for off in range(0, len(blob), 8):
        code, jt, jf, k = struct.unpack_from("<HBBI", blob, off)
        out.append(Insn(code, jt, jf, k))
    return out


def evaluate(blob: bytes, nr: int, audit_arch: int, args: Sequence[int] = (0,) * 6) -> int:
    """Run the program the way the kernel would, for tests of the filter logic."""
    data = struct.pack("<iIQ6Q", nr, audit_arch, 0, *[a & (2**64 - 1) for a in args])
    prog = instructions(blob)
    acc = 0
    pc = 0
    while True:
        insn = prog[pc]
        if insn.code == BPF_LD | BPF_W | BPF_ABS:
            acc = struct.unpack_from("<I", data, insn.k)[0]
            pc += 1
        elif insn.code == BPF_JMP | BPF_JEQ | BPF_K:
            pc += 1 + (insn.jt if acc == insn.k else insn.jf)
        elif insn.code == BPF_JMP | BPF_JSET | BPF_K:
            pc += 1 + (insn.jt if acc & insn.k else insn.jf)
        elif insn.code == BPF_JMP | BPF_JGE | BPF_K:
            pc += 1 + (insn.jt if acc >= insn.k else insn.jf)
        elif insn.code == BPF_RET | BPF_K:
            return insn.k
        else:
            raise ValueError(f"unknown BPF instruction {insn}")
