"""Pure codec for struct msghdr / struct mmsghdr (x86_64 LP64 layout).

struct msghdr {            offset
    void *msg_name;          0
    socklen_t msg_namelen;   8   (u32, then 4 bytes padding)
    struct iovec *msg_iov;   16
    size_t msg_iovlen;       24
    void *msg_control;       32
    size_t msg_controllen;   40
    int msg_flags;           48  (then 4 bytes padding)
};                           56
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };  64 with padding
struct iovec { void *iov_base; size_t iov_len; };                 16
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MSGHDR_SIZE: Final = 56
MMSGHDR_SIZE: Final = 64
MSG_LEN_OFFSET: Final = 56
NAMELEN_OFFSET: Final = 8
CONTROLLEN_OFFSET: Final = 40
FLAGS_OFFSET: Final = 48
IOVEC_SIZE: Final = 16
IOV_MAX: Final = 1024
# The most control (cmsg) bytes ktrace copies for one message (the kernel's own cap is
# net.core.optmem_max, 20 KiB by default).
MAX_CONTROL: Final = 65536

# Reads the program's memory: (address, size) -> bytes.
Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class MsgHdr:
    name: int
    namelen: int
    iov: int
    iovlen: int
    control: int
    controllen: int
    flags: int


def decode_msghdr(raw: bytes) -> MsgHdr:
    if len(raw) < MSGHDR_SIZE:
        raise ValueError("short msghdr")
    name, namelen, iov, iovlen, control, controllen, flags = struct.unpack_from("=QI4xQQQQi", raw, 0)
    return MsgHdr(name, namelen, iov, iovlen, control, controllen, flags)


def decode_iovecs(raw: bytes, count: int) -> list[tuple[int, int]]:
    if count < 0 or count > IOV_MAX or len(raw) < count * IOVEC_SIZE:
        raise ValueError("bad iovec array")
    return [struct.unpack_from("=QQ", raw, i * IOVEC_SIZE) for i in range(count)]
