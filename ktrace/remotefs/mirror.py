"""The local copies of the target container's files: a private directory, updated atomically.

One directory per ``ktrace run`` (mode 0700, in ``$XDG_RUNTIME_DIR/ktrace`` when there is one,
a tmpfs that is the user's alone, else ``<tmp>/ktrace-<uid>``), named after ktrace's pid and
the process's start time, so ``ktrace cleanup`` can tell a live session's directory from one a
killed ktrace left (``remove_leftovers``). ``Mirror.close`` removes it.

Each served root is a numbered entry in it. Its first version is written beside it and renamed
into place. Later versions change it in place, as the kubelet's atomic writer changes a volume:
new directories and files first, then the links (a ConfigMap volume's ``..data``, swapped by a
rename), then what is gone; every file and link is replaced by a rename. So an ``open`` after a
token rotation or a ConfigMap edit sees the new content, never a half-written file, a volume's
keys change together as they do in the pod, and the root stays the same directory for a
program's inotify watch. A file the program has open stays readable. Permission bits and times
are the pod's; the owner is whoever runs ktrace.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .pathmap import escaping

log = logging.getLogger("ktrace.files")

PREFIX = "files-"

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


def base_path(env: Mapping[str, str] | None = None) -> str:
    """Where session directories live: ``$XDG_RUNTIME_DIR/ktrace`` when that is a directory of this
    user's (a tmpfs, usually), else ``<tmp>/ktrace-<uid>``."""
    environ = os.environ if env is None else env
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.stat(runtime).st_uid == os.geteuid():
        return os.path.join(runtime, "ktrace")
    return os.path.join(tempfile.gettempdir(), f"ktrace-{os.geteuid()}")


def base_directory(env: Mapping[str, str] | None = None) -> str:
    """``base_path()``, made 0700 if missing and checked to be ours alone."""
    base = base_path(env)
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
    base = base or base_path()
    try:
        names = os.listdir(base)  # none there: nothing to remove (and nothing is made)
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


