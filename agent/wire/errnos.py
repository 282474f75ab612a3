"""Errors on the wire are errno *names* ("ECONNREFUSED"): numbers differ between architectures, and
the agent may run on another one than the program. Names are made where the error happens (the
agent's sockets) and turned into this system's numbers where the program sees them."""

from __future__ import annotations

import errno
import os


def errno_name(exc: BaseException) -> str:
    """The errno name for an exception raised by a socket operation."""
    if isinstance(exc, TimeoutError) and (exc.errno is None or exc.errno == 0):
        # asyncio.wait_for / socket timeouts carry no errno: a connect that did not
        # finish in time is what the kernel itself reports as ETIMEDOUT.
        return "ETIMEDOUT"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, "EIO")
    return "EIO"


def errno_number(name: str, default: int) -> int:
    """This system's errno number for ``name``, or ``default`` when it has no such name."""
    value = getattr(errno, name, None)
    return value if isinstance(value, int) and name.startswith("E") else default


def describe(exc: BaseException) -> str:
    """One human line for ``exc`` (strerror where there is one)."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's strerror texts embed the address; keep it plain
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    return str(exc) or type(exc).__name__
