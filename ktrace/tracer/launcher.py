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
    pid: int
    go_fd: int
    error_fd: int


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


def fork_child(path: str, argv: Sequence[str], env: Mapping[str, str], filter_program: bytes) -> PendingChild:
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    env_bytes = {k.encode(): v.encode() for k, v in env.items()}
    pid = os.fork()
    if pid == 0:  # child: never return from this branch
        try:
            os.close(go_w)
            os.close(err_r)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            # Python ignores these at start-up and ignored dispositions survive
            # exec: restore what the program would get from a shell.
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            if os.read(go_r, 1) != b"g":
                os._exit(_CHILD_ABORT)
            os.close(go_r)
            linux.prepare_child_for_filter()
            linux.install_seccomp(filter_program)
            os.execve(path, list(argv), env_bytes)
        except OSError as exc:
            os.write(err_w, struct.pack("=i", exc.errno or errno.EIO))
        except BaseException:
            os.write(err_w, struct.pack("=i", errno.EIO))
        os._exit(_CHILD_ABORT)
    os.close(go_r)
    os.close(err_w)
    return PendingChild(pid, go_w, err_r)


def release(child: PendingChild, command: str) -> None:
    """Let the seized child exec; raise LaunchError if the exec failed."""
    os.write(child.go_fd, b"g")
    os.close(child.go_fd)
    data = b""
    while len(data) < 4:
        chunk = os.read(child.error_fd, 4 - len(data))
        if not chunk:
            break
        data += chunk
    os.close(child.error_fd)
    if len(data) < 4:
        return
    (err,) = struct.unpack("=i", data)
    reap(child.pid)
    if err == errno.ENOENT:
        raise LaunchError(f"{command}: no such file or directory", EXIT_NOT_FOUND)
    if err in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
        raise LaunchError(f"{command}: cannot execute: {os.strerror(err)}", EXIT_CANNOT_EXECUTE)
    raise LaunchError(f"{command}: cannot start: {os.strerror(err)}", EXIT_CANNOT_EXECUTE)


def abort(child: PendingChild) -> None:
    """Make a not-yet-released child exit without running the program."""
    os.close(child.go_fd)
    os.close(child.error_fd)
    reap(child.pid)


def reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, linux.WALL)
