"""The one table of the syscalls ktrace stops or refuses.

Each row names a syscall, its number on each architecture, when the seccomp filter sends
it to ktrace (or fails it without a stop), and which handler takes it. The BPF program
(`filter_rules`) and the dispatch (`dispatch.py`) are both built from this table, so the
two cannot disagree; tests/test_syscall_table.py checks that every stopping row has a
handler and every handler a row.

Numbers: x86_64 from arch/x86/entry/syscalls/syscall_64.tbl, aarch64 from the generic
table (include/uapi/asm-generic/unistd.h), which has no `open`: there, programs use openat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from ktrace.tracer import arch, seccomp
from ktrace.tracer.arch import Arch

ENOSYS: Final = 38
CLONE_UNTRACED: Final = 0x00800000
SOL_SOCKET, SO_ERROR = 1, 4
# sizeof(struct sockaddr_in): the kernel refuses a shorter address for any IP destination
# (udp_sendmsg, and udpv6_sendmsg, whose IPv6 minimum is larger still; TCP fast open too).
MIN_IP_SOCKADDR_LEN: Final = 16


@dataclass(frozen=True)
class Always:
    """Every call stops."""


@dataclass(frozen=True)
class WithAddress:
    """Stops only when argument ``arg`` (a pointer) is not NULL and, with ``min_len``, when
    argument ``min_len[0]`` is at least ``min_len[1]``."""

    arg: int
    min_len: tuple[int, int] | None = None


@dataclass(frozen=True)
class WithArgs:
    """Stops only when the low 32 bits of each (argument, value) match."""

    args: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class WithBit:
    """Stops only when the low 32 bits of argument ``arg`` have a bit of ``mask`` set."""

    arg: int
    mask: int


@dataclass(frozen=True)
class Fails:
    """Never stops: fails at once with ``errno``."""

    errno: int


Condition = Always | WithAddress | WithArgs | WithBit | Fails


@dataclass(frozen=True)
class Row:
    name: str
    numbers: Mapping[str, int]  # arch name -> number; an arch without the syscall has no entry
    when: Condition
    handler: str | None  # the dispatch key; None for a syscall that fails in the filter
    # Stopped only when the session asks for it (``features`` of filter_rules).
    feature: str | None = None
    why: str = field(default="", compare=False)

    def number(self, on: Arch) -> int | None:
        return self.numbers.get(on.name)


def _n(x86_64: int, aarch64: int | None) -> dict[str, int]:
    numbers = {"x86_64": x86_64}
    if aarch64 is not None:
        numbers["aarch64"] = aarch64
    return numbers


TABLE: Final = (
    Row("connect", _n(42, 203), Always(), "connect"),
    Row("getpeername", _n(52, 205), Always(), "names"),
    Row("getsockname", _n(51, 204), Always(), "names"),
    Row(
        "getsockopt",
        _n(55, 209),
        WithArgs(((1, SOL_SOCKET), (2, SO_ERROR))),
        "so_error",
        why="how a non-blocking connect ended: the agent's errno for one that failed (tcp.py)",
    ),
    # UDP: a send with a destination, and receives whose source ktrace may have to restore.
    # sendto/recvfrom without an address (a connected socket, or a TCP send/recv) never stop;
    # sendmsg/recvmsg carry the address inside struct msghdr, out of the filter's reach, so
    # they always stop. Nor does a sendto whose address is shorter than any IP one (the
    # kernel refuses that for an IP destination, EINVAL, with or without ktrace): glibc's
    # netlink request at every getaddrinfo (a 12-byte sockaddr_nl), Go's interface listing.
    Row("sendto", _n(44, 206), WithAddress(4, (5, MIN_IP_SOCKADDR_LEN)), "send"),
    Row("recvfrom", _n(45, 207), WithAddress(4), "receive"),
    Row("sendmsg", _n(46, 211), Always(), "send"),
    Row("recvmsg", _n(47, 212), Always(), "receive"),
    Row("sendmmsg", _n(307, 269), Always(), "send"),
    Row("recvmmsg", _n(299, 243), Always(), "receive"),
    # The resolver view: opening /etc/resolv.conf opens the agent's copy.
    Row("open", _n(2, None), Always(), "open"),
    Row("openat", _n(257, 56), Always(), "open"),
    Row("openat2", _n(437, 437), Always(), "open"),
    # io_uring can connect and send without any syscall ktrace could see.
    Row("io_uring_setup", _n(425, 425), Fails(ENOSYS), None),
    # ptrace: a child made with CLONE_UNTRACED is no tracee, so PTRACE_O_EXITKILL would not end it
    # with ktrace; ktrace clears the flag. clone3 keeps its flags in memory, out of the filter's
    # reach: it fails with ENOSYS, after which glibc (2.34+) and Rust's std use clone. (Under
    # notify the guardian ends every process instead.)
    Row("clone", _n(56, 220), WithBit(0, CLONE_UNTRACED), "clone", feature="ptrace"),
    Row("clone3", _n(435, 435), Fails(ENOSYS), None, feature="ptrace"),
    # --target's files (files.py): calls that name a path stop only when the target's volumes are
    # served, since every stat() of the program then stops.
    *(
        Row(name, _n(x86_64, aarch64), Always(), "path", feature="files")
        for name, x86_64, aarch64 in (
            ("stat", 4, None),
            ("lstat", 6, None),
            ("newfstatat", 262, 79),
            ("statx", 332, 291),
            ("access", 21, None),
            ("faccessat", 269, 48),
            ("faccessat2", 439, 439),
            ("readlink", 89, None),
            ("readlinkat", 267, 78),
            ("creat", 85, None),
            ("truncate", 76, 45),
            ("mkdir", 83, None),
            ("mkdirat", 258, 34),
            ("rmdir", 84, None),
            ("unlink", 87, None),
            ("unlinkat", 263, 35),
            ("rename", 82, None),
            ("renameat", 264, 38),
            ("renameat2", 316, 276),
            ("link", 86, None),
            ("linkat", 265, 37),
            ("symlink", 88, None),
            ("symlinkat", 266, 36),
            ("chmod", 90, None),
            ("fchmodat", 268, 53),
            ("fchmodat2", 452, 452),
            ("chown", 92, None),
            ("lchown", 94, None),
            ("fchownat", 260, 54),
            ("mknod", 133, None),
            ("mknodat", 259, 33),
            ("utime", 132, None),
            ("utimes", 235, None),
            ("utimensat", 280, 88),
        )
    ),
)

# Syscalls a backend issues in the program's name (ptrace: a scratch page), never stopped.
INJECTED: Final = {"mmap": _n(9, 222)}

BY_NAME: Final = {row.name: row for row in TABLE}


def number(name: str, on: Arch = arch.NATIVE) -> int | None:
    """The number of syscall ``name`` (a row or an injected one) on ``on``."""
    row = BY_NAME.get(name)
    numbers = row.numbers if row is not None else INJECTED[name]
    return numbers.get(on.name)


def names_by_number(on: Arch = arch.NATIVE) -> dict[int, str]:
    """Number -> name of the rows that stop, for the dispatch."""
    out: dict[int, str] = {}
    for row in TABLE:
        nr = row.number(on)
        if nr is not None and row.handler is not None:
            out[nr] = row.name
    return out


def filter_rules(features: frozenset[str] = frozenset(), on: Arch = arch.NATIVE) -> list[seccomp.Rule]:
    """The filter's rules for ``on``: every row it has, stopping rows only for the
    ``features`` they need."""
    rules: list[seccomp.Rule] = []
    for row in TABLE:
        nr = row.number(on)
        if nr is None or (row.feature is not None and row.feature not in features):
            continue
        when = row.when
        if isinstance(when, Fails):
            rules.append(seccomp.fail(nr, when.errno))
        elif isinstance(when, WithAddress):
            rules.append(seccomp.trace(nr, unless_arg_zero=when.arg, at_least=when.min_len))
        elif isinstance(when, WithArgs):
            rules.append(seccomp.trace(nr, only_if_args=when.args))
        elif isinstance(when, WithBit):
            rules.append(seccomp.trace(nr, any_bit=(when.arg, when.mask)))
        else:
            rules.append(seccomp.trace(nr))
    return rules
