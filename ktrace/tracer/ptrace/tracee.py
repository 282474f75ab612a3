"""`Tracee` for a thread at a ptrace seccomp stop: its registers are the syscall's
arguments, process_vm_readv/writev its memory, and a scratch page (`scratch.py`) gives
arguments a copy the program cannot change under the kernel."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from ktrace.tracer import linux
from ktrace.tracer.ptrace.kernel import Registers
from ktrace.tracer.ptrace.scratch import ScratchPages
from ktrace.tracer.threads import ThreadGroups


@dataclass
class PtraceMemory:
    tid: int

    def read(self, address: int, size: int) -> bytes:
        return linux.read_memory(self.tid, address, size)

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        return linux.read_c_string(self.tid, address, limit)

    def read_int(self, address: int) -> int:
        return linux.read_int(self.tid, address)

    def write(self, parts: Sequence[tuple[int, bytes]]) -> None:
        linux.write_memory_parts(self.tid, parts)


@dataclass
class PtraceTracee(PtraceMemory):
    regs: Registers
    syscall: str
    threads: ThreadGroups
    scratch: ScratchPages
    can_rewrite: bool = True

    def arg(self, index: int) -> int:
        return self.regs.arg(index)

    @property
    def process(self) -> int:
        return self.threads.of(self.tid)

    def duplicate(self, fd: int) -> int:
        return linux.duplicate_fd(self.tid, fd, self.threads.of)

    def inode(self, fd: int) -> int | None:
        return linux.socket_inode(self.tid, fd)

    def directory(self, dirfd: int) -> bytes | None:
        return linux.directory_of(self.tid, dirfd)

    def stable_copy(self, data: bytes) -> int | None:
        if self.scratch.unavailable(self.tid):
            raise OSError(errno.ENOMEM, "no scratch page in this process")
        return self.scratch.slot_for(self.tid, data)
