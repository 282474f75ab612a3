"""The only contact of ktrace and the agent with the generated gRPC code (``ktrace_proto``).

The generated ``*_pb2_grpc`` module is untyped: the client's stub (``Stub``) and the servicer the
agent registers (``AgentService``, ``register``) are typed here, and the message classes are
re-exported from the typed ``*_pb2`` module so every other module imports one place. Also the
settings both ends of the channel must agree on (keepalive, message size) and the bearer token.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

import grpc
import grpc.aio

from ktrace_proto import tunnel_v1_pb2 as pb
from ktrace_proto import tunnel_v1_pb2_grpc as _pb_grpc

from . import MAX_MESSAGE_BYTES

# Message classes, re-exported.
Address = pb.Address
Failure = pb.Failure
HandshakeRequest = pb.HandshakeRequest
HandshakeReply = pb.HandshakeReply
TcpClientFrame = pb.TcpClientFrame
TcpServerFrame = pb.TcpServerFrame
TcpOpen = pb.TcpOpen
TcpOpened = pb.TcpOpened
TcpRelayed = pb.TcpRelayed
TcpOptions = pb.TcpOptions
DeskRequest = pb.DeskRequest
DeskAnswer = pb.DeskAnswer
UdpClientFrame = pb.UdpClientFrame
UdpServerFrame = pb.UdpServerFrame
UdpClientFrames = pb.UdpClientFrames
UdpServerFrames = pb.UdpServerFrames
UdpOpen = pb.UdpOpen
UdpOpened = pb.UdpOpened
Datagram = pb.Datagram
PeerFailure = pb.PeerFailure
SourceRoute = pb.SourceRoute
Family = pb.Family
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

# The client's calls.
TcpCall = grpc.aio.StreamStreamCall[pb.TcpClientFrame, pb.TcpServerFrame]
UdpCall = grpc.aio.StreamStreamCall[pb.UdpClientFrame, pb.UdpServerFrame]
FilesCall = grpc.aio.UnaryStreamCall[pb.WatchFilesRequest, pb.FileTree]

# The agent's ends of them.
TcpContext = grpc.aio.ServicerContext[pb.TcpClientFrame, pb.TcpServerFrame]
UdpContext = grpc.aio.ServicerContext[pb.UdpClientFrame, pb.UdpServerFrame]
HandshakeContext = grpc.aio.ServicerContext[pb.HandshakeRequest, pb.HandshakeReply]
FilesContext = grpc.aio.ServicerContext[pb.WatchFilesRequest, pb.FileTree]


class Stub:
    """Typed view of the generated ``AgentStub`` (the client's)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub = _pb_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        self.handshake: grpc.aio.UnaryUnaryMultiCallable[pb.HandshakeRequest, pb.HandshakeReply] = stub.Handshake
        self.connect: grpc.aio.StreamStreamMultiCallable[pb.TcpClientFrame, pb.TcpServerFrame] = stub.Connect
        self.datagram_sessions: grpc.aio.StreamStreamMultiCallable[pb.UdpClientFrame, pb.UdpServerFrame] = (
            stub.DatagramSessions
        )
        self.watch_files: grpc.aio.UnaryStreamMultiCallable[pb.WatchFilesRequest, pb.FileTree] = stub.WatchFiles


class AgentService(Protocol):
    """What the generated ``add_AgentServicer_to_server`` calls, method by method (the agent's)."""

    async def Handshake(self, request: pb.HandshakeRequest, context: HandshakeContext) -> pb.HandshakeReply: ...

    async def Connect(self, request_iterator: Any, context: TcpContext) -> None: ...

    async def DatagramSessions(self, request_iterator: Any, context: UdpContext) -> None: ...

    async def WatchFiles(self, request: pb.WatchFilesRequest, context: FilesContext) -> None: ...


def register(service: AgentService, server: grpc.aio.Server) -> None:
    """Serve ``service`` as ``ktrace.tunnel.v1.Agent`` on ``server``."""
    _pb_grpc.add_AgentServicer_to_server(service, server)  # type: ignore[no-untyped-call]


# One channel carries every stream for the life of a traced program, often idle: the client pings
# every 10 s so a dead port-forward is noticed, and the agent allows that (a ping every 5 s without
# data at most, never counted as abuse); a client's pings beyond what the agent allows would make
# the agent close the connection (GOAWAY too_many_pings).
CLIENT_PING_MS = 10_000
AGENT_MIN_PING_INTERVAL_MS = 5_000

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", CLIENT_PING_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # After a drop, reconnect within a fraction of a second, not gRPC's default 1 s doubling to
    # 2 min: the local end (a Unix socket, or the port-forward bridge) answers at once.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def server_options(max_concurrent_streams: int) -> list[tuple[str, Any]]:
    """The agent's server options; ``max_concurrent_streams`` is HTTP/2's bound per connection."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", AGENT_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
    ]


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
    """The session token as every RPC carries it (the agent's ``listen.TokenCheck`` reads it)."""
    return (("authorization", f"Bearer {token}"),) if token is not None else ()
