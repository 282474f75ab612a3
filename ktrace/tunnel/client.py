"""``AgentClient``: one gRPC channel to the agent, shared by every TCP and UDP stream.

``connect`` does the handshake and turns every way it can fail into one
``AgentUnavailable`` line with a hint; after that, failures of single streams are
``TunnelError`` with an errno name from the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import grpc.aio
from ktrace_agent import tuning
from ktrace_agent.budget import SendBudget

from .. import __version__
from . import rpc
from .call_pool import CallPool
from .health import TunnelHealth, short_reason
from .tcp_stream import TcpStream
from .types import AgentUnavailable, Endpoint, IPAddress, SourceRoute, TcpStats, TunnelError, TunnelLost
from .udp_mux import UdpMux
from .udp_session import Session, SessionSpares, UdpSession

__all__ = [
    "AgentClient",
    "AgentInfo",
    "AgentUnavailable",
    "TcpStats",
    "TcpStream",
    "TunnelError",
    "UdpSession",
]


# How long a new connection waits for a lost tunnel to come back when no connect timeout was
# given: the agent's own default dial timeout.
TUNNEL_WAIT = 10.0
# Streams kept started ahead of need, per kind (see call_pool.py), and UDP sessions kept
# open ahead of need, per address family in use (see udp_session.SessionSpares).
SPARE_CALLS = 2
# Idle Connect streams kept for reuse after their connection ended (call_pool.py): enough for
# a program's bursts of short connections; beyond that a stream ends as without reuse.
KEEP_TCP_CALLS = 16
SPARE_UDP_SESSIONS = 2
# On a shared DatagramSessions stream: up to 6 spares, replaced 4 at a time once 2 are left,
# so their open frames and the agent's answers travel 4 to a message.
MUX_SPARE_UDP_SESSIONS = 6
MUX_SPARE_LOW = 2
# TCP data queued in gRPC by all streams together, and how long a write waits for it
# (ktrace_agent/budget.py): bounds memory with many busy connections.
SEND_BUDGET_BYTES = 16 * 1024 * 1024
SEND_BUDGET_WAIT = 0.5
# Seconds without a new stream or UDP session after which ktrace gives its freed memory back
# to the kernel (ktrace_agent/tuning.py, Trimmer): RSS goes down while the program idles.
TRIM_AFTER_QUIET = 10.0


@dataclass(frozen=True)
class AgentInfo:
    version: str
    hostname: str
    addresses: tuple[IPAddress, ...]
    resolv_conf: str
    hosts: str
    max_message_bytes: int
    datagram_batches: bool = False  # the agent accepts several datagrams in one frame
    # Per IP version the agent told (none from an older agent): its source towards the cluster.
    source_routes: tuple[SourceRoute, ...] = ()
    tcp_stream_reuse: bool = False  # a Connect stream can carry one connection after another
    udp_multiplex: bool = False  # UDP sessions can share DatagramSessions streams
    file_roots: tuple[bytes, ...] = ()  # the target container's paths the agent serves (WatchFiles)


DEFAULT_UNREACHABLE_HINT = "is it running, and is the port-forward up?"


def _hint(code: grpc.StatusCode, address: str, unreachable: str = DEFAULT_UNREACHABLE_HINT) -> str:
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "the agent rejected the session token (hint: the agent was started with another token)"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the agent at {address} (hint: {unreachable})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the agent at {address} did not answer in time (hint: {unreachable})"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{address} is not a ktrace agent, or a too old one (hint: check the agent image version)"
    return f"agent handshake failed at {address}: {code.name}"


def _parse_info(reply: rpc.HandshakeReply) -> AgentInfo:
    addresses: list[IPAddress] = []
    for raw in reply.addresses:
        if len(raw) in (4, 16):
            addresses.append(ipaddress.ip_address(raw))
    return AgentInfo(
        version=reply.agent_version,
        hostname=reply.hostname,
        addresses=tuple(addresses),
        resolv_conf=reply.resolv_conf,
        hosts=reply.hosts,
        max_message_bytes=reply.max_message_bytes,
        datagram_batches=reply.datagram_batches,
        source_routes=_parse_source_routes(reply.source_routes),
        tcp_stream_reuse=reply.tcp_stream_reuse,
        udp_multiplex=reply.udp_multiplex,
        file_roots=tuple(reply.file_roots),
    )


_IP_VERSIONS = {rpc.FAMILY_INET: 4, rpc.FAMILY_INET6: 6}


def _parse_source_routes(routes: Iterable[rpc.SourceRoute]) -> tuple[SourceRoute, ...]:
    """The first usable entry per IP version; malformed ones are ignored (the kernel answers then)."""
    found: dict[int, SourceRoute] = {}
    for route in routes:
        version = _IP_VERSIONS.get(route.family)
        if version is None or version in found:
            continue
        if len(route.ip) in (4, 16):
            ip = ipaddress.ip_address(route.ip)
            if ip.version == version and not ip.is_unspecified:
                found[version] = SourceRoute(version, ip)
        elif not route.ip and route.errno_name:
            found[version] = SourceRoute(version, None, route.errno_name)
    return tuple(found[version] for version in sorted(found))


class AgentClient:
    def __init__(self, channel: grpc.aio.Channel, token: str | None, info: AgentInfo) -> None:
        self._channel = channel
        self._stub = rpc.Stub(channel)
        self._metadata = rpc.bearer_metadata(token)
        self.info = info
        metadata = self._metadata
        self._tcp_calls = CallPool(lambda: self._stub.connect(metadata=metadata), SPARE_CALLS, KEEP_TCP_CALLS)
        self._udp_calls = CallPool(lambda: self._stub.datagrams(metadata=metadata), SPARE_CALLS)
        # With an agent that offers it, every UDP session is one of many on a shared stream;
        # else each has a stream of its own (the spare calls above). A shared stream started
        # while the tunnel is down waits for it (wait_for_ready), as a connect does
        # (open_tcp): its sessions' datagrams, queued and bounded per session, then leave
        # when the agent is back, where without it the program's datagrams were dropped and
        # a resolver asked again only after its timeout (glibc: 5 s).
        self._udp_mux = (
            UdpMux(lambda: self._stub.datagram_sessions(metadata=metadata, wait_for_ready=True))
            if info.udp_multiplex
            else None
        )
        if self._udp_mux is not None:
            self._udp_sessions = SessionSpares(self._new_udp_session, MUX_SPARE_UDP_SESSIONS, MUX_SPARE_LOW)
        else:
            self._udp_sessions = SessionSpares(self._new_udp_session, SPARE_UDP_SESSIONS)
        self.send_budget = SendBudget(SEND_BUDGET_BYTES, SEND_BUDGET_WAIT)
        self.health = TunnelHealth()
        self._watcher: asyncio.Task[None] | None = None
        self._trimmer = tuning.Trimmer(TRIM_AFTER_QUIET)

    @classmethod
    async def connect(
        cls,
        address: str,
        token: str | None,
        *,
        timeout: float = 10.0,
        wait_for_ready: bool = True,
        unreachable_hint: str = DEFAULT_UNREACHABLE_HINT,
    ) -> AgentClient:
        """Open the channel to ``address`` (``unix:/p`` or ``host:port``) and do the handshake.

        ``wait_for_ready``: keep trying to connect until ``timeout`` (a port-forward that is
        still being set up); without it an address where nothing listens fails at once.
        """
        channel = grpc.aio.insecure_channel(rpc.grpc_target(address), options=rpc.CHANNEL_OPTIONS)
        try:
            stub = rpc.Stub(channel)
            request = rpc.HandshakeRequest(client_version=__version__, protocol_version=rpc.PROTOCOL_VERSION)
            reply = await stub.handshake(
                request, metadata=rpc.bearer_metadata(token), timeout=timeout, wait_for_ready=wait_for_ready
            )
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            raise AgentUnavailable(_hint(exc.code(), address, unreachable_hint)) from exc
        except BaseException:
            await channel.close()
            raise
        if reply.protocol_version != rpc.PROTOCOL_VERSION:
            await channel.close()
            raise AgentUnavailable(
                f"the agent at {address} speaks tunnel protocol {reply.protocol_version}, ktrace speaks "
                f"{rpc.PROTOCOL_VERSION} (hint: use an agent image of the same ktrace version)"
            )
        client = cls(channel, token, _parse_info(reply))
        client.prime()
        return client

    def prime(self) -> None:
        """Start the spare streams and the channel's watcher (needs the running loop)."""
        self._tcp_calls.fill()
        if self._udp_mux is not None:
            self._udp_mux.prime()
        else:
            self._udp_calls.fill()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_channel())

    async def _watch_channel(self) -> None:
        """Mark the tunnel lost when the channel fails to (re)connect and back when it is ready:
        an agent that is gone for good shows here, before any stream has waited for it."""
        state = self._channel.get_state()
        while state is not grpc.ChannelConnectivity.SHUTDOWN:
            await self._channel.wait_for_state_change(state)
            state = self._channel.get_state()
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                self.health.lost("cannot connect to it")
            elif state is grpc.ChannelConnectivity.READY:
                self.health.back()

    async def ping(self, timeout: float = 10.0) -> None:
        """A handshake on the open channel: proves the path to the agent works and keeps an agent
        started with ``--idle-exit`` from exiting while ktrace runs."""
        request = rpc.HandshakeRequest(client_version=__version__, protocol_version=rpc.PROTOCOL_VERSION)
        await self._stub.handshake(request, metadata=self._metadata, timeout=timeout)

    async def open_tcp(self, dest: Endpoint, timeout: float | None = None) -> TcpStream:
        """Have the agent connect to ``dest``; raises ``TunnelError`` with the agent's errno on failure.

        While the tunnel is down (a port-forward being re-established), the connect waits for
        it, up to ``timeout`` (or the agent's default dial timeout), as a SYN would wait on a
        network that came back; then it fails with ETIMEDOUT, never with a made-up error.
        """
        self._trimmer.poke()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else TUNNEL_WAIT)
        while True:
            try:
                stream = await TcpStream.open(
                    self._tcp_calls, dest, timeout, self.send_budget, reuse=self.info.tcp_stream_reuse
                )
            except TunnelLost as lost:
                self.health.lost(short_reason(lost.message))
                remaining = deadline - loop.time()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._channel.channel_ready(), remaining)
                        continue
                raise TunnelError("ETIMEDOUT", f"the tunnel to the agent is down ({lost.message})") from lost
            self.health.back()
            return stream

    def watch_files(self, roots: Iterable[bytes]) -> rpc.FilesCall:
        """The agent's versions of ``roots`` (each one of ``info.file_roots``), until cancelled.
        Waits for a tunnel that is down, like a connect does."""
        request = rpc.WatchFilesRequest(roots=list(roots))
        return self._stub.watch_files(request, metadata=self._metadata, wait_for_ready=True)

    def start_udp(self, family: int) -> Session:
        """A UDP socket on the agent whose datagrams may be sent before the agent answered
        (opened ahead of need when one of that family was asked for before)."""
        return self._udp_sessions.take(family)

    async def open_udp(self, family: int) -> Session:
        """A UDP socket on the agent (``socket.AF_INET`` or ``AF_INET6``)."""
        if self._udp_mux is not None:
            return await self._udp_mux.open(family)
        return await UdpSession.open(self._udp_calls, family, self.info.datagram_batches)

    def _new_udp_session(self, family: int) -> Session:
        if self._udp_mux is not None:
            return self._udp_mux.start(family)
        return UdpSession.start(self._udp_calls, family, self.info.datagram_batches)

    async def close(self) -> None:
        self._trimmer.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._udp_sessions.close()
        if self._udp_mux is not None:
            await self._udp_mux.close()
        self._tcp_calls.close()
        self._udp_calls.close()
        await self._channel.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def wait_closed(session: Session, timeout: float) -> None:
    """Wait for a UDP session to end (tests, shutdown)."""
    await asyncio.wait_for(session.closed.wait(), timeout)
