"""Loopback UDP relays: one per (program socket, remote peer), one agent session per program socket.

The tracer makes a program's datagrams for ``peer`` arrive at ``relay_for(...)``
(a UDP socket on 127.0.0.1 or ::1), sent from the program's own socket. The relay
forwards them through the UDP session of that program socket (one agent socket,
so the remote side sees one stable source). Replies from ``peer`` leave
through the same relay towards the program socket's address, so a connected
socket accepts them and ``peer_of`` can restore the real source in recvfrom.

A question to port 53 asked again within its answer's TTL is answered from the DNS cache
(``dns_cache.py``), through the nameserver's relay, without the agent.

A socket connected to port 0 of a remote peer (glibc does it for every address it
sorts, RFC 6724: connect, getsockname, close) gets no relay of its own: it is connected
to a *sink*, one loopback socket per family, that never answers. Sending on such a
socket is pointless but legal; what the sink receives is handed to a relay made for it
then, so it goes on as it would have through a relay of its own.

Everything here is synchronous and non-blocking (the tracer calls it from a
stop) except closing. Every queue is bounded: datagrams beyond it are dropped and
counted, as a full socket buffer would drop them. Sessions idle for
``idle_timeout`` are closed and reopened on the next datagram; relays stay until
``close_socket`` since the program may still send to their address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .client import AgentClient
from .dns_answers import addresses_in_answer
from .dns_cache import DnsCache
from .local_dns import LocalResolver
from .types import DNS_PORT, MAX_DATAGRAM, Endpoint, IPAddress, TunnelError
from .udp_session import REFILL_DELAY, Session

log = logging.getLogger("ktrace.tunnel")

READS_PER_WAKEUP = 64  # bound the work one readable relay can do per loop iteration
# Program sockets ktrace started to track since the last sweep before the next one runs,
# whatever the timer says: each holds a relay socket here (and, once it sent, an agent
# socket) until a sweep sees it closed. A program opening sockets fast (one per DNS lookup)
# would otherwise run ktrace out of descriptors within the sweep interval (measured: 20,000
# connect/close cycles in a few seconds did, with a 20,000 descriptor limit).
SWEEP_AFTER_NEW_SOCKETS = 512
# Relay sockets kept bound ahead of need, per family, and how long after one is taken the
# next is bound: making one (socket, bind, and reading back its port) is work a program's
# first connect or send on a new socket (each glibc lookup) would otherwise wait for; later,
# the event loop is usually idle, waiting for the agent.
RELAY_SPARES = 2

DnsCallback = Callable[[str, list[IPAddress]], None]
# What a datagram's handling leaves to do once every datagram read with it is delivered.
AfterRead = list[Callable[[], None]]


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
    address: tuple[str, int]  # the relay socket's own (host, port), read once
    peer: Endpoint
    owner: _ProgramSocket
    totals: RelayTotals = field(default_factory=RelayTotals)

    @property
    def port(self) -> int:
        return self.address[1]


@dataclass
class _ProgramSocket:
    key: int
    family: int
    relays: dict[Endpoint, _Relay] = field(default_factory=dict)
    session: Session | None = None
    program_address: tuple[str, int] | None = None  # where replies go: the last source seen
    last_used: float = field(default_factory=time.monotonic)
    sink_user: tuple[int, int] | None = None  # (sink family, program port) while connected to a sink


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
        dns_cache: DnsCache | None = None,
    ) -> None:
        self._client = client
        # The report: flows, their totals, and every DNS message to and from port 53.
        self._observer = observer
        # Answers the questions whose names the rules keep local, instead of the cluster.
        self._local_dns = local_dns
        # Answers questions asked again within their TTL without the agent (dns_cache.py).
        self._dns_cache = dns_cache
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
        self._sinks: dict[int, socket.socket] = {}  # relay family -> sink
        self._sink_addresses: dict[int, tuple[str, int]] = {}  # program socket family -> sink address
        # (sink family, program socket's port) -> (program socket, the port-0 peer it connected to)
        self._sink_users: dict[tuple[int, int], tuple[int, Endpoint]] = {}
        self._new_since_sweep = 0
        # relay family -> bound sockets and their addresses, ready to become relays
        self._spare_relays: dict[int, list[tuple[socket.socket, tuple[str, int]]]] = {}
        self._relay_refills: dict[int, asyncio.TimerHandle] = {}
        self._ipv6: bool | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    # --- the tracer's side (synchronous) ---

    def relay_for(self, sock_key: int, family: int, peer: Endpoint) -> tuple[str, int]:
        """The loopback address the program socket ``sock_key`` should send to, to reach ``peer``."""
        state = self._program_socket(sock_key, family)
        relay = state.relays.get(peer) or self._new_relay(state, peer)
        return self._as_seen_by(family, relay.address[0]), relay.port

    def sink_for(self, family: int) -> tuple[str, int]:
        """Where a program socket of ``family`` connecting to port 0 of a remote peer is
        connected instead of to a relay (then tell ``connected_to_sink`` its address)."""
        address = self._sink_addresses.get(family)
        if address is None:
            relay_family = self._relay_family(family)
            sink = self._sinks.get(relay_family)
            if sink is None:
                sink, _ = self._bound(relay_family)
                self._sinks[relay_family] = sink
                asyncio.get_running_loop().add_reader(sink.fileno(), self._sink_readable, sink)
            host, port = sink.getsockname()[:2]
            address = self._sink_addresses[family] = (self._as_seen_by(family, host), port)
        return address

    def connected_to_sink(self, sock_key: int, family: int, peer: Endpoint, program_port: int) -> None:
        """The program socket ``sock_key`` (source port ``program_port``) is connected to the
        sink in place of port 0 of ``peer``."""
        state = self._program_socket(sock_key, family)
        user = (self._relay_family(family), program_port)
        self._forget_sink_user(state)
        self._sink_users[user] = (sock_key, peer)
        state.sink_user = user

    def _program_socket(self, sock_key: int, family: int) -> _ProgramSocket:
        state = self._sockets.get(sock_key)
        if state is None:
            state = self._sockets[sock_key] = _ProgramSocket(sock_key, family)
            self._new_since_sweep += 1
            if self._new_since_sweep == SWEEP_AFTER_NEW_SOCKETS and self._live_sockets is not None:
                asyncio.get_running_loop().call_soon(self.sweep)  # after the stop: the socket exists by then
            self._arm_sweeper()
        return state

    @staticmethod
    def _as_seen_by(family: int, host: str) -> str:
        if family == socket.AF_INET6 and ":" not in host:
            return f"::ffff:{host}"  # no IPv6 loopback: an AF_INET6 socket reaches it v4-mapped
        return host

    def peer_of(self, family: int, relay_port: int) -> Endpoint | None:
        """The remote peer a relay port stands for (to rewrite recvfrom sources)."""
        relay = self._by_port.get((self._relay_family(family), relay_port))
        return relay.peer if relay is not None else None

    def agent_port(self, sock_key: int) -> int | None:
        """The port of the agent socket of program socket ``sock_key``, when known now. Its session
        is opened if it has none (the one its next datagram would open): a spare, whose port is
        known if the agent has answered it already; a later call then shows the port."""
        session = self._session_now(sock_key)
        return session.local_port if session is not None and not session.closed.is_set() else None

    def _session_now(self, sock_key: int) -> Session | None:
        state = self._sockets.get(sock_key)
        if state is None:
            return None
        if state.session is None or state.session.closed.is_set():
            state.last_used = time.monotonic()
        return self._session(state)

    def _session(self, state: _ProgramSocket) -> Session:
        """The socket's open session, started (a spare taken) if it has none."""
        session = state.session
        if session is None or session.closed.is_set():
            session = state.session = self._start_session(state)
        return session

    def session_of(self, sock_key: int) -> Session | None:
        """The open session of a program socket, if any (diagnostics, tests)."""
        state = self._sockets.get(sock_key)
        return state.session if state is not None else None

    def close_socket(self, sock_key: int) -> None:
        """The program closed its socket: drop its relays and session."""
        state = self._sockets.pop(sock_key, None)
        if state is None:
            return
        self._forget_sink_user(state)
        for relay in state.relays.values():
            self._close_relay(relay)
        state.relays.clear()
        self._end_session(state)

    async def close(self) -> None:
        if self._local_dns is not None:
            self._local_dns.close()
        for key in list(self._sockets):
            self.close_socket(key)
        for sink in self._sinks.values():
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sink.fileno())
            sink.close()
        self._sinks.clear()
        self._sink_addresses.clear()
        for handle in self._relay_refills.values():
            handle.cancel()
        self._relay_refills.clear()
        for spares in self._spare_relays.values():
            for sock, _address in spares:
                sock.close()
        self._spare_relays.clear()
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

    @staticmethod
    def _bound(relay_family: int) -> tuple[socket.socket, tuple[str, int]]:
        """A new non-blocking loopback UDP socket, and the address it got."""
        sock = socket.socket(relay_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("::1" if relay_family == socket.AF_INET6 else "127.0.0.1", 0))
        except BaseException:
            sock.close()
            raise
        return sock, sock.getsockname()[:2]

    def _bound_relay_socket(self, relay_family: int) -> tuple[socket.socket, tuple[str, int]]:
        spares = self._spare_relays.setdefault(relay_family, [])
        if relay_family not in self._relay_refills:
            loop = asyncio.get_running_loop()
            self._relay_refills[relay_family] = loop.call_later(REFILL_DELAY, self._refill_relays, relay_family)
        if spares:
            return spares.pop()
        return self._bound(relay_family)

    def _refill_relays(self, relay_family: int) -> None:
        del self._relay_refills[relay_family]
        spares = self._spare_relays[relay_family]
        while len(spares) < RELAY_SPARES:
            try:
                spares.append(self._bound(relay_family))
            except OSError as exc:  # out of descriptors: relays are then made when needed (and fail there)
                log.debug("UDP relay spare: %s", exc)
                return

    def _new_relay(self, state: _ProgramSocket, peer: Endpoint) -> _Relay:
        relay_family = self._relay_family(state.family)
        sock, address = self._bound_relay_socket(relay_family)
        relay = _Relay(sock, address, peer, state)
        state.relays[peer] = relay
        self._by_port[(relay_family, relay.port)] = relay
        asyncio.get_running_loop().add_reader(relay.sock.fileno(), self._readable, relay)
        self._arm_sweeper()
        return relay

    def _forget_sink_user(self, state: _ProgramSocket) -> None:
        if state.sink_user is not None and self._sink_users.get(state.sink_user, (None,))[0] == state.key:
            del self._sink_users[state.sink_user]
        state.sink_user = None

    def _close_relay(self, relay: _Relay) -> None:
        if self._observer is not None and (relay.totals.datagrams_up or relay.totals.datagrams_down):
            self._observer.flow_ended(relay.owner.key, relay.peer, relay.totals)
        self._by_port.pop((relay.sock.family, relay.port), None)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(relay.sock.fileno())
        relay.sock.close()

    def _readable(self, relay: _Relay) -> None:
        """Program → relay: forward through the session."""
        with _after_reads() as after:
            for _ in range(READS_PER_WAKEUP):
                try:
                    payload, source = relay.sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    # An ICMP error for an earlier reply to the program (its socket closed): nothing to do.
                    log.debug("UDP relay %d: %s", relay.port, exc)
                    continue
                self._from_program(relay, payload, source, after)

    def _sink_readable(self, sink: socket.socket) -> None:
        """A datagram sent on a socket connected to port 0: on as if through its own relay."""
        with _after_reads() as after:
            self._sink_reads(sink, after)

    def _sink_reads(self, sink: socket.socket, after: AfterRead) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                payload, source = sink.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            user = self._sink_users.get((sink.family, source[1]))
            state = self._sockets.get(user[0]) if user is not None else None
            if user is None or state is None:
                self.dropped += 1
                continue
            try:
                relay = state.relays.get(user[1]) or self._new_relay(state, user[1])
            except OSError:
                self.dropped += 1
                continue
            self._from_program(relay, payload, source, after)

    def _from_program(self, relay: _Relay, payload: bytes, source: tuple[str, int], after: AfterRead) -> None:
        state = relay.owner
        state.program_address = source[:2]
        state.last_used = time.monotonic()
        if self._observer is not None and not relay.totals.datagrams_up:
            self._observer.flow_started(state.key, relay.peer)
        relay.totals.datagrams_up += 1
        relay.totals.bytes_up += len(payload)
        self._forward(state, relay.peer, payload, after)

    def _forward(self, state: _ProgramSocket, peer: Endpoint, payload: bytes, after: AfterRead) -> None:
        if peer.port == DNS_PORT:
            if self._observer is not None:
                self._observer.sent(state.key, peer, payload)
            if self._local_dns is not None and self._local_dns.wants(payload):
                self._local_dns.forward(payload, lambda answer: self._answered_here(state, peer, answer))
                return
            if self._dns_cache is not None:
                answer = self._dns_cache.lookup(peer, payload, time.monotonic())
                if answer is not None:
                    # From the relay of the nameserver asked, like its own answer: the program
                    # cannot tell. The report still sees it (after the other datagrams read).
                    state.last_used = time.monotonic()
                    self._deliver(state, peer, answer)
                    after.append(lambda: self._observe_answer(state, peer, answer, from_agent=False))
                    return
        if not self._session(state).send(peer, payload):
            self.dropped += 1

    def _start_session(self, state: _ProgramSocket) -> Session:
        # Pipelined: the datagram follows the session's open frame on the stream, so a
        # DNS query does not wait a round trip for the agent's answer to open first.
        session_family = socket.AF_INET6 if state.family == socket.AF_INET6 else socket.AF_INET
        session = self._client.start_udp(session_family)
        session.set_receiver(lambda source, payload: self._from_remote(state, source, payload))
        session.set_peer_error_receiver(lambda peer, error: self._peer_error(state, peer, error))
        # Agent socket errors and a refused open: the datagrams are lost, as UDP's are.
        session.set_error_receiver(lambda exc: log.debug("UDP session for socket %d: %s", state.key, exc))
        return session

    # --- remote → program ---

    def _from_remote(self, state: _ProgramSocket, source: Endpoint, payload: bytes) -> Callable[[], None] | None:
        state.last_used = time.monotonic()
        self._deliver(state, source, payload)
        if source.port != DNS_PORT:
            return None
        # After delivering, and after the other datagrams of the same message (the session
        # calls this back then): parsing an answer costs tens of µs that the program need not
        # wait for. The map is still up to date before ktrace sees the program's next
        # syscall, which this same (single-threaded) loop handles after the message.
        return lambda: self._observe_answer(state, source, payload)

    def _answered_here(self, state: _ProgramSocket, source: Endpoint, payload: bytes) -> None:
        """An answer made without the agent (``LocalDns``): one datagram, observed at once."""
        later = self._from_remote(state, source, payload)
        if later is not None:
            later()

    def _observe_answer(self, state: _ProgramSocket, source: Endpoint, payload: bytes, from_agent: bool = True) -> None:
        if self._dns_cache is not None and from_agent:
            # Kept only if it answers a question that went to the agent (not one answered
            # on this machine) and is worth keeping.
            self._dns_cache.store(source, payload, time.monotonic())
        if self._observer is not None:
            self._observer.received(state.key, source, payload)
        if self._on_dns_answer is not None:
            answer = addresses_in_answer(payload)
            if answer is not None and answer[1]:
                try:
                    self._on_dns_answer(*answer)
                except Exception:
                    log.exception("on_dns_answer callback failed")

    def _deliver(self, state: _ProgramSocket, source: Endpoint, payload: bytes) -> None:
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
        address = relay.address
        family = relay.sock.family
        if state.sink_user is not None and self._sink_users.get(state.sink_user, (None, None))[1] == peer:
            # Connected to the sink in place of port 0 of ``peer``: connect the program's socket
            # to the relay its datagrams took, so the port unreachable below lands on it. Its
            # source port stays (already bound), and ktrace answers getpeername() itself.
            try:
                program.connect((self._as_seen_by(program.family, address[0]), address[1]))
            except OSError as exc:
                log.debug("UDP socket %d: could not leave the sink: %s", sock_key, exc)
                return False
            self._forget_sink_user(state)
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
        replacement = _Relay(sock, address, peer, state, relay.totals)
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
        (runs every quarter of it while there are relays, and after every
        ``SWEEP_AFTER_NEW_SOCKETS`` new program sockets)."""
        self._new_since_sweep = 0
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
        session, state.session = state.session, None
        if session is not None:
            task = asyncio.create_task(session.close())
            self._closing_tasks.add(task)
            task.add_done_callback(self._closing_tasks.discard)


@contextlib.contextmanager
def _after_reads() -> Iterator[AfterRead]:
    """The list the datagrams read at one wake-up leave their follow-ups in (the report's and
    the DNS map's look at answers made here), run once all of them are handled."""
    after: AfterRead = []
    try:
        yield after
    finally:
        for later in after:
            try:
                later()
            except Exception:
                log.exception("UDP relay follow-up failed")
