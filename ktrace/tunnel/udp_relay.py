"""Loopback UDP relays: one per (program socket, remote peer), one agent session per program socket.

The tracer makes a program's datagrams for ``peer`` arrive at ``relay_for(...)``
(a UDP socket on 127.0.0.1 or ::1), sent from the program's own socket. The relay
forwards them through the UDP session of that program socket (one ``Datagrams``
stream, so the remote side sees one stable source). Replies from ``peer`` leave
through the same relay towards the program socket's address, so a connected
socket accepts them and ``peer_of`` can restore the real source in recvfrom.

Everything here is synchronous and non-blocking (the tracer calls it from a
stop) except closing. Every queue is bounded: datagrams beyond it are dropped and
counted, as a full socket buffer would drop them. Sessions idle for
``idle_timeout`` are closed and reopened on the next datagram; relays stay until
``close_socket`` since the program may still send to their address.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .client import AgentClient
from .dns_answers import addresses_in_answer
from .local_dns import LocalResolver
from .types import Endpoint, IPAddress, TunnelError
from .udp_session import UdpSession

log = logging.getLogger("ktrace.tunnel")

PENDING_DATAGRAMS = 64  # queued per program socket while its session opens
READS_PER_WAKEUP = 64  # bound the work one readable relay can do per loop iteration
MAX_DATAGRAM = 65536
DNS_PORT = 53

DnsCallback = Callable[[str, list[IPAddress]], None]


@dataclass
class RelayTotals:
    """What crossed one relay (program socket, peer): datagrams and bytes each way."""

    datagrams_up: int = 0
    bytes_up: int = 0
    datagrams_down: int = 0
    bytes_down: int = 0


class UdpObserver(Protocol):
    """The report's view of the relays (called on the event loop; must not raise)."""

    def sent(self, sock_key: int, server: Endpoint, payload: bytes) -> None:
        """A datagram to port 53 (a DNS question)."""

    def received(self, sock_key: int, server: Endpoint, payload: bytes) -> None:
        """A datagram from port 53 (a DNS answer), before the program gets it."""

    def flow_started(self, sock_key: int, peer: Endpoint) -> None:
        """The first datagram of a program socket to ``peer``."""

    def flow_ended(self, sock_key: int, peer: Endpoint, totals: RelayTotals) -> None:
        """The relay of (socket, peer) is gone (the socket closed, or ktrace ends)."""


@dataclass
class _Relay:
    sock: socket.socket
    peer: Endpoint
    owner: _ProgramSocket
    totals: RelayTotals = field(default_factory=RelayTotals)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port


@dataclass
class _ProgramSocket:
    key: int
    family: int
    relays: dict[Endpoint, _Relay] = field(default_factory=dict)
    session: UdpSession | None = None
    opening: asyncio.Task[None] | None = None
    pending: collections.deque[tuple[Endpoint, bytes]] = field(default_factory=collections.deque)
    program_address: tuple[str, int] | None = None  # where replies go: the last source seen
    last_used: float = field(default_factory=time.monotonic)


