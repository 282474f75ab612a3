"""What a syscall handler sees of the stopped program, and what it may answer.

A handler gets a `Tracee`: the syscall (its name in `syscalls.TABLE` and its six
arguments), the program's memory, its descriptors, and a few facts about the
thread. It answers with an `Outcome`. It never sees ptrace, seccomp notification,
registers or the agent: the backends (`ptrace/`, `notify/`) implement `Tracee`
and carry outcomes out, and the tunnel is reached through `ports.Tunnel`.

Backends differ in what they can do, and handlers ask rather than assume:
- `can_rewrite` (ptrace): the syscall can run with other arguments (`Rewrite`) and
  its result can be seen and changed at its exit (`WatchExit`). Under seccomp user
  notification neither exists: the call either runs exactly as the program issued
  it (`Resume`) or ktrace performs it and says what it returned (`Complete`).
- `stable_copy` (ptrace): bytes placed in memory of the program's that it does not
  know about, so an argument can point there instead of at the program's own
  buffer, which another thread could change between ktrace's read and the kernel's.
- `install_fd` (notify): put a descriptor of ktrace's into the program as the
  result of the syscall (what `open()` of a served file returns there).

Memory reads raise `OSError` (EFAULT for unmapped memory) or `TraceeGone` when the
thread vanished (killed at any moment: a normal event, not an error).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class TraceeGone(Exception):
    """The thread no longer exists, or is no longer stopped for ktrace.

    Not an OSError: ``except OSError`` (a bad pointer, a bad descriptor) lets it through."""


class Memory(Protocol):
    """The program's memory, at a stop or at a syscall's exit."""

    tid: int

    def read(self, address: int, size: int) -> bytes: ...

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string without its NUL; OSError(ENAMETOOLONG) past ``limit``."""
        ...

    def read_int(self, address: int) -> int:
        """A C ``int`` (4 bytes, native order)."""
        ...

    def write(self, parts: Sequence[tuple[int, bytes]]) -> None:
        """Write each (address, data), in order; OSError(EFAULT) if a place is unmapped
        (the parts before it may have been written, as the kernel's copy would have)."""
        ...


class Tracee(Memory, Protocol):
    """A thread stopped at the entry of a syscall the filter sent to ktrace."""

    syscall: str  # its name, a row of syscalls.TABLE
    can_rewrite: bool

    def arg(self, index: int) -> int:
        """Argument ``index`` (0-5) as an unsigned 64-bit value."""
        ...

    @property
    def process(self) -> int:
        """The thread group (process) id; raises TraceeGone."""
        ...

    def duplicate(self, fd: int) -> int:
        """A descriptor of ktrace's for the program's ``fd`` (the same open file): OSError(EBADF)..."""
        ...

    def inode(self, fd: int) -> int | None:
        """The inode of a socket descriptor, without duplicating it (None: not a socket)."""
        ...

    def directory(self, dirfd: int) -> bytes | None:
        """The path of a directory descriptor (AT_FDCWD: the working directory), or None."""
        ...

    def stable_copy(self, data: bytes) -> int | None:
        """The address of a copy of ``data`` the program will not change (ptrace only); None
        until the backend has memory for it there (answer `NeedScratch` then)."""
        ...


# ---- outcomes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """Let the syscall run exactly as the program issued it."""


@dataclass(frozen=True)
class Complete:
    """Do not run the syscall; it returns `retval` (a negative errno for failure).

    `then` runs right after the thread is resumed: work the program need not wait for
    (reporting what happened) comes after its syscall returns."""

    retval: int
    then: Callable[[], None] | None = None


# Called at the syscall's exit with its return value and the program's memory; returns
# the value the program should get instead, or None to leave it.
OnExit = Callable[[int, Memory], int | None]


@dataclass(frozen=True)
class Rewrite:
    """Run the syscall with these arguments instead: ((index, value), ...) (``can_rewrite`` only)."""

    args: tuple[tuple[int, int], ...]
    on_exit: OnExit | None = None


@dataclass(frozen=True)
class WatchExit:
    """Let the syscall run and call `on_exit` at its exit (``can_rewrite`` only)."""

    on_exit: OnExit


@dataclass(frozen=True)
class NeedScratch:
    """`stable_copy` had no memory yet: the backend makes some, then the program issues the
    same syscall again (and the handler is asked again)."""


@dataclass(frozen=True)
class InstallFd:
    """The syscall returns a new descriptor of the program's for ktrace's ``fd`` (closed by
    the backend afterwards); ``cloexec`` as the program asked (O_CLOEXEC)."""

    fd: int
    cloexec: bool


@dataclass(frozen=True)
class Deferred:
    """Decide later: hold the call until `outcome` resolves (e.g. the agent answered).

    Under ptrace the thread waits at its stop, signals included; under notification the
    wait is the kernel's and a signal interrupts it (the call is then restarted or fails
    with EINTR, as for any interrupted syscall). Handlers use it only where they must."""

    outcome: Awaitable[Resume | Complete | InstallFd]


Outcome = Resume | Complete | Rewrite | WatchExit | NeedScratch | InstallFd | Deferred


class SyscallHandler(Protocol):
    """What a backend calls: every stop of the program's syscalls, and its process changes."""

    def on_syscall(self, tracee: Tracee) -> Outcome: ...

    def on_exec(self, tid: int) -> None: ...

    def on_thread_exit(self, tid: int) -> None: ...
