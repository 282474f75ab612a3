"""The one module that talks to the kernel's tracing interfaces.

python-ptrace provides the ptrace(2) binding and the register structure; this
module adds what it lacks: PTRACE_SEIZE/LISTEN/INTERRUPT and the EXITKILL
option, seccomp filter installation, process_vm_readv/writev, pidfd_getfd and
signalfd. Nothing else in ktrace imports python-ptrace or calls ptrace.

Every call that targets a tracee raises `TraceeGone` when the tracee vanished
(ESRCH): a thread can be killed at any moment, and callers treat that as a
normal event rather than an error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from ptrace import PtraceError
from ptrace.binding import func as _pt

from ktrace.tracer import arch

# linux/ptrace.h
PTRACE_CONT: Final = 7
PTRACE_SYSCALL: Final = 24
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_LISTEN: Final = 0x4208

PTRACE_O_TRACESYSGOOD: Final = 0x1
PTRACE_O_TRACEFORK: Final = 0x2
PTRACE_O_TRACEVFORK: Final = 0x4
PTRACE_O_TRACECLONE: Final = 0x8
PTRACE_O_TRACEEXEC: Final = 0x10
PTRACE_O_TRACESECCOMP: Final = 0x80
PTRACE_O_EXITKILL: Final = 0x100000

PTRACE_EVENT_FORK: Final = 1
PTRACE_EVENT_VFORK: Final = 2
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_EXEC: Final = 4
PTRACE_EVENT_SECCOMP: Final = 7
PTRACE_EVENT_STOP: Final = 128

TRACE_OPTIONS: Final = (
    PTRACE_O_TRACESYSGOOD
    | PTRACE_O_TRACEFORK
    | PTRACE_O_TRACEVFORK
    | PTRACE_O_TRACECLONE
    | PTRACE_O_TRACEEXEC
    | PTRACE_O_TRACESECCOMP
    # If ktrace dies, every tracee dies with it: the program must never go on
    # running (and connecting directly) without its tracer.
    | PTRACE_O_EXITKILL
)

WALL: Final = 0x40000000  # __WALL: wait for threads and non-SIGCHLD children too

PR_SET_PDEATHSIG: Final = 1
PR_SET_NO_NEW_PRIVS: Final = 38
SYS_SECCOMP: Final = 317
SECCOMP_SET_MODE_FILTER: Final = 1
# Linux 4.17+. Without it, installing any filter may switch the task's Speculative Store
# Bypass mitigation on (spec_store_bypass_disable=seccomp: the default before Linux 5.16,
# still chosen by some distributions), slowing all of the program's code, not only its
# syscalls. ktrace's filter is for tracing, not a sandbox: the program keeps the
# mitigations it would have without ktrace.
SECCOMP_FILTER_FLAG_SPEC_ALLOW: Final = 1 << 2
SYS_PIDFD_OPEN: Final = 434
SYS_PIDFD_GETFD: Final = 438
PIDFD_THREAD: Final = os.O_EXCL  # linux/pidfd.h, Linux 6.9+
SFD_NONBLOCK: Final = os.O_NONBLOCK
SFD_CLOEXEC: Final = os.O_CLOEXEC

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


class TraceeGone(Exception):
    """The tracee no longer exists (or is not stopped for us any more).

    Not an OSError: ``except OSError`` (a bad pointer, a bad descriptor) lets it through."""


class Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return int(_pt.ptrace(request, pid, addr, data))
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise TraceeGone(pid) from None
        raise OSError(exc.errno, f"ptrace({request:#x}, {pid}): {os.strerror(exc.errno or 0)}") from None


# ---- attaching and resuming -------------------------------------------------


def seize(pid: int, options: int = TRACE_OPTIONS) -> None:
    _ptrace(PTRACE_SEIZE, pid, 0, options)


def cont(tid: int, signal: int = 0) -> None:
    _ptrace(PTRACE_CONT, tid, 0, signal)


def cont_to_exit(tid: int, signal: int = 0) -> None:
    """Resume and stop again at this syscall's exit (SIGTRAP|0x80)."""
    _ptrace(PTRACE_SYSCALL, tid, 0, signal)


def listen(tid: int) -> None:
    """Leave a tracee in group-stop so that SIGCONT can wake it (job control)."""
    _ptrace(PTRACE_LISTEN, tid)


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid)


def event_message(tid: int) -> int:
    # The kernel stores an unsigned long; python-ptrace's helper passes a 4-byte
    # int, which the kernel would overrun.
    value = ctypes.c_ulong()
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


# ---- registers ----------------------------------------------------------------


