"""What differs between CPU architectures: the audit arch seccomp reports, the registers
a syscall uses, and the other ABIs a process of this arch can enter the kernel through.

Syscall numbers are not here: `syscalls.py` has one row per syscall with its number on
each architecture. x86_64 runs end to end; aarch64 is described (its rows, registers and
filter are unit-tested) but has not run on hardware yet.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Final

# linux/audit.h: EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_X86_64: Final = 0xC000003E
AUDIT_ARCH_AARCH64: Final = 0xC00000B7
# The 32-bit ABIs a 64-bit process can still use (`int 0x80` on x86_64; AArch32 on arm64
# kernels that run 32-bit code), where every syscall number means something else.
AUDIT_ARCH_I386: Final = 0x40000003
AUDIT_ARCH_ARM: Final = 0x40000028


@dataclass(frozen=True)
class Arch:
    name: str  # the key of this arch in syscalls.Row.numbers
    audit_arch: int
    # Register names in the ptrace register structure.
    nr_register: str
    return_register: str
    ip_register: str
    arg_registers: tuple[str, str, str, str, str, str]
    # Length of the syscall instruction (rewinding the instruction pointer by it re-issues the call).
    syscall_insn_len: int
    # The syscall number lives outside the general registers (aarch64: NT_ARM_SYSTEM_CALL):
    # changing nr_register alone does not change the call.
    nr_in_regset: bool
    # Numbers of this arch's network syscalls in its foreign (32-bit) ABI: they fail with
    # ENOSYS rather than reach the kernel unseen.
    foreign_audit_arch: int
    foreign_denied: tuple[int, ...]
    # Re-issuing a syscall from its exit stop (ip rewound over the instruction): the register the
    # instruction reads the number from, when the kernel overwrote it with the result (x86_64:
    # rax, the number only survives in orig_rax). None: the number register is left intact
    # (aarch64's x8; there the result overwrote x0, the first argument, restored with the rest).
    reissue_number_register: str | None = None
    # x32 syscalls share the native audit arch and set this bit in the number (0: none).
    x32_bit: int = 0


X86_64: Final = Arch(
    name="x86_64",
    audit_arch=AUDIT_ARCH_X86_64,
    nr_register="orig_rax",
    return_register="rax",
    ip_register="rip",
    arg_registers=("rdi", "rsi", "rdx", "r10", "r8", "r9"),
    syscall_insn_len=2,  # 0f 05
    nr_in_regset=False,
    foreign_audit_arch=AUDIT_ARCH_I386,
    foreign_denied=(
        102,  # socketcall
        337,  # recvmmsg
        345,  # sendmmsg
        362,  # connect
        369,  # sendto
        370,  # sendmsg
        371,  # recvfrom
        372,  # recvmsg
        425,  # io_uring_setup
    ),
    reissue_number_register="rax",
    x32_bit=0x40000000,
)

AARCH64: Final = Arch(
    name="aarch64",
    audit_arch=AUDIT_ARCH_AARCH64,
    # python-ptrace names the general registers r0..r30; x8 carries the number at entry.
    nr_register="r8",
    return_register="r0",
    ip_register="pc",
    arg_registers=("r0", "r1", "r2", "r3", "r4", "r5"),
    syscall_insn_len=4,  # svc #0
    nr_in_regset=True,
    foreign_audit_arch=AUDIT_ARCH_ARM,
    foreign_denied=(
        283,  # connect
        290,  # sendto
        292,  # recvfrom
        296,  # sendmsg
        297,  # recvmsg
        365,  # recvmmsg
        374,  # sendmmsg
        425,  # io_uring_setup
    ),
)

ARCHES: Final = {arch.name: arch for arch in (X86_64, AARCH64)}


def native() -> Arch:
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        return X86_64
    if machine in ("aarch64", "arm64"):
        return AARCH64
    raise RuntimeError(f"ktrace does not support the {machine} architecture")


NATIVE: Final = native()
