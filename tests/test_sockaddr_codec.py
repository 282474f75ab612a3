"""sockaddr codec: table of known encodings, round trips, and fuzzing."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktrace.tracer import sockaddr
from ktrace.tracer.sockaddr import InetAddr, OtherFamily
from ktrace.tunnel.types import Endpoint

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def sin(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


def sin6(ip: str, port: int, flow: int = 0, scope: int = 0) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, flow)
        + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", scope)
    )


CASES = [
    (sin("10.96.1.10", 8080), InetAddr(socket.AF_INET, V4("10.96.1.10"), 8080)),
    (sin("127.0.0.1", 1), InetAddr(socket.AF_INET, V4("127.0.0.1"), 1)),
    (sin6("fd00::1", 443), InetAddr(socket.AF_INET6, V6("fd00::1"), 443)),
    (sin6("fe80::1", 53, 7, 2), InetAddr(socket.AF_INET6, V6("fe80::1"), 53, 7, 2)),
    (struct.pack("=H", socket.AF_UNIX) + b"/run/x.sock\0", OtherFamily(socket.AF_UNIX)),
]


@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_decode_known_encodings(raw: bytes, expected: object) -> None:
    assert sockaddr.decode(raw) == expected


def test_too_short_is_left_to_the_kernel() -> None:
    assert sockaddr.decode(b"") is None
    assert sockaddr.decode(sin("10.0.0.1", 1)[:15]) is None
    assert sockaddr.decode(sin6("::1", 1)[:23]) is None


def test_old_24_byte_sockaddr_in6_is_accepted() -> None:
    assert sockaddr.decode(sin6("fd00::1", 80)[:24]) == InetAddr(socket.AF_INET6, V6("fd00::1"), 80)


def test_v4_mapped_destination_is_dialled_as_ipv4() -> None:
    addr = sockaddr.decode(sin6("::ffff:10.96.1.10", 80))
    assert isinstance(addr, InetAddr)
    assert addr.endpoint == Endpoint(V4("10.96.1.10"), 80)
    assert sockaddr.is_loopback(V6("::ffff:127.0.0.1"))


def test_encode_matches_what_the_kernel_writes() -> None:
    assert sockaddr.encode(socket.AF_INET, V4("10.96.1.10"), 8080) == sin("10.96.1.10", 8080)
    assert sockaddr.encode(socket.AF_INET6, V6("fd00::1"), 443) == sin6("fd00::1", 443)
    # An IPv4 name for a dual-stack socket is v4-mapped.
    assert sockaddr.encode(socket.AF_INET6, V4("10.0.0.1"), 80) == sin6("::ffff:10.0.0.1", 80)
    with pytest.raises(ValueError):
        sockaddr.encode(socket.AF_INET, V6("::1"), 1)


def test_fill_name_buffer_truncates_but_reports_full_length() -> None:
    name = sin("10.0.0.1", 80)
    assert sockaddr.fill_name_buffer(name, 128) == (name, 16)
    assert sockaddr.fill_name_buffer(name, 4) == (name[:4], 16)
    assert sockaddr.fill_name_buffer(name, 0) == (b"", 16)


@given(st.binary(max_size=160))
def test_decode_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    sockaddr.decode(raw)


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_ipv4_round_trip(ip: ipaddress.IPv4Address, port: int) -> None:
    assert sockaddr.decode(sockaddr.encode(socket.AF_INET, ip, port)) == InetAddr(socket.AF_INET, ip, port)


@given(st.ip_addresses(v=6), st.integers(0, 65535))
def test_ipv6_round_trip(ip: ipaddress.IPv6Address, port: int) -> None:
    assert sockaddr.decode(sockaddr.encode(socket.AF_INET6, ip, port)) == InetAddr(socket.AF_INET6, ip, port)
