"""Everything specific to the CPU architecture: syscall numbers and registers.

Only x86_64 is supported today. An aarch64 port adds a sibling table here and a
register mapping in `kernel.py`; nothing else in the tracer names a register or
a syscall number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# linux/audit.h: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_X86_64: Final = 0xC000003E
# EM_386 | __AUDIT_ARCH_LE: a 64-bit process can still enter the 32-bit syscall
# table with `int 0x80`, where every number means something else.
AUDIT_ARCH_I386: Final = 0x40000003
# x32 syscalls share AUDIT_ARCH_X86_64 and are told apart by this bit.
X32_SYSCALL_BIT: Final = 0x40000000

# The `syscall` instruction is 2 bytes (0f 05): rewinding rip by this much
# re-executes it.
SYSCALL_INSN_LEN: Final = 2


@dataclass(frozen=True)
class SyscallTable:
    read: int
    write: int
    open: int
    sendfile: int
    connect: int
    sendto: int
    recvfrom: int
    sendmsg: int
    recvmsg: int
    getsockname: int
    getpeername: int
    getsockopt: int
    mmap: int
    munmap: int
    openat: int
    recvmmsg: int
    sendmmsg: int
    io_uring_setup: int
    openat2: int


X86_64: Final = SyscallTable(
    read=0,
    write=1,
    open=2,
    sendfile=40,
    connect=42,
    sendto=44,
    recvfrom=45,
    sendmsg=46,
    recvmsg=47,
    getsockname=51,
    getpeername=52,
    getsockopt=55,
    mmap=9,
    munmap=11,
    openat=257,
    recvmmsg=299,
    sendmmsg=307,
    io_uring_setup=425,
    openat2=437,
)

# The i386 numbers of the network syscalls a 64-bit program could reach through
# `int 0x80`. ktrace does not rewrite them; the filter makes them fail instead
# of letting them bypass the tunnel.
I386_NETWORK_SYSCALLS: Final = (
    102,  # socketcall
    337,  # recvmmsg
    345,  # sendmmsg
    362,  # connect
    369,  # sendto
    370,  # sendmsg
    371,  # recvfrom
    372,  # recvmsg
    425,  # io_uring_setup
)

SYSCALLS: Final = X86_64
AUDIT_ARCH: Final = AUDIT_ARCH_X86_64

# Register names in python-ptrace's user_regs_struct for x86_64.
NR_REGISTER: Final = "orig_rax"
RETURN_REGISTER: Final = "rax"
IP_REGISTER: Final = "rip"
SP_REGISTER: Final = "rsp"
ARG_REGISTERS: Final = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
