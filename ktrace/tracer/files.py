"""The program's view of files: the agent's resolver files, and with --target the target
container's volumes at their own paths.

Resolver view: open/openat/openat2 of /etc/resolv.conf (and /etc/hosts with --hosts cluster)
opens ktrace's copy of the agent's, written in a private directory. Every resolver (glibc,
musl, Go) reads it the way it always does.

Target files (`on_path`, only when the target's volumes are served: the filter then stops
every path-taking call, `syscalls.TABLE` feature "files"): a call naming a path under one of
the target's mounts works on ktrace's mirror of it (ktrace/remotefs), read-only: open, the
stat family, access, readlink see the pod's content; a call that would write fails with
EROFS. The mapping itself (`ports.PathLookup`) is the remotefs path map's.

How a path is given to the kernel instead:
- ptrace: the path argument points at a copy (`Tracee.stable_copy`) of the local path;
- notify: ktrace makes the call itself on the local path, and hands the program the result
  (a descriptor installed as the open()'s result; the stat buffer, the link's text written
  where the kernel would have).
"""

from __future__ import annotations

import errno
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ktrace.tracer import linux
from ktrace.tracer.linux import AT_FDCWD
from ktrace.tracer.ports import PathLookup
from ktrace.tracer.tracee import Complete, InstallFd, NeedScratch, Outcome, Resume, Rewrite, Tracee, TraceeGone

# Where the path is among each open call's arguments.
PATH_ARGUMENT = {"open": 0, "openat": 1, "openat2": 1}
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_TMPFILE", 0)


@dataclass(frozen=True)
class PathCall:
    """A path-taking syscall: what it does with its paths and where they are among its arguments."""

    kind: str  # "open", "stat", "statx", "access", "readlink" or "write"
    paths: tuple[tuple[int | None, int], ...]  # (directory descriptor argument or None, path argument)
    # Whether it acts on a final symlink itself rather than what it points to.
    nofollow: Callable[[Tracee], bool] = lambda t: False


def _flag(index: int, bit: int) -> Callable[[Tracee], bool]:
    return lambda t: bool(t.arg(index) & bit)


