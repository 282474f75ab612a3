"""kernel.duplicate_fd keeps one pidfd per thread: real processes, no tracer needed
(pidfd_getfd needs ptrace access, which a parent running as root, or the tests' own
children under the default Yama scope, has)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from ktrace.tracer import kernel

pytestmark = pytest.mark.timeout(30)

# A child holding a UDP socket on descriptor 3 until its stdin closes.
CHILD = (
    "import os, socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "os.dup2(s.fileno(), 3)\n"
    "print(os.fstat(3).st_ino, flush=True)\n"
    "sys.stdin.read()\n"
)


def _child() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=()
    )
    assert proc.stdout is not None
    inode = int(proc.stdout.readline())
    return proc, inode


def _end(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def test_duplicate_fd_reuses_the_threads_pidfd_until_forgotten() -> None:
    proc, inode = _child()
    try:
        for _ in range(3):
            dup = kernel.duplicate_fd(proc.pid, 3)
            with socket.socket(fileno=dup) as sock:
                assert os.fstat(sock.fileno()).st_ino == inode
        pidfd = kernel._pidfds[proc.pid]
        assert os.readlink(f"/proc/self/fd/{pidfd}") == "anon_inode:[pidfd]"
        kernel.forget_thread(proc.pid)
        assert proc.pid not in kernel._pidfds
        with pytest.raises(OSError):
            os.fstat(pidfd)  # closed
    finally:
        _end(proc)
        kernel.forget_thread(proc.pid)


def test_a_cached_pidfd_of_an_exited_thread_reports_it_gone() -> None:
    proc, _inode = _child()
    os.close(kernel.duplicate_fd(proc.pid, 3))
    assert proc.pid in kernel._pidfds
    _end(proc)  # exited and reaped, not forgotten: the cached pidfd is stale
    try:
        with pytest.raises(kernel.TraceeGone):
            kernel.duplicate_fd(proc.pid, 3)
        assert proc.pid not in kernel._pidfds
    finally:
        kernel.forget_thread(proc.pid)


def test_a_bad_descriptor_is_ebadf_and_keeps_the_pidfd() -> None:
    proc, _inode = _child()
    try:
        with pytest.raises(OSError) as caught:
            kernel.duplicate_fd(proc.pid, 999)
        assert caught.value.errno == 9  # EBADF
        assert not isinstance(caught.value, kernel.TraceeGone)
        assert proc.pid in kernel._pidfds
        os.close(kernel.duplicate_fd(proc.pid, 3))
    finally:
        _end(proc)
        kernel.forget_thread(proc.pid)
