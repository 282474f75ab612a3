"""The client's only contact with the generated gRPC code (``ktrace_proto``).

The generated ``*_pb2_grpc`` module is untyped: ``AgentStub`` is re-typed here, and
the message classes are re-exported from the typed ``*_pb2`` module. Also the pure
codec between ``Address`` messages and ``Endpoint`` and the channel options.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import grpc
import grpc.aio

from ktrace_proto import tunnel_v1_pb2 as pb
from ktrace_proto import tunnel_v1_pb2_grpc as _pb_grpc

from .types import Endpoint

PROTOCOL_VERSION = 1

Address = pb.Address
Failure = pb.Failure
HandshakeRequest = pb.HandshakeRequest
HandshakeReply = pb.HandshakeReply
TcpClientFrame = pb.TcpClientFrame
TcpServerFrame = pb.TcpServerFrame
TcpOpen = pb.TcpOpen
UdpClientFrame = pb.UdpClientFrame
UdpServerFrame = pb.UdpServerFrame
UdpClientFrames = pb.UdpClientFrames
UdpServerFrames = pb.UdpServerFrames
UdpOpen = pb.UdpOpen
Datagram = pb.Datagram
DatagramBatch = pb.DatagramBatch
PeerFailure = pb.PeerFailure
SourceRoute = pb.SourceRoute
FAMILY_INET = pb.INET
FAMILY_INET6 = pb.INET6
WatchFilesRequest = pb.WatchFilesRequest
FileTree = pb.FileTree
FileEntry = pb.FileEntry
FILE_DIRECTORY = pb.DIRECTORY
FILE_REGULAR = pb.REGULAR
FILE_SYMLINK = pb.SYMLINK

TcpCall = grpc.aio.StreamStreamCall[pb.TcpClientFrame, pb.TcpServerFrame]
UdpCall = grpc.aio.StreamStreamCall[pb.UdpClientFrame, pb.UdpServerFrame]
FilesCall = grpc.aio.UnaryStreamCall[pb.WatchFilesRequest, pb.FileTree]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# One channel carries every stream for the life of a traced program, often idle:
# ping every 10 s (the agent allows it) so a dead port-forward is noticed.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # After a drop, reconnect within a fraction of a second, not gRPC's default 1 s doubling to
    # 2 min: the local end (a Unix socket, or the port-forward bridge) answers at once.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class Stub:
    """Typed view of the generated ``AgentStub``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub = _pb_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        self.handshake: grpc.aio.UnaryUnaryMultiCallable[pb.HandshakeRequest, pb.HandshakeReply] = stub.Handshake
        self.connect: grpc.aio.StreamStreamMultiCallable[pb.TcpClientFrame, pb.TcpServerFrame] = stub.Connect
        self.datagrams: grpc.aio.StreamStreamMultiCallable[pb.UdpClientFrame, pb.UdpServerFrame] = stub.Datagrams
        self.datagram_sessions: grpc.aio.StreamStreamMultiCallable[pb.UdpClientFrame, pb.UdpServerFrame] = (
            stub.DatagramSessions
        )
        self.watch_files: grpc.aio.UnaryStreamMultiCallable[pb.WatchFilesRequest, pb.FileTree] = stub.WatchFiles


def decode_address(address: pb.Address) -> Endpoint:
    if len(address.ip) not in (4, 16) or address.port > 0xFFFF:
        raise ValueError(f"malformed address from agent ({len(address.ip)} IP bytes, port {address.port})")
    return Endpoint(ipaddress.ip_address(address.ip), address.port)


def encode_address(endpoint: Endpoint) -> pb.Address:
    ip = endpoint.ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # the wire carries v4-mapped addresses as plain IPv4
    return pb.Address(ip=ip.packed, port=endpoint.port)


def grpc_target(address: str) -> str:
    """``unix:/p`` stays; IP ``host:port`` / ``[v6]:port`` become gRPC's ``ipv4:``/``ipv6:`` targets."""
    if address.startswith("unix:"):
        return address
    if address.startswith("["):
        return f"ipv6:{address}"
    host = address.rpartition(":")[0]
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return address  # a name: let gRPC resolve it
    return f"ipv4:{address}"


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()
