"""linux.duplicate_fd against a real process, on both of its paths: a thread id used directly
(PIDFD_THREAD, Linux 6.9+) and, on older kernels, the thread group looked up from the tracer's
cache instead of /proc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator

import pytest
from e2e_helpers import read_line

from ktrace.tracer import linux
from ktrace.tracer.threads import ThreadGroups

pytestmark = pytest.mark.timeout(30)

# A process whose second thread prints its id, then waits (on stdin, the descriptor duplicated).
TWO_THREADS = r"""
import sys, threading
def second():
    print(threading.get_native_id(), flush=True)
    sys.stdin.read()
t = threading.Thread(target=second)
t.start()
t.join()
"""


@pytest.fixture
def second_thread() -> Iterator[tuple[int, int]]:
    """(process id, id of its second thread)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TWO_THREADS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc.pid, int(read_line(proc, timeout=20))
    finally:
        proc.kill()
        proc.communicate(timeout=20)


@pytest.fixture
def proc_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The threads whose group is read from /proc (linux.thread_group_of, which it still does)."""
    reads: list[int] = []
    real = linux.thread_group_of

    def counted(tid: int) -> int:
        reads.append(tid)
        return real(tid)

    monkeypatch.setattr(linux, "thread_group_of", counted)
    return reads


def _is_its_stdin(dup: int, pid: int) -> bool:
    try:
        return os.fstat(dup).st_ino == os.stat(f"/proc/{pid}/fd/0").st_ino
    finally:
        os.close(dup)


def test_before_6_9_the_thread_group_comes_from_the_cache(
    second_thread: tuple[int, int], proc_reads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    pid, tid = second_thread
    # pidfd_open() refuses flags it does not know with EINVAL, as kernels before 6.9 refuse PIDFD_THREAD.
    monkeypatch.setattr(linux, "PIDFD_THREAD", 1)
    groups = ThreadGroups()
    assert _is_its_stdin(linux.duplicate_fd(tid, 0, groups.of), pid)
    assert _is_its_stdin(linux.duplicate_fd(tid, 0, groups.of), pid)
    assert proc_reads == [tid]  # once, for both


def _kernel_at_least(major: int, minor: int) -> bool:
    release = platform.release().split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


@pytest.mark.skipif(not _kernel_at_least(6, 9), reason="PIDFD_THREAD needs Linux 6.9")
def test_from_6_9_a_thread_id_needs_no_lookup(second_thread: tuple[int, int], proc_reads: list[int]) -> None:
    pid, tid = second_thread
    assert _is_its_stdin(linux.duplicate_fd(tid, 0, ThreadGroups().of), pid)
    assert proc_reads == []
