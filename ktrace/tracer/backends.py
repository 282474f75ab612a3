"""Which interception backend a run uses: ptrace, or seccomp user notification ("notify").

notify leaves the program's ptrace slot to a debugger. It needs Linux 5.14 (a descriptor
installed as a syscall's result, SECCOMP_ADDFD_FLAG_SEND; the listener itself is 5.0 and
pidfd_getfd 5.6). `auto` picks notify where the kernel has that, ptrace elsewhere.
"""

from __future__ import annotations

import os
import re
from typing import Final

CHOICES: Final = ("auto", "notify", "ptrace")
NOTIFY_KERNEL: Final = (5, 14)


def kernel_version(release: str | None = None) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def notify_missing(release: str | None = None) -> str | None:
    """Why the notify backend cannot run here (None: it can)."""
    version = kernel_version(release)
    if version < NOTIFY_KERNEL:
        major, minor = version
        return f"Linux {major}.{minor} is older than 5.14 (seccomp user notification with SECCOMP_ADDFD_FLAG_SEND)"
    return None


def choose(requested: str, release: str | None = None) -> str:
    """The backend to use for ``requested`` (one of CHOICES); raises ValueError when notify is
    asked for and cannot run here."""
    if requested == "ptrace":
        return "ptrace"
    missing = notify_missing(release)
    if requested == "notify":
        if missing is not None:
            raise ValueError(f"the notify backend cannot run here: {missing}")
        return "notify"
    return "ptrace" if missing is not None else DEFAULT_WHERE_SUPPORTED


# What `auto` picks where both work (docs/performance.md compares them).
DEFAULT_WHERE_SUPPORTED: Final = "ptrace"
