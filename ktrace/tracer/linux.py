"""Linux calls both interception backends use: the program's memory (process_vm_readv and
process_vm_writev), its descriptors (pidfd_getfd), installing the seccomp filter, signalfd,
and what /proc says of a thread. No ptrace here (that is `ptrace/kernel.py`).

Every call that targets a thread raises `TraceeGone` when it vanished (ESRCH): a thread can
be killed at any moment, and callers treat that as a normal event rather than an error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from ktrace.tracer import arch
from ktrace.tracer.tracee import TraceeGone

WALL: Final = 0x40000000  # __WALL: wait for threads and non-SIGCHLD children too

PR_SET_PDEATHSIG: Final = 1
PR_SET_NO_NEW_PRIVS: Final = 38
PR_SET_CHILD_SUBREAPER: Final = 36
SYS_SECCOMP: Final = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER: Final = 1 << 3
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


class Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


# ---- memory -------------------------------------------------------------------


# One buffer and pair of iovecs for the reads that fit: building them for every read cost
# more than the syscall itself (docs/performance.md; a stop makes a few reads).
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
    except (FileNotFoundError, ProcessLookupError):
        # A thread that exits as its status is read: the file opened, the read says ESRCH.
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


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init (guardian.py)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_CHILD_SUBREAPER)")


def install_seccomp(program: bytes, *, listener: bool = False) -> int:
    """Install ``program`` for the calling thread and its future children; with ``listener``,
    return the user-notification listener descriptor (Linux 5.0+), else 0."""
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    nr = SYS_SECCOMP[arch.NATIVE.name]
    extra = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    try:
        return _syscall(nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW | extra, ctypes.addressof(prog))
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 4.17, which has no such flag
            raise
        return _syscall(nr, SECCOMP_SET_MODE_FILTER, extra, ctypes.addressof(prog))


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


# ---- /proc ----------------------------------------------------------------------------


def socket_inode(tid: int, fd: int) -> int | None:
    """The inode of a thread's socket descriptor, without duplicating it (None: not a socket)."""
    try:
        target = os.readlink(f"/proc/{tid}/fd/{fd}")
    except OSError:
        return None
    if target.startswith("socket:[") and target.endswith("]"):
        return int(target[8:-1])
    return None


AT_FDCWD: Final = -100


def directory_of(tid: int, dirfd: int) -> bytes | None:
    """The path of a thread's directory descriptor (AT_FDCWD: its working directory), or None."""
    dirfd = int.from_bytes((dirfd & 0xFFFFFFFF).to_bytes(4, "little"), "little", signed=True)
    link = f"/proc/{tid}/cwd" if dirfd == AT_FDCWD else f"/proc/{tid}/fd/{dirfd}"
    try:
        return os.readlink(link).encode()
    except OSError:
        return None


# ---- file calls the notify backend makes in the program's place (kernel layouts, raw) -------

_STAT_SIZE: Final = {"x86_64": 144, "aarch64": 128}
_STATX_SIZE: Final = 256


def _raw(name: str, *args: int | bytes | ctypes.Array[ctypes.c_char]) -> int:
    """The raw syscall ``name``: its result, or -errno (pointers as bytes or buffers)."""
    from ktrace.tracer import syscalls

    nr = syscalls.number(name)
    assert nr is not None
    converted = [
        ctypes.c_long(a) if isinstance(a, int) else ctypes.c_char_p(a) if isinstance(a, bytes) else a for a in args
    ]
    result = int(_libc.syscall(ctypes.c_long(nr), *converted))
    return result if result >= 0 else -(ctypes.get_errno() or errno.EIO)


def fstatat(path: bytes, flags: int) -> tuple[int, bytes]:
    """newfstatat(AT_FDCWD, path, buf, flags): (0 or -errno, the kernel's struct stat)."""
    buf = ctypes.create_string_buffer(_STAT_SIZE[arch.NATIVE.name])
    result = _raw("newfstatat", AT_FDCWD, path, buf, flags)
    return result, buf.raw


def statx(path: bytes, flags: int, mask: int) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    result = _raw("statx", AT_FDCWD, path, flags, mask, buf)
    return result, buf.raw


def faccessat(path: bytes, mode: int, flags: int) -> int:
    return _raw("faccessat2", AT_FDCWD, path, mode, flags)
