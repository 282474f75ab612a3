"""The syscall handler of one `ktrace run`: routes each stop to its concern."""

from __future__ import annotations

from dataclasses import dataclass, field

from ktrace.tracer import arch
from ktrace.tracer.files import FileViews
from ktrace.tracer.kernel import Registers
from ktrace.tracer.network import NetworkHandler
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracer import Outcome

SYS = arch.SYSCALLS
_FILE_SYSCALLS = frozenset({SYS.open, SYS.openat, SYS.openat2})


@dataclass
class SessionHandler:
    network: NetworkHandler
    files: FileViews
    # Shared with the handlers (one /proc read per thread for all of them).
    threads: ThreadGroups = field(default_factory=ThreadGroups)

    def on_syscall(self, tid: int, regs: Registers) -> Outcome:
        if regs.nr in _FILE_SYSCALLS:
            return self.files.on_open(tid, regs)
        return self.network.on_syscall(tid, regs)

    def on_exec(self, tid: int) -> None:
        # exec from a non-leader thread gives it the leader's id: what was known of it is stale.
        self.threads.forget(tid)
        self.files.scratch.exec_happened(tid)

    def on_thread_exit(self, tid: int) -> None:
        self.threads.forget(tid)
