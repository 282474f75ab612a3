"""Small helpers for the end-to-end tests: deadlines instead of sleeps."""

from __future__ import annotations

import os
import select
import selectors
import subprocess
import sys
import time
from collections.abc import Callable


class Deadline(Exception):
    """A condition a test waited for did not happen in time."""


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of proc's stdout within ``timeout`` seconds (reads the fd directly).

    Only use it before anything else reads proc.stdout (communicate() is fine afterwards:
    this never leaves data in the text wrapper's buffer, it reads byte by byte).
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise Deadline(f"no complete line from {proc.args!r} in {timeout}s (got {line!r})")
            byte = os.read(fd, 1)
            if not byte:
                raise Deadline(f"{proc.args!r} closed stdout (got {line!r}); exit {proc.poll()}")
            line += byte
    return line.decode().rstrip("\n")


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, T, t, Z, ...), None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def blocked_in(pid: int) -> int | None:
    """The number of the syscall thread ``pid`` sleeps in (/proc/<pid>/syscall), None if it is
    running, stopped by a tracer, or gone."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not fields or fields[0] in ("running", "-1"):
        return None
    return int(fields[0]) if proc_state(pid) == "S" else None


# Prefix for a command that must run with a terminal job's signal dispositions (SIGINT and
# SIGQUIT at their default), whatever this test run inherited: a CI job started in the background
# ignores them, and an ignored signal stays ignored across exec (a Python program would not even
# install its handler).
TERMINAL_JOB = [
    sys.executable,
    "-c",
    "import os, signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGQUIT)];"
    " os.execvp(sys.argv[1], sys.argv[1:])",
]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (under the notify backend the program is ktrace's grandchild:
    its guardian is in between)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        out = subprocess.run(["pgrep", "-P", str(current)], capture_output=True, text=True, check=False)
        children = [int(child) for child in out.stdout.split()]
        found.extend(children)
        pending.extend(children)
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (a kernel state that offers no notification) until true or the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise Deadline(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def wait_exited(pid: int, timeout: float) -> None:
    """Wait until ``pid`` (not our child) has exited, with a pidfd: no polling."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            raise Deadline(f"process {pid} still alive after {timeout}s (state {proc_state(pid)})")
    finally:
        os.close(pidfd)


def you_are(reply: str) -> str:
    """The client address the hello server saw, from its reply body."""
    return reply.split("you are ", 1)[1].split(maxsplit=1)[0]
