"""The wire's values to messages and back, the same on both sides (pure).

One rule for every IP address on the wire (the proto's): 4 bytes for IPv4, 16 for IPv6, and an
IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) travels as the IPv4 address it maps, whichever side
encodes it; what arrives mapped anyway is read as IPv4 too. The socket family decides how it is used
locally (``sockaddr_for``): a program's AF_INET6 socket may name an IPv4 peer as v4-mapped, the
agent's AF_INET6 socket sees such peers so, and neither side's choice crosses the wire.

Errors travel as ``Failure`` messages: an errno name and a line of text (``errnos.py``).
"""

from __future__ import annotations

import ipaddress
import socket

from . import rpc
from .errnos import describe, errno_name
from .values import Endpoint, IPAddress, TcpOptions, TunnelError

# setsockopt takes a C int: larger numbers from the wire are cut to the largest (the kernel
# refuses them, or caps them, as it would the program's own).
_INT_MAX = 0x7FFFFFFF


class AddressError(ValueError):
    """Bytes from the wire that are no IP address, or a port out of range."""


def encode_ip(ip: IPAddress) -> bytes:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def decode_ip(raw: bytes) -> IPAddress:
    if len(raw) not in (4, 16):
        raise AddressError(f"address has {len(raw)} bytes of IP, expected 4 or 16")
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def encode_address(endpoint: Endpoint) -> rpc.Address:
    return rpc.Address(ip=encode_ip(endpoint.ip), port=endpoint.port)


def decode_address(address: rpc.Address) -> Endpoint:
    if address.port > 0xFFFF:
        raise AddressError(f"port {address.port} out of range")
    return Endpoint(decode_ip(address.ip), address.port)


def encode_sockaddr(sockaddr: tuple[object, ...]) -> rpc.Address:
    """The ``Address`` of a Python socket address (``getsockname()``, ``recvfrom()``; scope ids dropped)."""
    return encode_address(Endpoint.from_sockaddr(sockaddr))


def sockaddr_for(endpoint: Endpoint, family: int) -> tuple[str, int]:
    """The address tuple for ``endpoint`` on a socket of ``family`` (IPv4 on AF_INET6: v4-mapped)."""
    if family == socket.AF_INET6 and endpoint.ip.version == 4:
        return f"::ffff:{endpoint.ip}", endpoint.port
    return str(endpoint.ip), endpoint.port


def wire_family(family: int) -> rpc.Family:
    """``socket.AF_INET6`` → ``INET6``; anything else → ``INET``."""
    return rpc.FAMILY_INET6 if family == socket.AF_INET6 else rpc.FAMILY_INET


def socket_family(family: int) -> int | None:
    """``INET`` → ``socket.AF_INET``, ``INET6`` → ``socket.AF_INET6``; None for any other number."""
    if family == rpc.FAMILY_INET:
        return socket.AF_INET
    if family == rpc.FAMILY_INET6:
        return socket.AF_INET6
    return None


def ip_version(family: int) -> int | None:
    """``INET`` → 4, ``INET6`` → 6; None for any other number."""
    local = socket_family(family)
    return None if local is None else 6 if local == socket.AF_INET6 else 4


def encode_failure(exc: BaseException, context: str = "") -> rpc.Failure:
    """The ``Failure`` for an exception of a socket operation; ``context`` leads its text."""
    text = describe(exc)
    return rpc.Failure(errno_name=errno_name(exc), message=f"{context}: {text}" if context else text)


def decode_failure(failure: rpc.Failure) -> TunnelError:
    """The ``TunnelError`` of a ``Failure`` (EIO when it names no errno)."""
    return TunnelError(failure.errno_name or "EIO", failure.message)


def encode_tcp_options(options: TcpOptions) -> rpc.TcpOptions:
    return rpc.TcpOptions(
        keepalive=options.keepalive,
        keepalive_idle_s=_uint32(options.idle_s),
        keepalive_interval_s=_uint32(options.interval_s),
        keepalive_count=_uint32(options.count),
        user_timeout_ms=_uint32(options.user_timeout_ms),
    )


def decode_tcp_options(message: rpc.TcpOptions) -> TcpOptions:
    return TcpOptions(
        message.keepalive,
        min(message.keepalive_idle_s, _INT_MAX),
        min(message.keepalive_interval_s, _INT_MAX),
        min(message.keepalive_count, _INT_MAX),
        min(message.user_timeout_ms, _INT_MAX),
    )


def _uint32(value: int) -> int:
    return max(0, min(value, 0xFFFFFFFF))
