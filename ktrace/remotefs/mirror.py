"""The local copies of the target container's files: a private directory, updated atomically.

One directory per ``ktrace run`` (mode 0700, in ``$XDG_RUNTIME_DIR/ktrace`` when there is one,
a tmpfs that is the user's alone, else ``<tmp>/ktrace-<uid>``), named after ktrace's pid and
the process's start time, so ``ktrace cleanup`` can tell a live session's directory from one a
killed ktrace left (``remove_leftovers``). ``Mirror.close`` removes it.

Each served root is a numbered entry in it. A new version of a root is written beside it and
swapped in with one ``renameat2(RENAME_EXCHANGE)`` (a plain ``rename`` for a file or a link), so
an ``open`` sees the whole old tree or the whole new one, never a mix; the old one is deleted
after the swap (a file the program has open stays readable). Permission bits and times are the
pod's; the owner is whoever runs ktrace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from .pathmap import escaping

log = logging.getLogger("ktrace.files")

PREFIX = "files-"
AT_FDCWD = -100
RENAME_EXCHANGE = 2
SYS_RENAMEAT2_X86_64 = 316

DIRECTORY, REGULAR, SYMLINK = "directory", "regular", "symlink"


class MirrorError(OSError):
    """The private directory cannot be made safely."""


@dataclass(frozen=True)
class Entry:
    """One file of a served tree; ``path`` relative to the root (b"" is the root itself)."""

    path: bytes
    kind: str  # DIRECTORY, REGULAR or SYMLINK
    mode: int = 0o644
    mtime_ns: int = 0
    data: bytes = b""
    link: bytes = b""


def base_directory(env: dict[str, str] | None = None) -> str:
    """Where session directories live; made 0700 and checked to be ours alone."""
    environ = os.environ if env is None else env
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.stat(runtime).st_uid == os.geteuid():
        base = os.path.join(runtime, "ktrace")
    else:
        base = os.path.join(tempfile.gettempdir(), f"ktrace-{os.geteuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise MirrorError(
            errno.EPERM, f"{base} must be a directory of user {os.geteuid()} with mode 0700 (it holds secrets)"
        )
    return base


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return int(fields[19])


def _make_writable(path: str) -> None:
    """Directories copied from the pod may be read-only: open them up so they can be deleted."""
    for directory, dirnames, _files in os.walk(path):
        for name in [directory, *(os.path.join(directory, d) for d in dirnames)]:
            with contextlib.suppress(OSError):
                if not os.path.islink(name):
                    os.chmod(name, 0o700)


def remove_tree(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    _make_writable(path)
    shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(base: str | None = None) -> list[str]:
    """Delete the session directories of ktrace processes that are gone (killed with SIGKILL)."""
    try:
        base = base or base_directory()
        names = os.listdir(base)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        if not name.startswith(PREFIX):
            continue
        try:
            pid, started = (int(x) for x in name[len(PREFIX) :].split("-")[:2])
        except ValueError:
            continue
        if start_time(pid) == started:
            continue  # that ktrace still runs
        remove_tree(os.path.join(base, name))
        removed.append(os.path.join(base, name))
    return removed


@functools.cache
def _renameat2() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    function: Any = getattr(libc, "renameat2", None)
    if function is not None:
        return cast("Callable[..., int]", function)

    def raw(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> int:  # glibc < 2.28
        return int(libc.syscall(SYS_RENAMEAT2_X86_64, olddirfd, old, newdirfd, new, flags))

    return raw


def exchange(a: str, b: str) -> None:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``, Linux >= 3.15)."""
    if _renameat2()(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a)


class Mirror:
    """The session's private directory. ``Mirror.create()``; ``replace(index, entries)`` for each new
    version of a root; ``close()`` at the end (idempotent)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._closed = False

    @classmethod
    def create(cls, base: str | None = None) -> Mirror:
        base = base or base_directory()
        started = start_time(os.getpid())
        path = os.path.join(base, f"{PREFIX}{os.getpid()}-{started}-{secrets.token_hex(4)}")
        os.mkdir(path, 0o700)
        return cls(path)

    def local_path(self, index: int) -> bytes:
        return os.fsencode(os.path.join(self.directory, str(index)))

    def replace(self, index: int, entries: Iterable[Entry]) -> dict[bytes, bytes]:
        """Make ``entries`` the root's content; returns the links ``PathMap`` must resolve itself."""
        final = os.fsdecode(self.local_path(index))
        staging = os.path.join(self.directory, f".new-{index}-{secrets.token_hex(4)}")
        escaping_links = _write_tree(staging, list(entries))
        try:
            old = os.lstat(final)
        except FileNotFoundError:
            os.rename(staging, final)
            return escaping_links
        new_is_dir = os.path.isdir(staging) and not os.path.islink(staging)
        if stat.S_ISDIR(old.st_mode) and new_is_dir:
            exchange(staging, final)
            remove_tree(staging)  # the old version, now under the staging name
        elif not stat.S_ISDIR(old.st_mode) and not new_is_dir:
            os.rename(staging, final)
        else:  # a directory became a file or the reverse: no atomic way, and it hardly happens
            aside = staging + ".old"
            os.rename(final, aside)
            os.rename(staging, final)
            remove_tree(aside)
        return escaping_links

    def remove(self, index: int) -> None:
        """The root is gone in the pod (or cannot be read): so is its copy."""
        remove_tree(os.fsdecode(self.local_path(index)))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            remove_tree(self.directory)


def _write_tree(staging: str, entries: list[Entry]) -> dict[bytes, bytes]:
    """Write a tree under ``staging`` (the root's entry first), permissions and times last."""
    root = next((e for e in entries if e.path == b""), None)
    if root is None:
        raise ValueError("a tree without its root entry")
    root_is_dir = root.kind == DIRECTORY
    staged = os.fsencode(staging)
    links: dict[bytes, bytes] = {}
    directories: list[tuple[bytes, Entry]] = []
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.path.startswith(b"/") or b".." in entry.path.split(b"/"):
            raise ValueError(f"entry path {entry.path!r} leaves its root")
        where = staged + b"/" + entry.path if entry.path else staged
        if entry.kind == DIRECTORY:
            os.mkdir(where, 0o700)
            directories.append((where, entry))
        elif entry.kind == SYMLINK:
            os.symlink(entry.link, where)
            if escaping(root_is_dir, entry.path, entry.link):
                links[entry.path] = entry.link
            with contextlib.suppress(OSError):  # not every filesystem keeps a link's time
                os.utime(where, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        elif entry.kind == REGULAR:
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(entry.data)
                while view:
                    view = view[os.write(fd, view) :]
                # The pod's bits, readable by the owner (ktrace's user), whoever could read it there.
                os.fchmod(fd, stat.S_IMODE(entry.mode) | 0o400)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
    # Deepest first: a directory's time changes while files are written into it, and a read-only
    # one would refuse them.
    for where, entry in sorted(directories, key=lambda d: d[0].count(b"/"), reverse=True):
        os.utime(where, ns=(entry.mtime_ns, entry.mtime_ns))
        os.chmod(where, stat.S_IMODE(entry.mode) | 0o500)
    return links