class Mirror:
    """The session's private directory. ``Mirror.create()``; ``replace(index, entries)`` for each new
    version of a root; ``close()`` at the end (idempotent)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._closed = False
        self._trees: dict[int, dict[bytes, Entry]] = {}  # what is on disk, per root

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
        new = {e.path: e for e in entries}
        for path in new:
            if path.startswith(b"/") or b".." in path.split(b"/"):
                raise ValueError(f"entry path {path!r} leaves its root")
        root = new.get(b"")
        if root is None:
            raise ValueError("a tree without its root entry")
        final = self.local_path(index)
        old = self._trees.pop(index, None)
        if old is not None and old[b""].kind == DIRECTORY == root.kind and os.path.isdir(final):
            _update_tree(final, old, new)
        else:
            self._swap_in(os.fsdecode(final), list(new.values()))
        self._trees[index] = new
        is_dir = root.kind == DIRECTORY
        return {e.path: e.link for e in new.values() if e.kind == SYMLINK and escaping(is_dir, e.path, e.link)}

    def _swap_in(self, final: str, entries: list[Entry]) -> None:
        """The first version, or a root that is a file or a link: written beside and renamed into place."""
        staging = os.path.join(self.directory, f".new-{secrets.token_hex(4)}")
        _write_tree(staging, entries)
        try:
            old = os.lstat(final)
        except FileNotFoundError:
            os.rename(staging, final)
            return
        if stat.S_ISDIR(old.st_mode) or (os.path.isdir(staging) and not os.path.islink(staging)):
            aside = staging + ".old"  # a directory became a file or the reverse: no atomic way; rare
            os.rename(final, aside)
            os.rename(staging, final)
            remove_tree(aside)
        else:
            os.rename(staging, final)

    def remove(self, index: int) -> None:
        """The root is gone in the pod (or cannot be read): so is its copy."""
        self._trees.pop(index, None)
        remove_tree(os.fsdecode(self.local_path(index)))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            remove_tree(self.directory)


def _depth(path: bytes) -> int:
    return path.count(b"/") + 1 if path else 0


def _write_file(where: bytes, entry: Entry) -> None:
    """A regular file written under a temporary name beside ``where`` and renamed over it: a reader
    opens the old file or the new one, whole."""
    temporary = os.path.join(os.path.dirname(where), b".ktrace-" + secrets.token_hex(6).encode())
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(entry.data)
        while view:
            view = view[os.write(fd, view) :]
        # The pod's bits, readable by the owner (ktrace's user), whoever could read it there.
        os.fchmod(fd, stat.S_IMODE(entry.mode) | 0o400)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
    finally:
        os.close(fd)
    os.rename(temporary, where)


def _write_link(where: bytes, entry: Entry) -> None:
    temporary = os.path.join(os.path.dirname(where), b".ktrace-" + secrets.token_hex(6).encode())
    os.symlink(entry.link, temporary)
    with contextlib.suppress(OSError):  # not every filesystem keeps a link's time
        os.utime(temporary, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
    os.rename(temporary, where)


def _update_tree(top: bytes, old: dict[bytes, Entry], new: dict[bytes, Entry]) -> None:
    """Change the tree on disk from ``old`` to ``new`` in place, in the order the kubelet's atomic
    writer uses: new directories and files first, then links (a ConfigMap volume's ``..data`` swap,
    by rename), then what is gone. Each file and link is replaced by a rename, so a reader sees
    the old one or the new one; a ConfigMap's keys, read through ``..data``, change all at once.
    The root directory stays the same inode: a program's inotify watch on it sees the changes as
    it would in the pod."""

    def at(path: bytes) -> bytes:
        return top + b"/" + path if path else top

    for path, entry in old.items():  # read-only directories of the pod's would refuse the changes
        if entry.kind == DIRECTORY and os.path.isdir(at(path)):
            os.chmod(at(path), 0o700)
    for path in sorted(new):
        entry, before = new[path], old.get(path)
        if entry.kind == SYMLINK or entry == before:
            continue
        if before is not None and (before.kind == DIRECTORY) != (entry.kind == DIRECTORY):
            remove_tree(os.fsdecode(at(path)))
            before = None
        if entry.kind == DIRECTORY:
            if before is None:
                os.mkdir(at(path), 0o700)
        elif entry.kind == REGULAR:
            _write_file(at(path), entry)
    for path in sorted(new):
        entry, before = new[path], old.get(path)
        if entry.kind != SYMLINK or (before is not None and before.kind == SYMLINK and before.link == entry.link):
            continue
        if before is not None and before.kind == DIRECTORY:
            remove_tree(os.fsdecode(at(path)))
        _write_link(at(path), entry)
    for path in sorted((p for p in old if p not in new), key=_depth, reverse=True):
        remove_tree(os.fsdecode(at(path)))
    for path in sorted((p for p in new if new[p].kind == DIRECTORY), key=_depth, reverse=True):
        os.utime(at(path), ns=(new[path].mtime_ns, new[path].mtime_ns))
        os.chmod(at(path), stat.S_IMODE(new[path].mode) | 0o500)


def _write_tree(staging: str, entries: list[Entry]) -> None:
    """Write a new tree under ``staging`` (parents first), directory permissions and times last."""
    staged = os.fsencode(staging)
    directories: list[tuple[bytes, Entry]] = []
    for entry in sorted(entries, key=lambda e: e.path):
        where = staged + b"/" + entry.path if entry.path else staged
        if entry.kind == DIRECTORY:
            os.mkdir(where, 0o700)
            directories.append((where, entry))
        elif entry.kind == SYMLINK:
            _write_link(where, entry)
        elif entry.kind == REGULAR:
            _write_file(where, entry)
    # Deepest first: a directory's time changes while files are written into it, and a read-only
    # one would refuse them.
    for where, entry in sorted(directories, key=lambda d: d[0].count(b"/"), reverse=True):
        os.utime(where, ns=(entry.mtime_ns, entry.mtime_ns))
        os.chmod(where, stat.S_IMODE(entry.mode) | 0o500)
