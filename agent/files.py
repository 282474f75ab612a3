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
a ``..data`` link, which a poll sees as well as inotify would. A version is read until two
consecutive scans agree, so a tree caught mid-update is read again.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from . import rpc

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


def _read(path: bytes, inode: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_ino != inode:
            raise OSError(errno.EAGAIN, "changed while read", path)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Version:
    signature: Signature
    contents: dict[bytes, bytes]


def read_version(root: ServedRoot) -> Version:
    """A consistent version of the root: scanned, read, scanned again until the scans agree."""
    top = resolve_in(root.base, root.sub, follow_last=root.follow)
    for _ in range(_STABLE_TRIES):
        before = scan(top)
        contents: dict[bytes, bytes] = {}
        try:
            for rel, kind, _mode, _mtime, _size, inode, _link in before:
                if kind == rpc.FILE_REGULAR:
                    contents[rel] = _read(top + b"/" + rel if rel else top, inode)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EAGAIN, errno.ELOOP, errno.ENOTDIR):
                continue  # replaced while read: read again
            raise
        if scan(top) == before:
            return Version(before, contents)
        top = resolve_in(root.base, root.sub, follow_last=root.follow)
    raise OSError(errno.EBUSY, "kept changing while being read")


def tree_messages(root: bytes, version: Version) -> list[rpc.FileTree]:
    """A version as FileTree messages of at most ~CHUNK_BYTES of file data each."""
    messages: list[rpc.FileTree] = []
    entries: list[rpc.FileEntry] = []
    room = CHUNK_BYTES

    def flush() -> None:
        nonlocal entries, room
        messages.append(rpc.FileTree(root=root, first=not messages, entries=entries))
        entries, room = [], CHUNK_BYTES

    for rel, kind, mode, mtime, size, _inode, link in version.signature:
        data = version.contents.get(rel, b"")
        offset = 0
        while True:
            part = data[offset : offset + room]
            entries.append(
                rpc.FileEntry(
                    path=rel,
                    kind=kind,
                    mode=mode,
                    mtime_ns=mtime,
                    size=len(data) if kind == rpc.FILE_REGULAR else size,
                    data=part,
                    offset=offset,
                    link=link,
                )
            )
            offset += len(part)
            room -= len(part)
            if room <= 0:
                flush()
            if offset >= len(data):
                break
    if entries or not messages:
        flush()
    messages[-1].last = True
    return messages


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
                version = await asyncio.to_thread(read_version, root)
            except OSError as exc:
                state = errno.errorcode.get(exc.errno or errno.EIO, "EIO")
                if last.get(root.path) != state:
                    last[root.path] = state
                    log.info("cannot serve %s: %s", os.fsdecode(root.path), state)
                    yield failure_message(root.path, exc)
                continue
            if last.get(root.path) != version.signature:
                last[root.path] = version.signature
                for message in tree_messages(root.path, version):
                    yield message
        await asyncio.sleep(interval)


def env_served() -> list[ServedRoot]:
    text = os.environ.get(FILES_ENV)
    return parse_served(text) if text else []
