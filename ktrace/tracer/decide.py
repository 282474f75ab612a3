"""Pure decisions about the program's socket syscalls.

Inputs are plain values (the decoded sockaddr, what the socket is, what ktrace
already knows about it); outputs say what should happen. No ptrace, no
sockets: `network.py` gathers the inputs and applies the answers, and the
unit tests drive this module directly.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from ktrace_agent.wire.values import Endpoint, IPAddress, SourceRoute

from ktrace.rules import Route as Route  # noqa: PLC0414 - re-exported for udp.py
from ktrace.rules import RouteDecision, RuleSet
from ktrace.tracer import sockaddr
from ktrace.tracer.ports import Names
from ktrace.tracer.sockaddr import Decoded, InetAddr

IPPROTO_TCP = 6
IPPROTO_UDP = 17
# MPTCP is not carried: a parked MPTCP socket never completes the parking lot's simultaneous
# open (Linux 6.18: its subflow is established, the MPTCP socket stays connecting), so a remote
# MPTCP connect fails with ENETUNREACH like the other protocols the tunnel cannot carry.
IPPROTO_MPTCP = 262
_TCP_PROTOCOLS = frozenset({0, IPPROTO_TCP})
_UDP_PROTOCOLS = frozenset({0, IPPROTO_UDP})


@dataclass(frozen=True)
class SocketInfo:
    family: int
    type: int  # SOCK_STREAM, SOCK_DGRAM, ... without NONBLOCK/CLOEXEC bits
    inode: int
    protocol: int = 0  # SO_PROTOCOL: ICMP ping sockets are SOCK_DGRAM too, SCTP can be SOCK_STREAM

    @property
    def is_ip(self) -> bool:
        return self.family in (socket.AF_INET, socket.AF_INET6)

    @property
    def is_tcp(self) -> bool:
        return self.is_ip and self.type == socket.SOCK_STREAM and self.protocol in _TCP_PROTOCOLS

    @property
    def is_udp(self) -> bool:
        return self.is_ip and self.type == socket.SOCK_DGRAM and self.protocol in _UDP_PROTOCOLS


_DECISIONS_KEPT = 4096


@dataclass(frozen=True)
class RoutingPolicy:
    """Which destinations go through the agent: the most specific rule of ``rules``
    (loopback and unspecified addresses stay local by default, everything else is
    remote). ``names`` (the DNS map) lets name rules match an address.

    ``nameservers`` (the agent's resolv.conf, port 53) are always remote, whatever
    the rules: the program reads the agent's resolv.conf, so a node-local resolver
    such as ``nameserver 127.0.0.53`` means the agent's loopback, not this
    machine's, and an address rule must not cut the program off from its resolver
    (name rules decide where each question is answered instead).
    """

    rules: RuleSet = field(default_factory=RuleSet)
    names: Names | None = None
    nameservers: frozenset[Endpoint] = frozenset()
    # Decisions are a pure function of (destination, protocol, the names resolved to it) for
    # fixed rules; every connect and UDP connect/send asks, mostly about the same few peers.
    _decided: dict[tuple[Endpoint, str, tuple[str, ...]], RouteDecision] = field(
        default_factory=dict, compare=False, repr=False
    )

    def decide(self, dest: Endpoint, proto: str = "tcp") -> RouteDecision:
        if dest in self.nameservers:
            return RouteDecision(Route.REMOTE)
        names = self.names.names_of(dest.ip) if self.names is not None and self.rules.has_name_rules else ()
        key = (dest, proto, names)
        decision = self._decided.get(key)
        if decision is None:
            decision = self.rules.decide(dest.ip, dest.port, proto, names)
            if len(self._decided) >= _DECISIONS_KEPT:
                self._decided.clear()
            self._decided[key] = decision
        return decision

    def route(self, dest: Endpoint, proto: str = "tcp") -> Route:
        return self.decide(dest, proto).route


def nameservers_of(resolv_conf: str) -> frozenset[Endpoint]:
    """The ``nameserver`` addresses of a resolv.conf text, as port-53 endpoints
    (IPv6 zone suffixes dropped; malformed lines ignored, as resolvers do)."""
    found: set[Endpoint] = set()
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.add(Endpoint(ipaddress.ip_address(fields[1].split("%", 1)[0]), 53))
            except ValueError:
                continue
    return frozenset(found)


@dataclass(frozen=True)
class Passthrough:
    """Let the kernel handle it: local destination, not ours, or an error the
    kernel will report better than we could (EBADF, EINVAL, EAFNOSUPPORT)."""

    reason: str
    decision: RouteDecision | None = None  # set for a destination a rule keeps local


@dataclass(frozen=True)
class Unsupported:
    """An IP protocol the tunnel cannot carry (ICMP ping sockets, raw IP, SCTP, UDP-Lite)
    towards a remote destination: the call fails with ENETUNREACH. Running it unchanged
    would send it from this machine instead of the cluster, to whatever that address is here."""

    dest: Endpoint
    protocol: int
    type: int


def decide_uncarried(addr: Decoded | None, sock: SocketInfo, policy: RoutingPolicy) -> Passthrough | Unsupported:
    """For an IP socket that is neither TCP nor UDP: refuse remote destinations."""
    if not isinstance(addr, InetAddr) or addr.family != sock.family:
        return Passthrough("not an address of the socket's family")
    dest = addr.endpoint
    decision = policy.decide(dest, "ip")
    if decision.route is Route.LOCAL:
        return Passthrough("local destination", decision)
    return Unsupported(dest, sock.protocol, sock.type)


@dataclass(frozen=True)
class RedirectTcp:
    dest: Endpoint
    original: InetAddr
    decision: RouteDecision = field(default_factory=lambda: RouteDecision(Route.REMOTE))


ConnectDecision = Passthrough | RedirectTcp | Unsupported


def decide_connect(
    addr: Decoded | None,
    sock: SocketInfo | None,
    already_redirected: bool,
    policy: RoutingPolicy,
) -> ConnectDecision:
    if sock is None:
        return Passthrough("not a socket")
    if already_redirected:
        # A second connect() on a tunnelled socket (non-blocking connect
        # completion check): the kernel answers EISCONN/EALREADY itself.
        return Passthrough("already redirected")
    if addr is None:
        return Passthrough("malformed address")
    if not isinstance(addr, InetAddr):
        return Passthrough("not an IP address")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return Passthrough("not an IP socket")
    if addr.family != sock.family:
        return Passthrough("family mismatch")
    if sock.is_udp:
        return Passthrough("a UDP socket: udp.py's business")
    if not sock.is_tcp:
        return decide_uncarried(addr, sock, policy)
    dest = addr.endpoint
    decision = policy.decide(dest, "tcp")
    if decision.route is Route.LOCAL:
        return Passthrough("local destination", decision)
    return RedirectTcp(dest, addr, decision)


@dataclass(frozen=True)
class Redirected:
    """What ktrace remembers about a tunnelled socket, by inode."""

    family: int
    peer: InetAddr  # as the program wrote it (v4-mapped stays v4-mapped)
    local: Endpoint  # the agent socket's own address


def peer_name(entry: Redirected) -> bytes:
    return sockaddr.encode(entry.family, entry.peer.ip, entry.peer.port)


def sock_name(entry: Redirected) -> bytes:
    ip = entry.local.ip
    if entry.family == socket.AF_INET and ip.version == 6:
        # An IPv4 socket cannot show an IPv6 name; this cannot happen for a
        # destination the agent dialled over IPv4, but never crash on it.
        return sockaddr.encode(socket.AF_INET, ipaddress.IPv4Address(0), entry.local.port)
    return sockaddr.encode(entry.family, ip, entry.local.port)


def connect_result(local_errno: int) -> int:
    """The program's connect() return value once its socket is connected to
    ktrace's loopback endpoint: 0, or -EINPROGRESS for a non-blocking socket
    whose loopback handshake has not completed yet (it completes at once)."""
    return -local_errno if local_errno else 0


@dataclass(frozen=True)
class AgentSources:
    """What the agent's handshake said about its routes towards the cluster, per IP version
    (nothing from an older agent: then the kernel answers getsockname() and connect() as before),
    and its own addresses (a peer that is one of them is its own source, as for any local peer)."""

    routes: tuple[SourceRoute, ...] = ()
    own: frozenset[IPAddress] = frozenset()

    def of(self, dest: Endpoint) -> SourceRoute | None:
        for route in self.routes:
            if route.version == dest.ip.version:
                return route
        return None

    @classmethod
    def from_routes(cls, routes: Iterable[SourceRoute], own: Iterable[IPAddress] = ()) -> AgentSources:
        return cls(tuple(routes), frozenset(own))


def _on_the_agent_itself(dest: Endpoint, sources: AgentSources) -> bool:
    return sockaddr.is_loopback(dest.ip) or dest.ip in sources.own


def udp_no_route(dest: Endpoint, sources: AgentSources) -> int | None:
    """The errno a UDP connect() or send to the remote ``dest`` fails with because the agent
    has no route of its IP version (ENETUNREACH in an IPv4-only pod), else None. ``dest`` is
    the endpoint (a v4-mapped address is IPv4: it leaves a dual-stack socket as IPv4). The
    agent's own and loopback addresses (a node-local nameserver) are reachable without a route."""
    route = sources.of(dest)
    if route is None or route.source is not None or _on_the_agent_itself(dest, sources):
        return None
    return route.errno


@dataclass(frozen=True)
class UdpSocketName:
    """A snapshot of a program UDP socket ktrace connected to a relay or the sink."""

    family: int  # the program socket's
    peer: InetAddr  # as the program wrote it
    own_port: int  # the program socket's own port (the kernel bound it at connect())
    agent_port: int | None  # the port of its agent socket, the one the peer sees, when known


def udp_sock_name(snapshot: UdpSocketName, sources: AgentSources) -> bytes | None:
    """What getsockname() shows: the agent's source address for the peer's IP version (what
    a pod's kernel picks), with the port the peer sees when there is an agent socket, else the
    socket's own port. A peer that is one of the agent's own addresses is its own source (the
    kernel picks the destination itself). None: the kernel answers (an older agent told no
    source; a loopback peer, whose source 127.0.0.1 or ::1 the relay's already is)."""
    dest = snapshot.peer.endpoint
    route = sources.of(dest)
    if route is None or route.source is None or sockaddr.is_loopback(dest.ip):
        return None
    source = dest.ip if dest.ip in sources.own else route.source
    if snapshot.family == socket.AF_INET and source.version == 6:
        return None  # cannot happen (an IPv4 peer gets an IPv4 source); never crash on it
    port = snapshot.agent_port if snapshot.agent_port is not None else snapshot.own_port
    return sockaddr.encode(snapshot.family, source, port)


# recvfrom(2) flags ktrace can reproduce by receiving on its duplicate of the socket
# (MSG_DONTWAIT is added to ktrace's own receive either way).
_RECV_FLAGS_DONE_IN_KTRACE = socket.MSG_PEEK | socket.MSG_TRUNC | socket.MSG_DONTWAIT


def recvfrom_in_ktrace(flags: int) -> bool:
    """Whether a recvfrom() on a relayed UDP socket can be done by ktrace at its entry (one stop,
    the true source written at once) instead of stopping again at its exit to rewrite the
    source: only for flags whose effect a receive on the same socket reproduces exactly
    (MSG_ERRQUEUE, MSG_OOB and anything unknown run as before)."""
    return flags & ~_RECV_FLAGS_DONE_IN_KTRACE == 0
