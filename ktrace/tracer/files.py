"""The program's view of resolver files: /etc/resolv.conf is the agent's.

open/openat/openat2 stop under the filter; when the path names a file ktrace
serves (after resolving a relative path against the directory descriptor or
the working directory), the path argument is pointed at ktrace's copy, written
in a private directory. The program gets a real file descriptor to a real file
with the cluster's content, so every resolver (glibc, musl, Go) reads it the
way it always does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ktrace.tracer import arch, kernel
from ktrace.tracer.kernel import Registers, TraceeGone
from ktrace.tracer.scratch import ScratchPages
from ktrace.tracer.tracer import Outcome, Resume, Rewrite

SYS = arch.SYSCALLS
AT_FDCWD = -100


def path_argument_index(nr: int) -> int | None:
    if nr == SYS.open:
        return 0
    if nr in (SYS.openat, SYS.openat2):
        return 1
    return None


def absolute_path(path: bytes, base: bytes | None) -> bytes | None:
    """Normalise `path` as the kernel would see it (without following links).

    None if the base directory is unknown (then the path is left alone)."""
    if not path:
        return None
    if not path.startswith(b"/"):
        if base is None:
            return None
        path = base + b"/" + path
    return os.path.normpath(path).replace(b"//", b"/")


@dataclass
class FileViews:
    """Serves files by absolute path: {b'/etc/resolv.conf': b'/tmp/ktrace-x/resolv.conf'}."""

    served: dict[bytes, bytes]
    scratch: ScratchPages = field(default_factory=ScratchPages)
    opened: list[bytes] = field(default_factory=list)  # served paths the program opened, for reports

    def on_open(self, tid: int, regs: Registers) -> Outcome:
        index = path_argument_index(regs.nr)
        if index is None:
            return Resume()
        try:
            path = kernel.read_c_string(tid, regs.arg(index), limit=4096)
        except TraceeGone:
            raise
        except OSError:
            return Resume()  # EFAULT/ENAMETOOLONG: the kernel says so itself
        # Cheap filter first: only a path ending in a served file's basename can match.
        if not any(path.endswith(os.path.basename(p)) for p in self.served):
            return Resume()
        base = None
        if not path.startswith(b"/"):
            dirfd = regs.arg(0) if index == 1 else AT_FDCWD
            base = self._directory(tid, dirfd)
        full = absolute_path(path, base)
        replacement = self.served.get(full) if full is not None else None
        if replacement is None:
            return Resume()
        if self.scratch.unavailable(tid):
            return Resume()
        slot = self.scratch.slot_for(tid, replacement + b"\0")
        if slot is None:
            injected, on_exit = self.scratch.inject_map(tid, regs)
            return Rewrite(injected, on_exit)
        self.opened.append(full or b"")
        regs.set_arg(index, slot)
        return Rewrite(regs)

    @staticmethod
    def _directory(tid: int, dirfd: int) -> bytes | None:
        dirfd = int.from_bytes(dirfd.to_bytes(8, "little")[:4], "little", signed=True)
        link = f"/proc/{tid}/cwd" if dirfd == AT_FDCWD else f"/proc/{tid}/fd/{dirfd}"
        try:
            return os.readlink(link).encode()
        except OSError:
            return None
