"""The target container's files, read-only, for ``WatchFiles``.

What the agent serves is fixed when it starts (``--files`` or ``KTRACE_AGENT_FILES``, a JSON
list of ``{"path", "base", "sub", "follow"}``): ``path`` is the path the program names, ``base``
a directory of the agent's own (a volume it mounts, or ``/proc/1/root``: the target container's
root), ``sub`` where the path is below ``base``. ``sub`` is resolved inside ``base`` the way
the kubelet resolves a ``subPath`` and a chroot would: ``..`` stops at ``base``, an absolute link
starts again at ``base``. From there the tree is read without following any symlink: a link is
sent as its text, so nothing outside a served tree is ever read.

Changes are found by polling (``lstat`` of every entry, every ``interval`` seconds): the trees
are small (ConfigMaps and Secrets hold at most 1 MiB), and the kubelet updates them by renaming
a ``..data`` link, which a poll sees as well as inotify would. A version is sent as it is
read, in chunks, and completed only if a scan after reading agrees with the one before: a tree
caught mid-update is sent again.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from .wire import rpc

log = logging.getLogger("ktrace_agent")

FILES_ENV = "KTRACE_AGENT_FILES"
POLL_INTERVAL = 1.0
MAX_TREE_BYTES = 64 * 1024 * 1024
MAX_TREE_ENTRIES = 10_000
CHUNK_BYTES = 1024 * 1024  # file data per message (gRPC's limit is 4 MiB)
MAX_LINKS = 40
_STABLE_TRIES = 5


class FilesConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServedRoot:
    path: bytes  # as the program names it
    base: bytes  # the agent's directory it lies in
    sub: bytes = b""
    follow: bool = False  # a subPath mount: the mount is the file the link leads to


def parse_served(text: str) -> list[ServedRoot]:
    try:
        items = json.loads(text)
        roots = [
            ServedRoot(
                os.fsencode(item["path"]),
                os.fsencode(item["base"]),
                os.fsencode(item.get("sub") or ""),
                bool(item.get("follow")),
            )
            for item in items
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise FilesConfigError(f"--files: not a JSON list of {{path, base, sub}}: {exc}") from None
    for root in roots:
        if not root.path.startswith(b"/") or not root.base.startswith(b"/"):
            raise FilesConfigError(f"--files: {root.path!r} and {root.base!r} must be absolute")
    return roots


def resolve_in(base: bytes, sub: bytes, *, follow_last: bool) -> bytes:
    """``base/sub`` with every symlink resolved inside ``base`` (the last component only when
    ``follow_last``); raises OSError (ELOOP, ENOENT, ENOTDIR) as the kernel would."""
    parts = [p for p in sub.split(b"/") if p and p != b"."]
    done: list[bytes] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == b"..":
            if done:
                done.pop()
            continue
        candidate = b"/".join([base.rstrip(b"/"), *done, part])
        if not parts and not follow_last:
            done.append(part)
            break
        info = os.lstat(candidate)
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), candidate)
            target = os.readlink(candidate)
            if target.startswith(b"/"):
                done = []
            parts = [p for p in target.split(b"/") if p and p != b"."] + parts
            continue
        if parts and not stat.S_ISDIR(info.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), candidate)
        done.append(part)
    return b"/".join([base.rstrip(b"/"), *done]) if done else base


# (path, kind, mode, mtime_ns, size, inode, link): what a scan compares between versions.
Signature = tuple[tuple[bytes, rpc.FileKind, int, int, int, int, bytes], ...]


def _kind(mode: int) -> rpc.FileKind:
    if stat.S_ISDIR(mode):
        return rpc.FILE_DIRECTORY
    if stat.S_ISREG(mode):
        return rpc.FILE_REGULAR
    if stat.S_ISLNK(mode):
        return rpc.FILE_SYMLINK
    return rpc.FILE_NONE


def scan(top: bytes) -> Signature:
    """Every entry under ``top`` (itself first), without following links; raises OSError."""
    found = []
    total = 0
    pending = [b""]
    while pending:
        rel = pending.pop()
        path = top + b"/" + rel if rel else top
        info = os.lstat(path)
        kind = _kind(info.st_mode)
        if kind == rpc.FILE_NONE:
            continue  # a socket, pipe or device: not mirrored
        link = os.readlink(path) if kind == rpc.FILE_SYMLINK else b""
        found.append((rel, kind, stat.S_IMODE(info.st_mode), info.st_mtime_ns, info.st_size, info.st_ino, link))
        if kind == rpc.FILE_REGULAR:
            total += info.st_size
        if total > MAX_TREE_BYTES or len(found) > MAX_TREE_ENTRIES:
            raise OSError(errno.EFBIG, f"more than {MAX_TREE_ENTRIES} files or {MAX_TREE_BYTES >> 20} MiB")
        if kind == rpc.FILE_DIRECTORY:
            names = sorted(os.listdir(path))
            pending.extend(reversed([rel + b"/" + n if rel else n for n in names]))
    return tuple(found)


class Changed(Exception):
    """The tree changed while it was being sent: its version is abandoned and read again."""


def current(root: ServedRoot) -> tuple[bytes, Signature]:
    """Where the root is now and what it looks like (metadata only: cheap enough for every poll)."""
    top = resolve_in(root.base, root.sub, follow_last=root.follow)
    return top, scan(top)


def version_messages(root: bytes, top: bytes, signature: Signature) -> Iterator[rpc.FileTree]:
    """One version of the tree as messages of at most ~CHUNK_BYTES of file data each, read as they
    are sent (the agent may share a pod's small memory limit: a file is never held whole). The
    last message, empty with ``last`` set, comes only if a scan after reading still matches
    ``signature``; otherwise ``Changed`` is raised and the client drops what it got of it."""
    entries: list[rpc.FileEntry] = []
    room = CHUNK_BYTES
    first = True

    def flush() -> rpc.FileTree:
        nonlocal entries, room, first
        message = rpc.FileTree(root=root, first=first, entries=entries)
        entries, room, first = [], CHUNK_BYTES, False
        return message

    for rel, kind, mode, mtime, size, inode, link in signature:
        if kind != rpc.FILE_REGULAR:
            entries.append(rpc.FileEntry(path=rel, kind=kind, mode=mode, mtime_ns=mtime, size=size, link=link))
            continue
        try:
            fd = os.open(top + b"/" + rel if rel else top, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise Changed from exc  # replaced or removed since the scan
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_ino != inode:
                raise Changed
            offset = 0
            while True:
                part = os.read(fd, max(room, 1))
                entries.append(
                    rpc.FileEntry(path=rel, kind=kind, mode=mode, mtime_ns=mtime, size=size, data=part, offset=offset)
                )
                offset += len(part)
                room -= len(part)
                if room <= 0:
                    yield flush()
                if not part:
                    break
        finally:
            os.close(fd)
    if entries:
        yield flush()
    if scan(top) != signature:
        raise Changed
    yield rpc.FileTree(root=root, first=first, last=True)


def failure_message(root: bytes, exc: OSError) -> rpc.FileTree:
    name = errno.errorcode.get(exc.errno or errno.EIO, "EIO")
    # The reason, never a file's content: strerror, not the exception's text (which may name a path only).
    return rpc.FileTree(
        root=root, first=True, last=True, failure=rpc.Failure(errno_name=name, message=os.strerror(exc.errno or 5))
    )


async def watch(roots: Sequence[ServedRoot], interval: float = POLL_INTERVAL) -> AsyncIterator[rpc.FileTree]:
    """Each root's current version, then each new one, forever (the caller cancels)."""
    last: dict[bytes, Signature | str] = {}
    while True:
        for root in roots:
            try:
                for _ in range(_STABLE_TRIES):
                    top, signature = await asyncio.to_thread(current, root)
                    if signature == last.get(root.path):
                        break
                    messages = version_messages(root.path, top, signature)
                    try:
                        while (message := await asyncio.to_thread(next, messages, None)) is not None:
                            yield message
                    except Changed:
                        continue  # caught mid-update: read it again
                    last[root.path] = signature
                    break
                else:
                    raise OSError(errno.EBUSY, "kept changing while being read")
            except OSError as exc:
                state = errno.errorcode.get(exc.errno or errno.EIO, "EIO")
                if last.get(root.path) != state:
                    last[root.path] = state
                    log.info("cannot serve %s: %s", os.fsdecode(root.path), state)
                    yield failure_message(root.path, exc)
        await asyncio.sleep(interval)


def env_served() -> list[ServedRoot]:
    text = os.environ.get(FILES_ENV)
    return parse_served(text) if text else []
