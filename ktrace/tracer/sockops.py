"""Socket calls ktrace makes on its duplicate of a program's socket, with the address bytes
exactly as the program wrote them (Python's socket module wants tuples and drops what a
sockaddr carries beyond them: a v4-mapped form, flow info, a scope id, the length).

Being the same open file description, whatever these do is what the program's own call
would have done: ktrace performs a call itself, from the copy of its arguments it made
its decision on, whenever letting the kernel read them again from the program's memory
could let another thread change them in between.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from typing import Final

from ktrace.tracer import msghdr

_libc = ctypes.CDLL(None, use_errno=True)
_connect = _libc.connect
_connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_connect.restype = ctypes.c_int
_sendmsg = _libc.sendmsg
_sendmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_sendmsg.restype = ctypes.c_ssize_t

AF_UNSPEC_NAME: Final = struct.pack("=H14x", socket.AF_UNSPEC)
TCP_SYN_SENT: Final = 2
TCP_SYN_RECV: Final = 3
TCP_ESTABLISHED: Final = 1
TCP_CLOSE: Final = 7


def connect(fd: int, name: bytes) -> int:
    """connect(2) with these address bytes: 0 or the errno."""
    if _connect(fd, name, len(name)) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def disconnect(fd: int) -> int:
    """connect(AF_UNSPEC): a TCP socket goes back to CLOSE (a connect in progress fails, one
    blocked in the kernel wakes up), a UDP socket forgets its peer. 0 or the errno."""
    return connect(fd, AF_UNSPEC_NAME)


def nonblocking(fd: int) -> bool:
    """Whether the open file description has O_NONBLOCK (shared by every duplicate of it)."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def take_error(sock: socket.socket) -> int:
    """Read (and so clear) the socket's pending error, as getsockopt(SO_ERROR) does."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


class Msghdr(ctypes.Structure):
    """struct msghdr, for the calls ktrace makes itself (msghdr.py decodes the program's)."""

    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


def send(fd: int, payload: bytes, name: bytes | None, control: bytes = b"", flags: int = 0) -> int:
    """sendmsg(2) of one datagram: the byte count, or -errno. ``name`` and ``control`` are the
    program's bytes (its struct sockaddr and its cmsg buffer: same ABI as ktrace's)."""
    data = ctypes.create_string_buffer(payload, len(payload)) if payload else None
    iov = Iovec(ctypes.cast(data, ctypes.c_void_p) if data is not None else None, len(payload))
    name_buf = ctypes.create_string_buffer(name, len(name)) if name else None
    control_buf = ctypes.create_string_buffer(control, len(control)) if control else None
    hdr = Msghdr(
        ctypes.cast(name_buf, ctypes.c_void_p) if name_buf is not None else None,
        len(name) if name else 0,
        ctypes.addressof(iov),
        1,
        ctypes.cast(control_buf, ctypes.c_void_p) if control_buf is not None else None,
        len(control),
        0,
    )
    sent = int(_sendmsg(fd, ctypes.addressof(hdr), flags))
    return sent if sent >= 0 else -(ctypes.get_errno() or errno.EIO)


def gather(read: msghdr.Reader, hdr: msghdr.MsgHdr, limit: int) -> tuple[bytes, bytes]:
    """The payload of a message (its iovecs joined) and its control bytes, read once from the
    program; OverflowError when the payload is larger than ``limit``, ValueError for more iovecs
    than UIO_MAXIOV (checked before the count, the program's, sizes a read)."""
    if hdr.iovlen > msghdr.IOV_MAX:
        raise ValueError("more iovecs than UIO_MAXIOV")
    iovecs: Sequence[tuple[int, int]] = msghdr.decode_iovecs(read(hdr.iov, hdr.iovlen * msghdr.IOVEC_SIZE), hdr.iovlen)
    total = sum(length for _base, length in iovecs)
    if total > limit:
        raise OverflowError
    payload = b"".join(read(base, length) for base, length in iovecs)
    control = read(hdr.control, min(hdr.controllen, msghdr.MAX_CONTROL)) if hdr.control and hdr.controllen else b""
    return payload, control
