"""What both backends reach of a stopped thread besides its syscall's arguments: its memory
(process_vm_readv/writev), its descriptors (pidfd_getfd) and what /proc says of them.

Under ptrace the thread sits in a seccomp stop, under notify it waits for the notification's
answer; either way these calls see the thread's process as it is while the call waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ktrace.tracer import linux
from ktrace.tracer.threads import ThreadGroups


@dataclass
class ThreadMemory:
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
class ThreadAccess(ThreadMemory):
    threads: ThreadGroups

    @property
    def process(self) -> int:
        return self.threads.of(self.tid)

    def duplicate(self, fd: int) -> int:
        return linux.duplicate_fd(self.tid, fd, self.threads.of)

    def inode(self, fd: int) -> int | None:
        return linux.socket_inode(self.tid, fd)

    def directory(self, dirfd: int) -> bytes | None:
        return linux.directory_of(self.tid, dirfd)
