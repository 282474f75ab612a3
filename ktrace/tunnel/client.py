"""``AgentClient``: one gRPC channel to the agent, shared by every TCP and UDP stream.

``connect`` does the handshake and turns every way it can fail into one
``AgentUnavailable`` line with a hint; after that, failures of single streams are
``TunnelError`` with an errno name from the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import grpc.aio
from ktrace_agent.wire import PROTOCOL_VERSION, codec, rpc, tuning
from ktrace_agent.wire.budget import SendBudget

from .. import __version__
from .call_pool import CallPool
from .desk import DeskClient, DeskDial
from .eager import StartedNow
from .handover import HandoverLine
from .health import TunnelHealth, short_reason
from .tcp_stream import TcpStream
from .types import (
    DNS_PORT,
    AgentUnavailable,
    Connection,
    Endpoint,
    IPAddress,
    SourceRoute,
    TcpStats,
    TunnelError,
    TunnelLost,
)
from .udp_mux import UdpMux
from .udp_session import Session, SessionSpares

__all__ = [
    "AgentClient",
    "AgentInfo",
    "AgentUnavailable",
    "TcpStats",
    "TcpStream",
    "TunnelError",
]

log = logging.getLogger("ktrace.tunnel")

# How long a new connection waits for a lost tunnel to come back when no connect timeout was
# given: the agent's own default dial timeout.
TUNNEL_WAIT = 10.0
# How long a lost desk line's replacement waits for the agent to answer a handshake again.
DESK_RENEWAL_WAIT = 30.0
# Connect streams kept started ahead of need (see call_pool.py).
SPARE_CALLS = 2
# Idle Connect streams kept for reuse after their connection ended (call_pool.py): enough for
# a program's bursts of short connections; beyond that a stream ends as without reuse.
KEEP_TCP_CALLS = 16
# UDP sessions kept open ahead of need, per address family in use (udp_session.SessionSpares):
# up to 6, replaced 4 at a time once 2 are left, so their open frames and the agent's answers
# travel 4 to a message on the shared stream.
SPARE_UDP_SESSIONS = 6
SPARE_UDP_LOW = 2
# Seconds without a new stream or UDP session after which ktrace gives its freed memory back
# to the kernel (ktrace_agent/wire/tuning.py, Trimmer): RSS goes down while the program idles.
TRIM_AFTER_QUIET = 10.0


@dataclass(frozen=True)
class AgentInfo:
    version: str
    hostname: str
    addresses: tuple[IPAddress, ...]
    resolv_conf: str
    hosts: str
    max_message_bytes: int
    # Per IP version the agent told: its source towards the cluster.
    source_routes: tuple[SourceRoute, ...] = ()
    tcp_stream_reuse: bool = False  # a Connect stream can carry one connection after another
    file_roots: tuple[bytes, ...] = ()  # the target container's paths the agent serves (WatchFiles)
    tcp_handover_path: str = ""  # where a same-host agent takes connections over (handover.py)
    tcp_handover_id: bytes = b""
    tcp_desk_key: bytes = b""  # the same agent dials on a keyed line to that path (desk.py)
    tcp_options: bool = False  # it sets the program's keepalive options on its own sockets


DEFAULT_UNREACHABLE_HINT = "is it running, and is the port-forward up?"


def _hint(code: grpc.StatusCode, address: str, unreachable: str = DEFAULT_UNREACHABLE_HINT) -> str:
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "the agent rejected the session token (hint: the agent was started with another token)"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the agent at {address} (hint: {unreachable})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the agent at {address} did not answer in time (hint: {unreachable})"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{address} is not a ktrace agent, or a too old one (hint: {_IMAGE_HINT})"
    return f"agent handshake failed at {address}: {code.name}"


_IMAGE_HINT = f"use the agent of ktrace {__version__}; `ktrace image build` makes its image"


def mismatch(reply: rpc.HandshakeReply, address: str) -> str | None:
    """Why the agent that sent ``reply`` cannot serve this ktrace (one line), or None when it can:
    another protocol version, or one without what this version requires (ktrace_agent.wire)."""
    agent = f"the agent at {address} (ktrace-agent {reply.agent_version or 'of unknown version'})"
    if reply.protocol_version != PROTOCOL_VERSION:
        return (
            f"{agent} speaks tunnel protocol {reply.protocol_version}, ktrace {__version__} speaks "
            f"{PROTOCOL_VERSION} (hint: {_IMAGE_HINT})"
        )
    if not reply.udp_multiplex:
        return f"{agent} does not offer DatagramSessions, which ktrace {__version__} needs (hint: {_IMAGE_HINT})"
    return None


def _parse_info(reply: rpc.HandshakeReply) -> AgentInfo:
    addresses: list[IPAddress] = []
    for raw in reply.addresses:
        with contextlib.suppress(codec.AddressError):
            addresses.append(codec.decode_ip(raw))
    return AgentInfo(
        version=reply.agent_version,
        hostname=reply.hostname,
        addresses=tuple(addresses),
        resolv_conf=reply.resolv_conf,
        hosts=reply.hosts,
        max_message_bytes=reply.max_message_bytes,
        source_routes=_parse_source_routes(reply.source_routes),
        tcp_stream_reuse=reply.tcp_stream_reuse,
        file_roots=tuple(reply.file_roots),
        tcp_handover_path=reply.tcp_handover_path,
        tcp_handover_id=reply.tcp_handover_id,
        tcp_desk_key=reply.tcp_desk_key,
        tcp_options=reply.tcp_options,
    )


def _parse_source_routes(routes: Iterable[rpc.SourceRoute]) -> tuple[SourceRoute, ...]:
    """The first usable entry per IP version; malformed ones are ignored (the kernel answers then)."""
    found: dict[int, SourceRoute] = {}
    for route in routes:
        version = codec.ip_version(route.family)
        if version is None or version in found:
            continue
        if route.ip:
            try:
                ip = codec.decode_ip(route.ip)
            except codec.AddressError:
                continue
            if ip.version == version and not ip.is_unspecified:
                found[version] = SourceRoute(version, ip)
        elif route.errno_name:
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
        # Every UDP session is one of many on a shared stream. A stream started while the tunnel
        # is down waits for it (wait_for_ready), as a connect does (open_tcp): its sessions'
        # datagrams, queued and bounded per session, then leave when the agent is back, where
        # without it the program's datagrams were dropped and a resolver asked again only after
        # its timeout (glibc: 5 s).
        self._udp_mux = UdpMux(lambda: self._stub.datagram_sessions(metadata=metadata, wait_for_ready=True))
        self._udp_sessions = SessionSpares(self._udp_mux.start, SPARE_UDP_SESSIONS, SPARE_UDP_LOW)
        self.send_budget = SendBudget()  # bounds memory with many busy connections
        self.health = TunnelHealth()
        self._watcher: asyncio.Task[None] | None = None
        self._trimmer = tuning.Trimmer(TRIM_AFTER_QUIET)
        self._handover: HandoverLine | None = None
        self._desk: DeskClient | None = None
        self._desk_renewal: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        address: str,
        token: str | None,
        *,
        timeout: float = 10.0,
        wait_for_ready: bool = True,
        unreachable_hint: str = DEFAULT_UNREACHABLE_HINT,
        handover: bool = False,
    ) -> AgentClient:
        """Open the channel to ``address`` (``unix:/p`` or ``host:port``) and do the handshake.

        ``wait_for_ready``: keep trying to connect until ``timeout`` (a port-forward that is
        still being set up); without it an address where nothing listens fails at once.
        ``handover``: hand the program's connections to an agent on this host that offers it
        (``handover.py``), so it relays them itself; the others go through the tunnel.
        """
        channel = grpc.aio.insecure_channel(rpc.grpc_target(address), options=rpc.CHANNEL_OPTIONS)
        try:
            stub = rpc.Stub(channel)
            request = rpc.HandshakeRequest(client_version=__version__, protocol_version=PROTOCOL_VERSION)
            reply = await stub.handshake(
                request, metadata=rpc.bearer_metadata(token), timeout=timeout, wait_for_ready=wait_for_ready
            )
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            raise AgentUnavailable(_hint(exc.code(), address, unreachable_hint)) from exc
        except BaseException:
            await channel.close()
            raise
        problem = mismatch(reply, address)
        if problem is not None:
            await channel.close()
            raise AgentUnavailable(problem)
        client = cls(channel, token, _parse_info(reply))
        if handover and client.info.tcp_handover_path:
            info = client.info
            if info.tcp_desk_key:
                client._desk = await DeskClient.connect(
                    info.tcp_handover_path, info.tcp_handover_id, info.tcp_desk_key, options=info.tcp_options
                )
            if client._desk is None:
                client._handover = await HandoverLine.connect(info.tcp_handover_path, info.tcp_handover_id)
        client.prime()
        return client

    @property
    def hands_over(self) -> bool:
        """Connections are handed to the agent (a same-host agent offered it and was reached)."""
        return self._handover is not None or self._desk is not None

    def prime(self) -> None:
        """Start the spare streams and the channel's watcher (needs the running loop)."""
        self._tcp_calls.fill()
        self._udp_mux.prime()
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

    async def ping(self, timeout: float = 10.0, *, wait_for_ready: bool = False) -> rpc.HandshakeReply:
        """A handshake on the open channel: proves the path to the agent works and keeps an agent
        started with ``--idle-exit`` from exiting while ktrace runs."""
        request = rpc.HandshakeRequest(client_version=__version__, protocol_version=PROTOCOL_VERSION)
        return await self._stub.handshake(
            request, metadata=self._metadata, timeout=timeout, wait_for_ready=wait_for_ready
        )

    def _renew_desk(self, lost: TunnelLost) -> None:
        """Once the line to the desk is lost (the agent went away, or restarted with a new desk):
        connections go through the tunnel, which waits for an agent, while the agent that answers
        now is asked for its desk again; a new line to it is used from then on."""
        log.debug("desk line lost (%s): connections go through the tunnel", lost.message)
        if self._desk is not None:
            self._desk.close()
            self._desk = None
        if self._desk_renewal is None or self._desk_renewal.done():
            self._desk_renewal = asyncio.get_running_loop().create_task(self._new_desk())

    async def _new_desk(self) -> None:
        try:
            reply = await self.ping(DESK_RENEWAL_WAIT, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            log.debug("desk: no new handshake (%s); connections stay in the tunnel", exc.code().name)
            return
        if reply.tcp_desk_key and reply.tcp_handover_path and self._desk is None:
            self._desk = await DeskClient.connect(
                reply.tcp_handover_path, reply.tcp_handover_id, reply.tcp_desk_key, options=reply.tcp_options
            )

    def start_tcp(
        self,
        dest: Endpoint,
        timeout: float | None = None,
        *,
        parked: Callable[[], tuple[socket.socket, socket.socket] | None] | None = None,
        on_opened: Callable[[Endpoint], None] | None = None,
    ) -> DeskDial | StartedNow[Connection]:
        """``open_tcp``, with what can leave for the agent now already sent (a same-host agent's
        request: the dial starts while the program's connect() stop is still being handled).

        ``parked`` (a socket bound to the parking address, and the program's parked socket; or
        None) is asked for when a same-host agent can complete the program's connect itself
        (desk.py); ``on_opened`` then hears the agent's address as soon as the agent has connected."""
        self._trimmer.poke()
        # DNS over TCP stays in the tunnel: ktrace reads its answers (the DNS map).
        if self._desk is not None and dest.port != DNS_PORT:
            try:
                return self._desk.dial(
                    dest,
                    timeout,
                    lambda lost: self._desk_lost(lost, dest, timeout),
                    parked=None if parked is None else parked(),
                    on_opened=on_opened,
                )
            except TunnelLost as lost:
                self._renew_desk(lost)
        # The open frame's write starts now, in the stop, ahead of what else the loop has ready.
        return StartedNow(self._open_in_tunnel(dest, timeout))

    def catch_up(self) -> None:
        """Take what a same-host agent has answered on its desk line, now (``DeskClient.catch_up``)."""
        if self._desk is not None:
            self._desk.catch_up()

    async def _desk_lost(self, lost: TunnelLost, dest: Endpoint, timeout: float | None) -> Connection:
        self._renew_desk(lost)
        return await self._open_in_tunnel(dest, timeout)

    async def open_tcp(self, dest: Endpoint, timeout: float | None = None) -> Connection:
        """Have the agent connect to ``dest``; raises ``TunnelError`` with the agent's errno on failure."""
        return await self.start_tcp(dest, timeout)

    async def _open_in_tunnel(self, dest: Endpoint, timeout: float | None) -> Connection:
        """A ``Connect`` stream to ``dest``.

        While the tunnel is down (a port-forward being re-established), the connect waits for
        it, up to ``timeout`` (or the agent's default dial timeout), as a SYN would wait on a
        network that came back; then it fails with ETIMEDOUT, never with a made-up error.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else TUNNEL_WAIT)
        while True:
            try:
                stream = await TcpStream.open(
                    self._tcp_calls,
                    dest,
                    timeout,
                    self.send_budget,
                    reuse=self.info.tcp_stream_reuse,
                    handover=self._handover if dest.port != DNS_PORT else None,
                    options=self.info.tcp_options,
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
        """A UDP socket on the agent (``socket.AF_INET`` or ``AF_INET6``), once the agent answered."""
        return await self._udp_mux.open(family)

    async def close(self) -> None:
        self._trimmer.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._udp_sessions.close()
        await self._udp_mux.close()
        self._tcp_calls.close()
        if self._handover is not None:
            self._handover.close()
        if self._desk_renewal is not None:
            self._desk_renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._desk_renewal
        if self._desk is not None:
            self._desk.close()
        await self._channel.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def wait_closed(session: Session, timeout: float) -> None:
    """Wait for a UDP session to end (tests, shutdown)."""
    await asyncio.wait_for(session.closed.wait(), timeout)
