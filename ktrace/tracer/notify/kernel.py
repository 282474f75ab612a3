"""The seccomp user-notification interface (linux/seccomp.h), by ioctl on the listener.

A syscall the filter answers with SECCOMP_RET_USER_NOTIF waits in the kernel until the
supervisor (ktrace) reads its notification and sends a response: a return value, an error,
"continue" (run it as issued), or a descriptor installed in the program as the result
(ADDFD with SECCOMP_ADDFD_FLAG_SEND, Linux 5.14). The wait is interruptible: a signal ends it
with ERESTARTSYS, after which the kernel restarts the call (a new notification) or fails it
with EINTR, as for any interrupted syscall; a response to the old id then fails with ENOENT.
If the listener is closed (ktrace died), waiting and future calls fail with ENOSYS.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Final

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("!") << 8 | nr


class SeccompData(ctypes.Structure):
    _fields_ = (
        ("nr", ctypes.c_int),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    )


class SeccompNotif(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("data", SeccompData))


class SeccompNotifResp(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32), ("flags", ctypes.c_uint32))


class SeccompNotifAddfd(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("srcfd", ctypes.c_uint32),
        ("newfd", ctypes.c_uint32),
        ("newfd_flags", ctypes.c_uint32),
    )


NOTIF_RECV: Final = _ioc(_IOC_READ | _IOC_WRITE, 0, ctypes.sizeof(SeccompNotif))
NOTIF_SEND: Final = _ioc(_IOC_READ | _IOC_WRITE, 1, ctypes.sizeof(SeccompNotifResp))
NOTIF_ID_VALID: Final = _ioc(_IOC_WRITE, 2, 8)
NOTIF_ADDFD: Final = _ioc(_IOC_WRITE, 3, ctypes.sizeof(SeccompNotifAddfd))
USER_NOTIF_FLAG_CONTINUE: Final = 1
ADDFD_FLAG_SEND: Final = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


class NotificationGone(Exception):
    """The notification is no longer pending: its thread was interrupted (a signal: the call is
    restarted or fails with EINTR) or killed. Nothing to answer."""


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int  # the thread's id, in ktrace's pid namespace
    nr: int
    arch: int
    args: tuple[int, int, int, int, int, int]


def _call(fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint64) -> int:
    result = int(_ioctl(fd, request, ctypes.byref(arg)))
    if result < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            raise NotificationGone
        raise OSError(err, os.strerror(err))
    return result


def receive(fd: int) -> Notification | None:
    """The next pending notification (None: none after all, ENOENT: its thread went away first).
    Blocks when none is pending: call it when the listener is readable."""
    notif = SeccompNotif()  # zeroed: the kernel refuses a buffer that is not
    try:
        _call(fd, NOTIF_RECV, notif)
    except NotificationGone:
        return None
    except InterruptedError:
        return None
    data = notif.data
    return Notification(notif.id, notif.pid, data.nr, data.arch, tuple(int(a) for a in data.args))  # type: ignore[arg-type]


def still_pending(fd: int, notification_id: int) -> bool:
    """Whether the notification's thread still waits: checked after reading its memory, so
    that what was read is known to belong to that thread (its pid cannot have been reused)."""
    try:
        _call(fd, NOTIF_ID_VALID, ctypes.c_uint64(notification_id))
    except NotificationGone:
        return False
    return True


def respond(fd: int, notification_id: int, retval: int) -> None:
    """The syscall returns ``retval`` (a negative errno for a failure)."""
    resp = SeccompNotifResp(notification_id, retval if retval >= 0 else 0, retval if retval < 0 else 0, 0)
    _call(fd, NOTIF_SEND, resp)


def let_run(fd: int, notification_id: int) -> None:
    """The syscall runs as the program issued it (only where its arguments cannot matter)."""
    _call(fd, NOTIF_SEND, SeccompNotifResp(notification_id, 0, 0, USER_NOTIF_FLAG_CONTINUE))


def install_fd(fd: int, notification_id: int, source: int, cloexec: bool) -> int:
    """Put a copy of ktrace's ``source`` into the program as the syscall's result (its number)."""
    addfd = SeccompNotifAddfd(notification_id, ADDFD_FLAG_SEND, source, 0, os.O_CLOEXEC if cloexec else 0)
    return _call(fd, NOTIF_ADDFD, addfd)
