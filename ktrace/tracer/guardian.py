"""The guardian: under the notify backend, the program's parent, so that it cannot outlive ktrace.

ptrace kills every tracee when the tracer dies (PTRACE_O_EXITKILL). Seccomp notification has
no such thing: a program whose supervisor died only finds its network calls failing with
ENOSYS. So under notify the program is started by a small process of ktrace's, the guardian:

    ktrace ── guardian (PR_SET_CHILD_SUBREAPER) ── program ── its children, grandchildren...

Every process of the program that loses its parent is re-parented to the guardian, so the
guardian sees each exit, and can find them all. It tells ktrace on a pipe how the program
ended and when its last process has exited (what ktrace waits for, as under ptrace). When
ktrace dies, the guardian's end of the control pipe reads EOF, and it kills every process of
the program before exiting itself. ktrace can also ask for that ("kill") at its own end.

Messages on the status pipe (one line each): "exited STATUS" (the program's wait status) and
"done" (no process is left).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

from ktrace.tracer import linux


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (/proc/PID/task/TID/children, depth first)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    children = [int(child) for child in f.read().split()]
            except OSError:
                continue
            found.extend(children)
            pending.extend(children)
    return found


def kill_all() -> None:
    """SIGKILL every descendant of this process until none is left (one that forks meanwhile
    is found at the next pass), reaping them."""
    me = os.getpid()
    while True:
        below = descendants(me)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG | linux.WALL)[0] > 0:
                pass
        except ChildProcessError:
            if not below:
                return
            continue
        if not below:
            # Children whose exit is not collected yet: wait for one.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, linux.WALL)


def serve(program: int, control: int, status: int) -> int:
    """The guardian's loop, in the forked guardian (``program`` already forked as its child).

    Returns its exit status; never raises."""
    # Signals for the program are ktrace's to pass on: the terminal's Ctrl-C reaches this
    # process too (it is in ktrace's process group) and must not end it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    sigchld = linux.signalfd({signal.SIGCHLD})
    told_exit = False

    def say(line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(status, line.encode() + b"\n")

    try:
        while True:
            ready, _, _ = select.select([control, sigchld], [], [])
            if control in ready:
                data = os.read(control, 64)
                if not data or b"k" in data:  # ktrace is gone, or asks for it
                    kill_all()
                    say("done")
                    return 0
            if sigchld in ready:
                linux.read_signals(sigchld)
            while True:
                try:
                    pid, wait_status = os.waitpid(-1, os.WNOHANG | linux.WALL)
                except ChildProcessError:
                    if not told_exit:
                        say("exited 0")
                    say("done")
                    return 0
                if pid == 0:
                    break
                if pid == program:
                    told_exit = True
                    say(f"exited {wait_status}")
    except BaseException:
        kill_all()
        return 1