PATH_CALLS: dict[str, PathCall] = {
    "open": PathCall("open", ((None, 0),), _flag(1, os.O_NOFOLLOW)),
    "openat": PathCall("open", ((0, 1),), _flag(2, os.O_NOFOLLOW)),
    "openat2": PathCall("open", ((0, 1),)),
    "stat": PathCall("stat", ((None, 0),)),
    "lstat": PathCall("stat", ((None, 0),), lambda t: True),
    "newfstatat": PathCall("stat", ((0, 1),), _flag(3, AT_SYMLINK_NOFOLLOW)),
    "statx": PathCall("statx", ((0, 1),), _flag(2, AT_SYMLINK_NOFOLLOW)),
    "access": PathCall("access", ((None, 0),)),
    "faccessat": PathCall("access", ((0, 1),)),
    "faccessat2": PathCall("access", ((0, 1),), _flag(3, AT_SYMLINK_NOFOLLOW)),
    "readlink": PathCall("readlink", ((None, 0),), lambda t: True),
    "readlinkat": PathCall("readlink", ((0, 1),), lambda t: True),
    **{name: PathCall("write", ((None, 0),)) for name in ("creat", "truncate", "mkdir", "rmdir", "unlink", "chmod")},
    **{name: PathCall("write", ((None, 0),)) for name in ("chown", "mknod", "utime", "utimes")},
    "lchown": PathCall("write", ((None, 0),), lambda t: True),
    **{name: PathCall("write", ((0, 1),)) for name in ("mkdirat", "unlinkat", "fchmodat", "fchmodat2", "mknodat")},
    "fchownat": PathCall("write", ((0, 1),)),
    "utimensat": PathCall("write", ((0, 1),)),
    "rename": PathCall("write", ((None, 0), (None, 1))),
    "renameat": PathCall("write", ((0, 1), (2, 3))),
    "renameat2": PathCall("write", ((0, 1), (2, 3))),
    "link": PathCall("write", ((None, 0), (None, 1))),
    "linkat": PathCall("write", ((0, 1), (2, 3))),
    "symlink": PathCall("write", ((None, 1),)),  # its first argument is the link's text, not a path
    "symlinkat": PathCall("write", ((1, 2),)),
}


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
    """``served``: the resolver view by absolute path ({b'/etc/resolv.conf': b'/tmp/.../resolv.conf'});
    ``target``: the target's files, when served."""

    served: dict[bytes, bytes]
    target: PathLookup | None = None
    # How often the program was served each path: bounded by the served paths (it was a list
    # with an entry per open, forever: every glibc lookup opens resolv.conf and hosts).
    opened: Counter[bytes] = field(default_factory=Counter)

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
            return self.on_path(t) if self.target is not None else Resume()
        base = None
        if not path.startswith(b"/"):
            base = t.directory(t.arg(0) if index == 1 else AT_FDCWD)
        full = absolute_path(path, base)
        replacement = self.served.get(full) if full is not None else None
        if replacement is None:
            return self.on_path(t) if self.target is not None else Resume()
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
        self.opened[full or b""] += 1
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
        self.opened[full] += 1
        return InstallFd(fd, bool(flags & os.O_CLOEXEC))

    # -- the target's files ------------------------------------------------------------

    def on_path(self, t: Tracee) -> Outcome:
        call = PATH_CALLS.get(t.syscall)
        if call is None or self.target is None:
            return Resume()
        write = call.kind == "write" or (call.kind == "open" and self._open_flags(t) & _WRITE_FLAGS != 0)
        nofollow = call.nofollow(t)
        local: bytes | None = None
        for dirfd_arg, path_arg in call.paths:
            try:
                path = t.read_string(t.arg(path_arg), limit=4096)
            except TraceeGone:
                raise
            except OSError:
                return Resume()  # the kernel says EFAULT or ENAMETOOLONG itself
            if not path:
                continue  # AT_EMPTY_PATH and the like: the call is about a descriptor
            base = None
            if not path.startswith(b"/"):
                base = t.directory(t.arg(dirfd_arg) if dirfd_arg is not None else AT_FDCWD)
            full = absolute_path(path, base)
            if full is None:
                continue
            found = self.target(full, write, not nofollow)
            if isinstance(found, int):
                return Complete(-found)  # EROFS for a write, ELOOP...
            if found is not None:
                if call.kind == "write":
                    return Complete(-errno.EROFS)
                local = found
                self.opened[full] += 1
        if local is None:
            return Resume()
        path_arg = call.paths[0][1]
        if t.can_rewrite:
            slot = t.stable_copy(local + b"\0")
            if slot is None:
                return NeedScratch()
            return Rewrite(((path_arg, slot),))
        return self._perform(t, call, local, nofollow)

    @staticmethod
    def _open_flags(t: Tracee) -> int:
        try:
            if t.syscall == "openat2":
                return int(struct.unpack("=Q", t.read(t.arg(2), 8))[0])
            return t.arg(PATH_ARGUMENT[t.syscall] + 1)
        except (OSError, KeyError):
            return 0

    def _perform(self, t: Tracee, call: PathCall, local: bytes, nofollow: bool) -> Outcome:
        """notify: the call on the local path, made by ktrace, its result handed to the program."""
        if call.kind == "open":
            flags = self._open_flags(t)
            mode = t.arg(PATH_ARGUMENT[t.syscall] + 2) if t.syscall != "openat2" else 0
            try:
                fd = os.open(local, flags & 0xFFFFFFFF & ~os.O_CLOEXEC, mode & 0o7777)
            except OSError as exc:
                return Complete(-(exc.errno or errno.EIO))
            return InstallFd(fd, bool(flags & os.O_CLOEXEC))
        if call.kind in ("stat", "statx"):
            if call.kind == "statx":
                flags, mask, buf = t.arg(2), t.arg(3), t.arg(4)
                result, data = linux.statx(local, flags & 0xFFFFFFFF, mask & 0xFFFFFFFF)
            else:
                buf = t.arg(1) if t.syscall in ("stat", "lstat") else t.arg(2)
                result, data = linux.fstatat(local, AT_SYMLINK_NOFOLLOW if nofollow else 0)
            if result < 0:
                return Complete(result)
            try:
                t.write(((buf, data),))
            except OSError:
                return Complete(-errno.EFAULT)
            return Complete(0)
        if call.kind == "access":
            mode = t.arg(1) if t.syscall == "access" else t.arg(2)
            flags = t.arg(3) if t.syscall == "faccessat2" else 0
            return Complete(linux.faccessat(local, mode & 0xFFFFFFFF, flags & 0xFFFFFFFF & ~AT_EMPTY_PATH))
        # readlink
        buf, size = (t.arg(1), t.arg(2)) if t.syscall == "readlink" else (t.arg(2), t.arg(3))
        if size <= 0 or size > 0x7FFFFFFF:
            return Complete(-errno.EINVAL)
        try:
            text = os.readlink(local)
        except OSError as exc:
            return Complete(-(exc.errno or errno.EIO))
        data = text[:size]
        try:
            t.write(((buf, data),))
        except OSError:
            return Complete(-errno.EFAULT)
        return Complete(len(data))
