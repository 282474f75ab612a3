"""The wire's plain values (pure: no I/O, no gRPC, no protobuf): what the tracer, the tunnel and
the agent pass around. ``codec.py`` turns them into messages and back."""

from __future__ import annotations

import errno as _errno
import ipaddress
import socket
from dataclasses import dataclass

from .errnos import errno_number

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Room for the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
MAX_DATAGRAM = 65536


@dataclass(frozen=True)
class Endpoint:
    """An IP endpoint. IPv4-mapped IPv6 addresses are kept as given (the tracer decides); on the
    wire they travel as IPv4 (``codec.encode_address``)."""

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} out of range")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``"10.0.0.1:80"`` or ``"[::1]:80"``."""
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"bad endpoint {text!r}: expected [IPv6]:PORT")
            port_text = rest[1:]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(f"bad endpoint {text!r}: expected IPv4:PORT or [IPv6]:PORT")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"bad endpoint {text!r}: port is not a number") from None
        return cls(ipaddress.ip_address(host), port)

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple[object, ...]) -> Endpoint:
        """From a Python socket address tuple (``(host, port)`` or ``(host, port, flow, scope)``)."""
        host = str(sockaddr[0]).split("%", 1)[0]
        port = sockaddr[1]
        assert isinstance(port, int)
        return cls(ipaddress.ip_address(host), port)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if self.ip.version == 6 else socket.AF_INET

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class SourceRoute:
    """For one IP version (4 or 6): the source address the agent's kernel picks towards the
    cluster, or, when that version has no route there, the errno name of connect() (the
    handshake says)."""

    version: int
    source: IPAddress | None
    errno_name: str = ""

    @property
    def errno(self) -> int:
        """The local errno number of ``errno_name`` (ENETUNREACH when this system has no such name)."""
        return errno_number(self.errno_name, _errno.ENETUNREACH)


@dataclass(frozen=True)
class TcpOptions:
    """Options of a program's TCP socket that act on the path to its peer, which the agent's socket
    to the destination must carry (``tcp_options.py``): SO_KEEPALIVE, TCP_KEEPIDLE and
    TCP_KEEPINTVL (seconds), TCP_KEEPCNT, TCP_USER_TIMEOUT (milliseconds). A number at 0 is "the
    kernel's default" (for ``user_timeout_ms``, the kernel's own 0: none)."""

    keepalive: bool = False
    idle_s: int = 0
    interval_s: int = 0
    count: int = 0
    user_timeout_ms: int = 0


class TunnelError(Exception):
    """A dial or stream failure reported by the agent, by errno name (numbers differ per architecture)."""

    def __init__(self, errno_name: str, message: str = "") -> None:
        super().__init__(f"{errno_name}: {message}" if message else errno_name)
        self.errno_name = errno_name
        self.message = message

    @property
    def errno(self) -> int:
        """The local errno number for ``errno_name``; EIO when this system has no such name."""
        return errno_number(self.errno_name, _errno.EIO)