class Registers:
    """A tracee's general registers with arch-neutral accessors."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    @property
    def nr(self) -> int:
        return int(ctypes.c_long(getattr(self.raw, arch.NR_REGISTER)).value)

    @nr.setter
    def nr(self, value: int) -> None:
        setattr(self.raw, arch.NR_REGISTER, value & 0xFFFFFFFFFFFFFFFF)

    @property
    def retval(self) -> int:
        return int(ctypes.c_long(getattr(self.raw, arch.RETURN_REGISTER)).value)

    @retval.setter
    def retval(self, value: int) -> None:
        setattr(self.raw, arch.RETURN_REGISTER, value & 0xFFFFFFFFFFFFFFFF)

    def arg(self, index: int) -> int:
        return int(getattr(self.raw, arch.ARG_REGISTERS[index]))

    def set_arg(self, index: int, value: int) -> None:
        setattr(self.raw, arch.ARG_REGISTERS[index], value & 0xFFFFFFFFFFFFFFFF)

    @property
    def args(self) -> tuple[int, ...]:
        return tuple(int(getattr(self.raw, name)) for name in arch.ARG_REGISTERS)

    @property
    def ip(self) -> int:
        return int(getattr(self.raw, arch.IP_REGISTER))

    @ip.setter
    def ip(self, value: int) -> None:
        setattr(self.raw, arch.IP_REGISTER, value)

    def copy(self) -> Registers:
        clone = type(self.raw)()
        ctypes.pointer(clone)[0] = self.raw
        return Registers(clone)


def get_registers(tid: int) -> Registers:
    try:
        return Registers(_pt.ptrace_getregs(tid))
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise TraceeGone(tid) from None
        raise


def set_registers(tid: int, regs: Registers) -> None:
    try:
        _pt.ptrace_setregs(tid, regs.raw)
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise TraceeGone(tid) from None
        raise


# ---- memory -------------------------------------------------------------------


# One buffer and pair of iovecs for the reads that fit: building them for every read cost
# more than the syscall itself (measured: 5.4 -> 2.7 µs per read, a few reads per stop).
# Only the tracer's thread reads tracee memory, and every read copies out before returning.
_READ_BUFFER_SIZE = 65536
_read_buffer = ctypes.create_string_buffer(_READ_BUFFER_SIZE)
_read_local = Iovec(ctypes.cast(_read_buffer, ctypes.c_void_p), 0)
_read_remote = Iovec(0, 0)
_read_iovecs = (ctypes.byref(_read_local), ctypes.byref(_read_remote))
_process_vm_readv = _libc.process_vm_readv


def read_memory(tid: int, address: int, size: int) -> bytes:
    """Read `size` bytes of the tracee's memory; raises OSError(EFAULT) if unmapped."""
    if size == 0:
        return b""
    if size <= _READ_BUFFER_SIZE:
        _read_local.iov_len = size
        _read_remote.iov_base = address
        _read_remote.iov_len = size
        got = _process_vm_readv(tid, _read_iovecs[0], 1, _read_iovecs[1], 1, 0)
        if got == size:
            return ctypes.string_at(_read_buffer, size)
    else:
        buf = ctypes.create_string_buffer(size)
        got = _transfer_large(_libc.process_vm_readv, tid, address, buf, size)
        if got == size:
            return buf.raw
    raise _transfer_error(tid, got, "read")


def read_int(tid: int, address: int) -> int:
    return int(struct.unpack("=i", read_memory(tid, address, 4))[0])


_write_buffer = ctypes.create_string_buffer(_READ_BUFFER_SIZE)
_write_local = Iovec(ctypes.cast(_write_buffer, ctypes.c_void_p), 0)
_write_remote = Iovec(0, 0)
_write_iovecs = (ctypes.byref(_write_local), ctypes.byref(_write_remote))
_process_vm_writev = _libc.process_vm_writev


def write_memory(tid: int, address: int, data: bytes) -> None:
    """Write into the tracee's memory (only where the kernel itself would write)."""
    size = len(data)
    if not size:
        return
    if size <= _READ_BUFFER_SIZE:
        # Same reasoning as reads: one preallocated buffer (a stop writes a socket name and its
        # length, a received datagram's source, ...).
        ctypes.memmove(_write_buffer, data, size)
        _write_local.iov_len = size
        _write_remote.iov_base = address
        _write_remote.iov_len = size
        got = _process_vm_writev(tid, _write_iovecs[0], 1, _write_iovecs[1], 1, 0)
    else:
        got = _transfer_large(_libc.process_vm_writev, tid, address, ctypes.create_string_buffer(data, size), size)
    if got != size:
        raise _transfer_error(tid, got, "write")


# Several places written at one stop (a received datagram, its source and the source's
# length; a socket name and its length): one process_vm_writev with an iovec each, instead
# of a syscall each.
_MAX_PARTS = 4
_parts_local = (Iovec * _MAX_PARTS)()
_parts_remote = (Iovec * _MAX_PARTS)()


def write_memory_parts(tid: int, parts: Sequence[tuple[int, bytes]]) -> None:
    """``write_memory`` of each (address, data), in order, in one syscall when they fit the
    preallocated buffer. Raises as ``write_memory`` does; the parts before an unmapped one
    may have been written (the kernel stops there, as it would copying them one by one)."""
    total = sum(len(data) for _address, data in parts)
    if len(parts) > _MAX_PARTS or total > _READ_BUFFER_SIZE:
        for address, data in parts:
            write_memory(tid, address, data)
        return
    base = ctypes.addressof(_write_buffer)
    count = offset = 0
    for address, data in parts:
        size = len(data)
        if not size:
            continue
        ctypes.memmove(base + offset, data, size)
        _parts_local[count].iov_base = base + offset
        _parts_local[count].iov_len = size
        _parts_remote[count].iov_base = address
        _parts_remote[count].iov_len = size
        offset += size
        count += 1
    if not count:
        return
    got = _process_vm_writev(tid, _parts_local, count, _parts_remote, count, 0)
    if got != total:
        raise _transfer_error(tid, got, "write")