class UdpRelays:
    def __init__(
        self,
        client: AgentClient,
        on_dns_answer: DnsCallback | None = None,
        idle_timeout: float = 120.0,
        live_sockets: Callable[[], set[int] | None] | None = None,
        on_socket_gone: Callable[[int], None] | None = None,
        on_peer_error: Callable[[int, Endpoint, str], None] | None = None,
        observer: UdpObserver | None = None,
        local_dns: LocalResolver | None = None,
    ) -> None:
        self._client = client
        # The report: flows, their totals, and every DNS message to and from port 53.
        self._observer = observer
        # Answers the questions whose names the rules keep local, instead of the cluster.
        self._local_dns = local_dns
        self._on_dns_answer = on_dns_answer
        self._idle_timeout = idle_timeout
        # Which program sockets still exist (inodes), checked at each sweep: ktrace does not
        # see close(), so this is how relays of closed sockets are reclaimed.
        self._live_sockets = live_sockets
        self._on_socket_gone = on_socket_gone
        # (program socket, peer, errno name) for ICMP errors the agent got from that peer.
        self._on_peer_error = on_peer_error
        self._sockets: dict[int, _ProgramSocket] = {}
        self._by_port: dict[tuple[int, int], _Relay] = {}
        self._ipv6: bool | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    # --- the tracer's side (synchronous) ---

    def relay_for(self, sock_key: int, family: int, peer: Endpoint) -> tuple[str, int]:
        """The loopback address the program socket ``sock_key`` should send to, to reach ``peer``."""
        state = self._sockets.get(sock_key)
        if state is None:
            state = self._sockets[sock_key] = _ProgramSocket(sock_key, family)
        relay = state.relays.get(peer) or self._new_relay(state, peer)
        host = relay.sock.getsockname()[0]
        if family == socket.AF_INET6 and relay.sock.family == socket.AF_INET:
            host = f"::ffff:{host}"  # no IPv6 loopback: an AF_INET6 socket reaches it v4-mapped
        return host, relay.port

    def peer_of(self, family: int, relay_port: int) -> Endpoint | None:
        """The remote peer a relay port stands for (to rewrite recvfrom sources)."""
        relay = self._by_port.get((self._relay_family(family), relay_port))
        return relay.peer if relay is not None else None

    def session_of(self, sock_key: int) -> UdpSession | None:
        """The open session of a program socket, if any (diagnostics, tests)."""
        state = self._sockets.get(sock_key)
        return state.session if state is not None else None

    def close_socket(self, sock_key: int) -> None:
        """The program closed its socket: drop its relays and session."""
        state = self._sockets.pop(sock_key, None)
        if state is None:
            return
        for relay in state.relays.values():
            self._close_relay(relay)
        state.relays.clear()
        self._end_session(state)

    async def close(self) -> None:
        if self._local_dns is not None:
            self._local_dns.close()
        for key in list(self._sockets):
            self.close_socket(key)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._closing_tasks:
            await asyncio.gather(*self._closing_tasks, return_exceptions=True)

    # --- relays ---

    def _relay_family(self, family: int) -> int:
        if family == socket.AF_INET6 and self._ipv6 is None:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                    probe.bind(("::1", 0))
                self._ipv6 = True
            except OSError:
                self._ipv6 = False
        return socket.AF_INET6 if family == socket.AF_INET6 and self._ipv6 else socket.AF_INET

    def _new_relay(self, state: _ProgramSocket, peer: Endpoint) -> _Relay:
        relay_family = self._relay_family(state.family)
        sock = socket.socket(relay_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("::1" if relay_family == socket.AF_INET6 else "127.0.0.1", 0))
        except BaseException:
            sock.close()
            raise
        relay = _Relay(sock, peer, state)
        state.relays[peer] = relay
        self._by_port[(relay_family, relay.port)] = relay
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, relay)
        self._arm_sweeper()
        return relay

    def _close_relay(self, relay: _Relay) -> None:
        if self._observer is not None and (relay.totals.datagrams_up or relay.totals.datagrams_down):
            self._observer.flow_ended(relay.owner.key, relay.peer, relay.totals)
        self._by_port.pop((relay.sock.family, relay.port), None)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(relay.sock.fileno())
        relay.sock.close()

    def _readable(self, relay: _Relay) -> None:
        """Program → relay: forward through the session."""
        state = relay.owner
        for _ in range(READS_PER_WAKEUP):
            try:
                payload, source = relay.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # An ICMP error for an earlier reply to the program (its socket closed): nothing to do.
                log.debug("UDP relay %d: %s", relay.port, exc)
                continue
            state.program_address = source[:2]
            state.last_used = time.monotonic()
            if self._observer is not None and not relay.totals.datagrams_up:
                self._observer.flow_started(state.key, relay.peer)
            relay.totals.datagrams_up += 1
            relay.totals.bytes_up += len(payload)
            self._forward(state, relay.peer, payload)

    def _forward(self, state: _ProgramSocket, peer: Endpoint, payload: bytes) -> None:
        if peer.port == DNS_PORT:
            if self._observer is not None:
                self._observer.sent(state.key, peer, payload)
            if self._local_dns is not None and self._local_dns.wants(payload):
                self._local_dns.forward(payload, lambda answer: self._from_remote(state, peer, answer))
                return
        if state.session is not None and not state.session.closed.is_set():
            if not state.session.send(peer, payload):
                self.dropped += 1
            return
        if len(state.pending) >= PENDING_DATAGRAMS:
            self.dropped += 1
            return
        state.pending.append((peer, payload))
        if state.opening is None:
            state.session = None
            state.opening = asyncio.create_task(self._open_session(state))

    async def _open_session(self, state: _ProgramSocket) -> None:
        session_family = socket.AF_INET6 if state.family == socket.AF_INET6 else socket.AF_INET
        try:
            session = await self._client.open_udp(session_family)
        except (TunnelError, OSError) as exc:
            log.warning("UDP session for socket %d failed: %s", state.key, exc)
            self.dropped += len(state.pending)
            state.pending.clear()
            state.opening = None
            return
        if self._sockets.get(state.key) is not state:  # closed meanwhile
            await session.close()
            return
        session.set_receiver(lambda source, payload: self._from_remote(state, source, payload))
        session.set_peer_error_receiver(lambda peer, error: self._peer_error(state, peer, error))
        state.session = session
        state.opening = None
        while state.pending:
            peer, payload = state.pending.popleft()
            if not session.send(peer, payload):
                self.dropped += 1

    # --- remote → program ---

    def _from_remote(self, state: _ProgramSocket, source: Endpoint, payload: bytes) -> None:
        state.last_used = time.monotonic()
        if source.port == DNS_PORT and self._observer is not None:
            self._observer.received(state.key, source, payload)
        if source.port == DNS_PORT and self._on_dns_answer is not None:
            answer = addresses_in_answer(payload)
            if answer is not None and answer[1]:
                try:
                    self._on_dns_answer(*answer)
                except Exception:
                    log.exception("on_dns_answer callback failed")
        if self._sockets.get(state.key) is not state or state.program_address is None:
            self.dropped += 1
            return
        relay = state.relays.get(source)
        if relay is None:
            # A reply from a peer the program never sent to: it still deserves a faithful source.
            try:
                relay = self._new_relay(state, source)
            except OSError:
                self.dropped += 1
                return
        try:
            relay.sock.sendto(payload, state.program_address)
        except OSError:
            self.dropped += 1  # the program's receive buffer is full, or its socket is gone
            return
        relay.totals.datagrams_down += 1
        relay.totals.bytes_down += len(payload)

    def _peer_error(self, state: _ProgramSocket, peer: Endpoint, error: TunnelError) -> None:
        if self._on_peer_error is not None and self._sockets.get(state.key) is state:
            self._on_peer_error(state.key, peer, error.errno_name)

    def refuse(self, sock_key: int, peer: Endpoint, program: socket.socket) -> bool:
        """Make the program's socket, connected to the relay of ``peer``, fail with
        ECONNREFUSED as a socket connected to ``peer`` itself would after a port unreachable.

        The relay's socket is closed, an empty datagram is sent from ``program`` (a duplicate
        of the program's socket) to the relay's now closed port, so the kernel's own ICMP port
        unreachable sets the error on the program's socket; then a new relay socket takes the
        same port, so the program's connection leads somewhere again. Loopback ICMP is not rate
        limited and is handled before send() returns.
        """
        state = self._sockets.get(sock_key)
        relay = state.relays.get(peer) if state is not None else None
        if state is None or relay is None:
            return False
        address = relay.sock.getsockname()[:2]
        family = relay.sock.family
        # Not _close_relay: the flow goes on (with a new socket), its totals with it.
        self._by_port.pop((family, relay.port), None)
        asyncio.get_running_loop().remove_reader(relay.sock.fileno())
        relay.sock.close()
        del state.relays[peer]
        with contextlib.suppress(OSError):  # already failing: what the program should see anyway
            program.send(b"")
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            log.warning("UDP relay for %s could not take its port back: %s", peer, exc)
            return True
        replacement = _Relay(sock, peer, state, relay.totals)
        state.relays[peer] = replacement
        self._by_port[(family, replacement.port)] = replacement
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, replacement)
        return True

    # --- idle sessions ---

    def _arm_sweeper(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self._idle_timeout / 4, self._sweep)

    def sweep(self) -> None:
        """Reclaim relays of closed program sockets and sessions idle for ``idle_timeout``
        (runs every quarter of it while there are relays)."""
        live = self._live_sockets() if self._live_sockets is not None else None
        if live is not None:
            for key in [key for key in self._sockets if key not in live]:
                self.close_socket(key)
                if self._on_socket_gone is not None:
                    self._on_socket_gone(key)
        deadline = time.monotonic() - self._idle_timeout
        for state in self._sockets.values():
            if state.session is not None and state.last_used < deadline:
                self._end_session(state)

    def _sweep(self) -> None:
        self._sweeper = None
        try:
            self.sweep()
        finally:
            if self._sockets:
                self._arm_sweeper()

    def _end_session(self, state: _ProgramSocket) -> None:
        if state.opening is not None:
            state.opening.cancel()
            state.opening = None
        session, state.session = state.session, None
        if session is not None:
            task = asyncio.create_task(session.close())
            self._closing_tasks.add(task)
            task.add_done_callback(self._closing_tasks.discard)
