"""The program's view of resolver files: /etc/resolv.conf is the agent's.

open/openat/openat2 stop under the filter; when the path names a file ktrace
serves (after resolving a relative path against the directory descriptor or
the working directory), the path argument is pointed at ktrace's copy, written
in a private directory. The program gets a real file descriptor to a real file
with the cluster's content, so every resolver (glibc, musl, Go) reads it the
way it always does.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from ktrace.tracer.linux import AT_FDCWD
from ktrace.tracer.tracee import Complete, InstallFd, NeedScratch, Outcome, Resume, Rewrite, Tracee, TraceeGone

# Where the path is among each open call's arguments.
PATH_ARGUMENT = {"open": 0, "openat": 1, "openat2": 1}


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
    opened: list[bytes] = field(default_factory=list)  # served paths the program opened, for reports

    def on_open(self, t: Tracee) -> Outcome:
        index = PATH_ARGUMENT.get(t.syscall)
        if index is None:
            return Resume()
        try:
            path = t.read_string(t.arg(index), limit=4096)
        except TraceeGone:
            raise
        except OSError:
            return Resume()  # EFAULT/ENAMETOOLONG: the kernel says so itself
        # Cheap filter first: only a path ending in a served file's basename can match.
        if not any(path.endswith(os.path.basename(p)) for p in self.served):
            return Resume()
        base = None
        if not path.startswith(b"/"):
            base = t.directory(t.arg(0) if index == 1 else AT_FDCWD)
        full = absolute_path(path, base)
        replacement = self.served.get(full) if full is not None else None
        if replacement is None:
            return Resume()
        if not t.can_rewrite:
            return self._open_here(t, full or b"", replacement)
        try:
            slot = t.stable_copy(replacement + b"\0")
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                return Resume()  # no page could be mapped in this process: it reads this machine's file
            raise
        if slot is None:
            return NeedScratch()
        self.opened.append(full or b"")
        return Rewrite(((index, slot),))

    def _open_here(self, t: Tracee, full: bytes, replacement: bytes) -> Outcome:
        """notify: ktrace opens the served file with the program's flags and gives it the
        descriptor as the call's result."""
        try:
            if t.syscall == "openat2":
                flags = struct.unpack("=Q", t.read(t.arg(2), 8))[0]
            else:
                flags = t.arg(1 if t.syscall == "open" else 2)
        except TraceeGone:
            raise
        except OSError:
            return Complete(-errno.EFAULT)
        try:
            fd = os.open(replacement, flags & 0xFFFFFFFF & ~os.O_CLOEXEC)
        except OSError as exc:
            return Complete(-(exc.errno or errno.EIO))
        self.opened.append(full)
        return InstallFd(fd, bool(flags & os.O_CLOEXEC))
