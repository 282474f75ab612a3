"""`Tracee` for a thread at a ptrace seccomp stop: its registers are the syscall's
arguments, process_vm_readv/writev its memory, and a scratch page (`scratch.py`) gives
arguments a copy the program cannot change under the kernel."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ktrace.tracer.ptrace.kernel import Registers
from ktrace.tracer.ptrace.scratch import ScratchPages
from ktrace.tracer.thread_access import ThreadAccess


@dataclass
class PtraceTracee(ThreadAccess):
    regs: Registers
    syscall: str
    scratch: ScratchPages
    can_rewrite: bool = True

    def arg(self, index: int) -> int:
        return self.regs.arg(index)

    def stable_copy(self, data: bytes) -> int | None:
        if self.scratch.unavailable(self.tid):
            raise OSError(errno.ENOMEM, "no scratch page in this process")
        return self.scratch.slot_for(self.tid, data)
