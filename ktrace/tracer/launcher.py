"""Start the program: fork, wait to be seized, install the filter, exec.

The fork happens before ktrace starts any gRPC thread (forking a process that
runs gRPC's threads is unsafe), and the child does as little as possible in
Python between fork and exec.

Sequence:
    parent                          child
    fork ─────────────────────────▶ block on the go-pipe
    (connects to the agent)
    PTRACE_SEIZE(child)
    write "g" to the go-pipe ─────▶ NO_NEW_PRIVS, seccomp filter, execvpe
    read the error pipe ◀────────── (CLOEXEC: EOF on success, errno on failure)
If ktrace dies before the go byte, the child reads EOF and exits without ever
running the program untraced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ktrace.tracer import linux
from ktrace.tracer.guardian import serve as guardian_loop

EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
_CHILD_ABORT = 125


class LaunchError(Exception):
    """The program could not be started; `exit_code` is what a shell would return."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class PendingChild:
    pid: int  # the program
    go_fd: int  # ktrace -> program: "g" (install the filter, exec), under notify then "x" (exec)
    error_fd: int  # program -> ktrace: an errno if it could not start (EOF once it exec'd)
    # notify only: the guardian (the program's parent), its pipes, and the program's report of
    # its listener descriptor's number.
    guardian: int | None = None
    status_fd: int = -1  # guardian -> ktrace: "exited STATUS", "done"
    control_fd: int = -1  # ktrace -> guardian: EOF or "k" ends every process of the program
    notes_fd: int = -1  # program -> ktrace: its listener's descriptor number
    listener: int = -1  # ktrace's copy of the seccomp listener, once released


def resolve(command: str, env: Mapping[str, str]) -> str:
    """Find the program like a shell would, with the shell's exit codes."""
    if "/" in command:
        path = command
    else:
        found = shutil.which(command, path=env.get("PATH", os.defpath))
        if found is None:
            raise LaunchError(f"{command}: command not found", EXIT_NOT_FOUND)
        path = found
    if not os.path.exists(path):
        raise LaunchError(f"{command}: no such file or directory", EXIT_NOT_FOUND)
    # As execve() decides, with the effective ids and capabilities (faccessat's AT_EACCESS);
    # plain access() uses the real ids and, for a non-root user, drops every capability.
    if os.path.isdir(path) or not os.access(path, os.X_OK, effective_ids=True):
        raise LaunchError(f"{command}: permission denied (not an executable file)", EXIT_CANNOT_EXECUTE)
    return path


def fork_child(
    path: str, argv: Sequence[str], env: Mapping[str, str], filter_program: bytes, *, notify: bool = False
) -> PendingChild:
    """Fork the program, waiting to be released; under ``notify``, with a guardian as its parent
    (guardian.py) and a seccomp listener instead of a tracer."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    env_bytes = {k.encode(): v.encode() for k, v in env.items()}
    if not notify:
        pid = os.fork()
        if pid == 0:
            _program(path, argv, env_bytes, filter_program, go_r, go_w, err_r, err_w, -1, -1)
        os.close(go_r)
        os.close(err_w)
        return PendingChild(pid, go_w, err_r)
    notes_r, notes_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    control_r, control_w = os.pipe2(os.O_CLOEXEC)
    guardian = os.fork()
    if guardian == 0:  # the guardian: never return from this branch
        code = 1
        try:
            for fd in (status_r, control_w):
                os.close(fd)
            linux.become_subreaper()
            pid = os.fork()
            if pid == 0:
                os.close(status_w)
                os.close(control_r)
                _program(path, argv, env_bytes, filter_program, go_r, go_w, err_r, err_w, notes_r, notes_w)
            for fd in (go_r, go_w, err_r, err_w, notes_r, notes_w):
                os.close(fd)
            os.write(status_w, f"program {pid}\n".encode())
            code = guardian_loop(pid, control_r, status_w)
        finally:
            os._exit(code)
    for fd in (go_r, err_w, notes_w, status_w, control_r):
        os.close(fd)
    line = _read_line(status_r)
    if not line.startswith(b"program "):
        raise LaunchError("the program's guardian did not start", EXIT_CANNOT_EXECUTE)
    return PendingChild(int(line.split()[1]), go_w, err_r, guardian, status_r, control_w, notes_r)


def _program(
    path: str,
    argv: Sequence[str],
    env: Mapping[bytes, bytes],
    filter_program: bytes,
    go_r: int,
    go_w: int,
    err_r: int,
    err_w: int,
    notes_r: int,
    notes_w: int,
) -> None:
    """The forked program, until exec; never returns."""
    try:
        os.close(go_w)
        os.close(err_r)
        if notes_r >= 0:
            os.close(notes_r)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # Python ignores these at start-up and ignored dispositions survive
        # exec: restore what the program would get from a shell.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if os.read(go_r, 1) != b"g":
            os._exit(_CHILD_ABORT)
        linux.prepare_child_for_filter()
        if notes_w < 0:
            linux.install_seccomp(filter_program)
        else:
            # The listener is close-on-exec: the program never holds it. ktrace takes a copy
            # (pidfd_getfd) before saying "x"; read and write are not in the filter.
            listener = linux.install_seccomp(filter_program, listener=True)
            os.write(notes_w, struct.pack("=i", listener))
            if os.read(go_r, 1) != b"x":
                os._exit(_CHILD_ABORT)
        os.close(go_r)
        os.execve(path, list(argv), env)
    except OSError as exc:
        os.write(err_w, struct.pack("=i", exc.errno or errno.EIO))
    except BaseException:
        os.write(err_w, struct.pack("=i", errno.EIO))
    os._exit(_CHILD_ABORT)


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


def release(child: PendingChild, command: str) -> None:
    """Let the child exec (seized already under ptrace; under notify, once ktrace holds its
    listener); raise LaunchError if it could not start."""
    os.write(child.go_fd, b"g")
    if child.guardian is not None:
        data = _read_exactly(child.notes_fd, 4)
        os.close(child.notes_fd)
        child.notes_fd = -1
        if len(data) == 4:
            (number,) = struct.unpack("=i", data)
            child.listener = linux.duplicate_fd(child.pid, number, lambda tid: tid)
            os.write(child.go_fd, b"x")
    os.close(child.go_fd)
    data = _read_exactly(child.error_fd, 4)
    os.close(child.error_fd)
    if len(data) < 4:
        return
    (err,) = struct.unpack("=i", data)
    reap(child)
    if err == errno.ENOENT:
        raise LaunchError(f"{command}: no such file or directory", EXIT_NOT_FOUND)
    if err in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
        raise LaunchError(f"{command}: cannot execute: {os.strerror(err)}", EXIT_CANNOT_EXECUTE)
    raise LaunchError(f"{command}: cannot start: {os.strerror(err)}", EXIT_CANNOT_EXECUTE)


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def abort(child: PendingChild) -> None:
    """Make a not-yet-released child exit without running the program."""
    os.close(child.go_fd)
    os.close(child.error_fd)
    if child.notes_fd >= 0:
        os.close(child.notes_fd)
    reap(child)


def reap(child: PendingChild) -> None:
    """Kill what is left of the program and collect it (under notify, through its guardian)."""
    if child.guardian is None:
        _kill_and_wait(child.pid)
        return
    if child.control_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(child.control_fd, b"k")
        os.close(child.control_fd)
        child.control_fd = -1
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.guardian, 0)
    for fd in (child.status_fd, child.listener):
        if fd >= 0:
            os.close(fd)
    child.status_fd = child.listener = -1


def _kill_and_wait(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, linux.WALL)
