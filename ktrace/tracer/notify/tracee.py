"""`Tracee` for a thread waiting on a seccomp notification: its arguments come with the
notification, its memory and descriptors are reached as under ptrace (process_vm_readv and
writev, pidfd_getfd), and nothing can be rewritten."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from ktrace.tracer import linux
from ktrace.tracer.threads import ThreadGroups


@dataclass
class NotifyTracee:
    tid: int
    syscall: str
    args: tuple[int, int, int, int, int, int]
    threads: ThreadGroups
    can_rewrite: bool = False

    def arg(self, index: int) -> int:
        return self.args[index]

    @property
    def process(self) -> int:
        return self.threads.of(self.tid)

    def read(self, address: int, size: int) -> bytes:
        return linux.read_memory(self.tid, address, size)

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        return linux.read_c_string(self.tid, address, limit)

    def read_int(self, address: int) -> int:
        return linux.read_int(self.tid, address)

    def write(self, parts: Sequence[tuple[int, bytes]]) -> None:
        linux.write_memory_parts(self.tid, parts)

    def duplicate(self, fd: int) -> int:
        return linux.duplicate_fd(self.tid, fd, self.threads.of)

    def inode(self, fd: int) -> int | None:
        return linux.socket_inode(self.tid, fd)

    def directory(self, dirfd: int) -> bytes | None:
        return linux.directory_of(self.tid, dirfd)

    def stable_copy(self, data: bytes) -> int | None:
        raise OSError(errno.EOPNOTSUPP, "no memory of ktrace's in the program under the notify backend")
