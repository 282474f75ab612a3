"""`Tracee` for a thread waiting on a seccomp notification: its arguments come with the
notification, its memory and descriptors are reached as under ptrace (process_vm_readv and
writev, pidfd_getfd), and nothing can be rewritten."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ktrace.tracer.thread_access import ThreadAccess


@dataclass
class NotifyTracee(ThreadAccess):
    syscall: str
    args: tuple[int, int, int, int, int, int]
    can_rewrite: bool = False

    def arg(self, index: int) -> int:
        return self.args[index]

    def stable_copy(self, data: bytes) -> int | None:
        raise OSError(errno.EOPNOTSUPP, "no memory of ktrace's in the program under the notify backend")
