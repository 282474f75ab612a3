"""The agent's only contact with the generated gRPC code (``ktrace_proto``).

The generated ``*_pb2_grpc`` module is untyped; everything the rest of the agent
needs from it goes through the typed names below. Message classes come from the
typed ``*_pb2`` module and are re-exported so other modules import one place.

Also here: the pure codec between ``Address`` messages and ``(ip, port)`` pairs.
The wire rule (see the proto) is that an IPv4-mapped IPv6 address travels as a
4-byte IPv4 address; the socket family decides how it is used locally.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Protocol

import grpc
import grpc.aio

from ktrace_proto import tunnel_v1_pb2 as pb
from ktrace_proto import tunnel_v1_pb2_grpc as _pb_grpc

PROTOCOL_VERSION = 1

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Message classes, re-exported.
Address = pb.Address
Failure = pb.Failure
HandshakeRequest = pb.HandshakeRequest
HandshakeReply = pb.HandshakeReply
TcpClientFrame = pb.TcpClientFrame
TcpServerFrame = pb.TcpServerFrame
TcpOpen = pb.TcpOpen
TcpOpened = pb.TcpOpened
UdpClientFrame = pb.UdpClientFrame
UdpServerFrame = pb.UdpServerFrame
UdpClientFrames = pb.UdpClientFrames
UdpServerFrames = pb.UdpServerFrames
UdpOpen = pb.UdpOpen
UdpOpened = pb.UdpOpened
Datagram = pb.Datagram
DatagramBatch = pb.DatagramBatch
PeerFailure = pb.PeerFailure
SourceRoute = pb.SourceRoute
FAMILY_INET = pb.INET
FAMILY_INET6 = pb.INET6
WatchFilesRequest = pb.WatchFilesRequest
FileTree = pb.FileTree
FileEntry = pb.FileEntry
FileKind = pb.FileKind
FILE_NONE = pb.FILE_KIND_UNSPECIFIED
FILE_DIRECTORY = pb.DIRECTORY
FILE_REGULAR = pb.REGULAR
FILE_SYMLINK = pb.SYMLINK

TcpContext = grpc.aio.ServicerContext[pb.TcpClientFrame, pb.TcpServerFrame]
UdpContext = grpc.aio.ServicerContext[pb.UdpClientFrame, pb.UdpServerFrame]
HandshakeContext = grpc.aio.ServicerContext[pb.HandshakeRequest, pb.HandshakeReply]
FilesContext = grpc.aio.ServicerContext[pb.WatchFilesRequest, pb.FileTree]


class AgentService(Protocol):
    """What the generated ``add_AgentServicer_to_server`` calls, method by method."""

    async def Handshake(self, request: pb.HandshakeRequest, context: HandshakeContext) -> pb.HandshakeReply: ...

    async def Connect(self, request_iterator: Any, context: TcpContext) -> None: ...

    async def Datagrams(self, request_iterator: Any, context: UdpContext) -> None: ...

    async def DatagramSessions(self, request_iterator: Any, context: UdpContext) -> None: ...

    async def WatchFiles(self, request: pb.WatchFilesRequest, context: FilesContext) -> None: ...


def register(service: AgentService, server: grpc.aio.Server) -> None:
    """Serve ``service`` as ``ktrace.tunnel.v1.Agent`` on ``server``."""
    _pb_grpc.add_AgentServicer_to_server(service, server)  # type: ignore[no-untyped-call]


class AddressError(ValueError):
    """An ``Address`` message that is not a valid IP endpoint."""


def decode_address(address: pb.Address) -> tuple[IPAddress, int]:
    if len(address.ip) not in (4, 16):
        raise AddressError(f"address has {len(address.ip)} bytes of IP, expected 4 or 16")
    if not 0 <= address.port <= 0xFFFF:
        raise AddressError(f"port {address.port} out of range")
    ip = ipaddress.ip_address(address.ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, address.port


def encode_address(ip: IPAddress | str, port: int) -> pb.Address:
    parsed = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return pb.Address(ip=parsed.packed, port=port)


def wire_family(family: int) -> pb.Family:
    return pb.INET6 if family == socket.AF_INET6 else pb.INET


def sockaddr_for(ip: IPAddress, port: int, family: int) -> tuple[str, int]:
    """The sockaddr tuple for ``ip`` on a socket of ``family`` (IPv4 on AF_INET6 → v4-mapped)."""
    if family == socket.AF_INET6 and isinstance(ip, ipaddress.IPv4Address):
        return f"::ffff:{ip}", port
    return str(ip), port