def _transfer_large(call: Any, tid: int, address: int, buf: ctypes.Array[ctypes.c_char], size: int) -> int:
    """process_vm_readv/writev (``call``) of ``size`` bytes between ``buf`` and the tracee's
    ``address``, for the transfers larger than the preallocated buffers."""
    local = Iovec(ctypes.cast(buf, ctypes.c_void_p), size)
    remote = Iovec(address, size)
    return int(call(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))


def _transfer_error(tid: int, got: int, what: str) -> Exception:
    """What a process_vm_readv/writev that moved ``got`` bytes, not all, raises."""
    if got < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            return TraceeGone(tid)
        return OSError(err, os.strerror(err))
    return OSError(errno.EFAULT, f"partial {what} of tracee memory")


def read_c_string(tid: int, address: int, limit: int = 4096) -> bytes:
    """Read a NUL-terminated string, page by page (it may end near a page end)."""
    out = b""
    while len(out) < limit:
        chunk_len = min(4096 - (address + len(out)) % 4096, limit - len(out))
        chunk = read_memory(tid, address + len(out), chunk_len)
        nul = chunk.find(b"\0")
        if nul >= 0:
            return out + chunk[:nul]
        out += chunk
    raise OSError(errno.ENAMETOOLONG, "string too long")


# ---- file descriptors of a tracee -----------------------------------------------


def _syscall(*args: int) -> int:
    result = int(_libc.syscall(*[ctypes.c_long(a) for a in args]))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


# The pidfd_open flags this kernel refused (PIDFD_THREAD before Linux 6.9): every socket stop
# duplicates a descriptor, and a refused flag would cost a failing syscall each time.
_refused_pidfd_flags: set[int] = set()


def duplicate_fd(tid: int, fd: int, thread_group: Callable[[int], int]) -> int:
    """A duplicate of thread `tid`'s descriptor `fd` in ktrace (same open file).

    pidfd_getfd(2) needs Linux 5.6; the PIDFD_THREAD pidfd (6.9) lets a thread
    id be used directly, else the thread group id is asked of `thread_group`
    (the tracer's cache, `ThreadGroups.of`, rather than /proc on every call).
    """
    pidfd = -1
    if PIDFD_THREAD not in _refused_pidfd_flags:
        try:
            pidfd = _syscall(SYS_PIDFD_OPEN, tid, PIDFD_THREAD)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise TraceeGone(tid) from None
            if exc.errno != errno.EINVAL:
                raise
            _refused_pidfd_flags.add(PIDFD_THREAD)  # a kernel before 6.9: not asked again
    if pidfd < 0:
        pidfd = _syscall(SYS_PIDFD_OPEN, thread_group(tid), 0)
    try:
        return _syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def thread_group_of(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise TraceeGone(tid) from None
    raise TraceeGone(tid)


# ---- set-up inside the child, between fork and exec -------------------------------


def prepare_child_for_filter() -> None:
    """NO_NEW_PRIVS lets an unprivileged process install a filter; PDEATHSIG
    covers the window before ktrace has seized the child."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NO_NEW_PRIVS)")
    _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


def install_seccomp(program: bytes) -> None:
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    try:
        _syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, ctypes.addressof(prog))
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 4.17, which has no such flag
            raise
        _syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, ctypes.addressof(prog))


# ---- signals ------------------------------------------------------------------------

SIGNALFD_SIGINFO_SIZE: Final = 128


def signalfd(signals: set[int]) -> int:
    """A non-blocking signalfd for `signals` (which the caller has blocked)."""
    mask = 0
    for sig in signals:
        mask |= 1 << (sig - 1)
    sigset = (ctypes.c_ulong * 16)(mask)
    fd = int(_libc.signalfd(-1, ctypes.byref(sigset), SFD_NONBLOCK | SFD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, "signalfd")
    return fd


def read_signals(fd: int) -> list[tuple[int, int, int]]:
    """Pending (signo, code, sender pid) from a signalfd."""
    out: list[tuple[int, int, int]] = []
    while True:
        try:
            data = os.read(fd, SIGNALFD_SIGINFO_SIZE * 16)
        except BlockingIOError:
            return out
        for off in range(0, len(data) - SIGNALFD_SIGINFO_SIZE + 1, SIGNALFD_SIGINFO_SIZE):
            signo, _errno, code, pid = struct.unpack_from("=IiiI", data, off)
            out.append((signo, code, pid))
        if len(data) < SIGNALFD_SIGINFO_SIZE * 16:
            # Fewer than asked for: nothing else was pending (one read less, and no exception,
            # on each of the several wake-ups per lookup). A signal arriving now keeps the
            # descriptor readable for the event loop's next turn.
            return out
