"""Pure codec for the sockaddr structures a program passes to the kernel.

Decoding never raises on hostile bytes: anything malformed or not an IP
address decodes to `None` or `Unsupported`, and the syscall then runs untouched
so the kernel reports the same error it would without ktrace.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final

from ktrace_agent.wire.values import Endpoint, IPAddress

AF_UNSPEC: Final = 0
AF_UNIX: Final = socket.AF_UNIX
AF_INET: Final = socket.AF_INET
AF_INET6: Final = socket.AF_INET6

SOCKADDR_IN_LEN: Final = 16
SOCKADDR_IN6_LEN: Final = 28
MAX_SOCKADDR_LEN: Final = 128  # sizeof(struct sockaddr_storage)


@dataclass(frozen=True)
class InetAddr:
    """An AF_INET or AF_INET6 sockaddr as the program wrote it."""

    family: int
    ip: IPAddress  # as written: an IPv4-mapped IPv6 address stays IPv6 here
    port: int
    flowinfo: int = 0
    scope_id: int = 0

    @property
    def endpoint(self) -> Endpoint:
        """The destination the agent should dial: v4-mapped IPv6 becomes IPv4."""
        ip = self.ip
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return Endpoint(ip, self.port)


@dataclass(frozen=True)
class OtherFamily:
    """A sockaddr of a family ktrace leaves alone (AF_UNIX, AF_NETLINK, ...)."""

    family: int


Decoded = InetAddr | OtherFamily


def decode(raw: bytes) -> Decoded | None:
    """Decode `raw` (exactly the addrlen bytes the program passed).

    None means the kernel would reject it (too short for its family); the
    caller lets the syscall run so the program gets the kernel's own EINVAL.
    """
    if len(raw) < 2:
        return None
    (family,) = struct.unpack_from("=H", raw, 0)
    if family == AF_INET:
        if len(raw) < SOCKADDR_IN_LEN:
            return None
        port = struct.unpack_from("!H", raw, 2)[0]
        return InetAddr(AF_INET, ipaddress.IPv4Address(raw[4:8]), port)
    if family == AF_INET6:
        # The kernel accepts the old 24-byte sockaddr_in6 without scope id.
        if len(raw) < 24:
            return None
        port, flowinfo = struct.unpack_from("!HI", raw, 2)
        ip = ipaddress.IPv6Address(raw[8:24])
        scope = struct.unpack_from("=I", raw, 24)[0] if len(raw) >= SOCKADDR_IN6_LEN else 0
        return InetAddr(AF_INET6, ip, port, flowinfo, scope)
    return OtherFamily(family)


def encode(family: int, ip: IPAddress, port: int) -> bytes:
    """Encode an address in the socket's own family.

    An IPv4 address given for an AF_INET6 socket becomes v4-mapped, as the
    kernel reports it for a dual-stack socket.
    """
    if family == AF_INET:
        if not isinstance(ip, ipaddress.IPv4Address):
            raise ValueError(f"IPv6 address {ip} for an AF_INET socket")
        return struct.pack("=H", AF_INET) + struct.pack("!H", port) + ip.packed + bytes(8)
    if family == AF_INET6:
        if isinstance(ip, ipaddress.IPv4Address):
            ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        return struct.pack("=H", AF_INET6) + struct.pack("!HI", port, 0) + ip.packed + struct.pack("=I", 0)
    raise ValueError(f"unsupported family {family}")


def is_loopback(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_unspecified(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_unspecified
    return ip.is_unspecified


def fill_name_buffer(name: bytes, buffer_len: int) -> tuple[bytes, int]:
    """What getpeername()/getsockname()/recvfrom() store for the program.

    The kernel copies min(buffer_len, len(name)) bytes and always reports the
    full length, so a caller can tell its buffer was too small.
    """
    if buffer_len < 0:
        raise ValueError("negative buffer length")
    return name[: min(buffer_len, len(name))], len(name)
