"""ktrace's temporary directories (the program's resolver view, the ``--agent local`` socket),
and removing those whose ktrace was killed before it could.

A ``kill -9`` of ktrace leaves its directories in the temporary directory. Each one therefore
holds a lock file, ``.owner``, on which its ktrace keeps an exclusive ``flock`` for as long as it
runs: the kernel drops the lock when the process dies, however it dies, so a directory whose lock
can be taken has no owner left. ``sweep`` removes those (the caller's own only), at every
``ktrace run`` start and from ``ktrace cleanup``. A lock younger than ``SETTLE`` seconds is left
alone: its ktrace may be between creating the file and locking it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger("ktrace.private_dirs")

OWNER = ".owner"
PREFIXES = ("ktrace-view-", "ktrace-agent-")
# Before the lock file existed, the --agent local socket lived in ktrace-XXXXXXXX/agent.sock.
OLD_AGENT_PREFIX = "ktrace-"
SETTLE = 60.0


@contextlib.contextmanager
def private_dir(prefix: str, base: str | None = None) -> Iterator[str]:
    """A new directory ``<base>/<prefix><pid>-XXXXXXXX`` (mode 0700), owned by this process until
    the block ends; leftovers of dead ktrace processes are swept first."""
    sweep(base)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)
    fd = os.open(os.path.join(path, OWNER), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(base: str | None = None, now: float | None = None) -> list[str]:
    """Remove this user's ktrace directories in ``base`` (the temporary directory) whose ktrace is
    gone; returns their paths."""
    base = base or tempfile.gettempdir()
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(OLD_AGENT_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            continue
        owned = entry.name.startswith(PREFIXES)
        if _owner_gone(entry.path, now) if owned else _old_agent_dir_gone(entry.path, now):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
            log.debug("removed %s: its ktrace is gone", entry.path)
    return removed


def _owner_gone(path: str, now: float) -> bool:
    try:
        fd = os.open(os.path.join(path, OWNER), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if now - os.fstat(fd).st_mtime < SETTLE:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: its ktrace runs
        return True
    finally:
        os.close(fd)


def _old_agent_dir_gone(path: str, now: float) -> bool:
    """``ktrace-XXXXXXXX/agent.sock`` of a ktrace from before the lock file: gone when nothing
    else is in the directory and nobody accepts on the socket."""
    sock_path = os.path.join(path, "agent.sock")
    try:
        if os.listdir(path) != ["agent.sock"] or now - os.lstat(sock_path).st_mtime < SETTLE:
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        return probe.connect_ex(sock_path) == errno.ECONNREFUSED
    finally:
        probe.close()
