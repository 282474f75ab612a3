"""connect() decisions, without a tracee."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from ktrace.rules import Route, RuleSet
from ktrace.tracer import decide, sockaddr
from ktrace.tracer.decide import Passthrough, Redirected, RedirectTcp, RoutingPolicy, SocketInfo
from ktrace.tracer.sockaddr import InetAddr, OtherFamily
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.types import Endpoint

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
TCP4 = SocketInfo(socket.AF_INET, socket.SOCK_STREAM, 1)
TCP6 = SocketInfo(socket.AF_INET6, socket.SOCK_STREAM, 2)
UDP4 = SocketInfo(socket.AF_INET, socket.SOCK_DGRAM, 3)
POLICY = RoutingPolicy()


def v4(ip: str, port: int = 80) -> InetAddr:
    return InetAddr(socket.AF_INET, V4(ip), port)


def v6(ip: str, port: int = 80) -> InetAddr:
    return InetAddr(socket.AF_INET6, V6(ip), port)


def test_cluster_address_is_redirected() -> None:
    assert decide.decide_connect(v4("10.96.1.10"), TCP4, False, POLICY) == RedirectTcp(
        Endpoint(V4("10.96.1.10"), 80), v4("10.96.1.10")
    )


def test_v4_mapped_on_dual_stack_socket_dials_ipv4() -> None:
    d = decide.decide_connect(v6("::ffff:10.96.1.10"), TCP6, False, POLICY)
    assert isinstance(d, RedirectTcp)
    assert d.dest == Endpoint(V4("10.96.1.10"), 80)
    assert d.original.ip == V6("::ffff:10.96.1.10")


@pytest.mark.parametrize(
    ("addr", "sock", "redirected"),
    [
        (v4("127.0.0.1"), TCP4, False),
        (v4("127.53.0.1"), TCP4, False),
        (v4("0.0.0.0"), TCP4, False),
        (v6("::1"), TCP6, False),
        (v6("::ffff:127.0.0.1"), TCP6, False),
        (v6("::"), TCP6, False),
        (OtherFamily(socket.AF_UNIX), TCP4, False),
        (None, TCP4, False),
        (v4("10.0.0.1"), None, False),
        (v4("10.0.0.1"), TCP4, True),
        (v4("10.0.0.1"), UDP4, False),
        (v4("10.0.0.1"), TCP6, False),  # family mismatch: the kernel's EAFNOSUPPORT/EINVAL
        (v6("fd00::1"), TCP4, False),
    ],
)
def test_what_stays_with_the_kernel(addr: object, sock: SocketInfo | None, redirected: bool) -> None:
    decision = decide.decide_connect(addr, sock, redirected, POLICY)  # type: ignore[arg-type]
    assert isinstance(decision, Passthrough)


def test_names_of_a_redirected_socket() -> None:
    entry = Redirected(socket.AF_INET, v4("10.96.1.10", 8080), Endpoint(V4("10.244.0.7"), 41000))
    assert decide.peer_name(entry) == sockaddr.encode(socket.AF_INET, V4("10.96.1.10"), 8080)
    assert decide.sock_name(entry) == sockaddr.encode(socket.AF_INET, V4("10.244.0.7"), 41000)


def test_names_on_a_dual_stack_socket_are_v4_mapped() -> None:
    entry = Redirected(socket.AF_INET6, v6("::ffff:10.96.1.10", 80), Endpoint(V4("10.244.0.7"), 41000))
    assert decide.sock_name(entry) == sockaddr.encode(socket.AF_INET6, V6("::ffff:10.244.0.7"), 41000)
    assert decide.peer_name(entry) == sockaddr.encode(socket.AF_INET6, V6("::ffff:10.96.1.10"), 80)


def test_connect_result() -> None:
    assert decide.connect_result(0) == 0
    assert decide.connect_result(115) == -115


def test_rules_and_the_dns_map_decide_the_route() -> None:
    names = DnsMap()
    names.record("db.corp.example", [V4("10.9.0.5")])
    rules = RuleSet.parse(local=[("10.96.2.0/24", "--local"), ("db.corp.example", "--local")])
    policy = RoutingPolicy(rules, names)
    kept = decide.decide_connect(v4("10.96.2.1"), TCP4, False, policy)
    assert isinstance(kept, Passthrough) and kept.decision is not None
    assert kept.decision.by_user_rule and kept.decision.rule is not None and kept.decision.rule.text == "10.96.2.0/24"
    by_name = decide.decide_connect(v4("10.9.0.5", 5432), TCP4, False, policy)
    assert isinstance(by_name, Passthrough) and by_name.decision is not None
    assert by_name.decision.rule is not None and by_name.decision.rule.text == "db.corp.example"
    assert isinstance(decide.decide_connect(v4("10.9.0.6"), TCP4, False, policy), RedirectTcp)


def test_remembered_decisions_follow_what_the_program_resolved() -> None:
    """Decisions are remembered per (destination, protocol, names resolved to it): a name the
    program resolves later changes the route of an address it was asked about before."""
    names = DnsMap()
    policy = RoutingPolicy(RuleSet.parse(local=[("db.corp.example", "--local")]), names)
    dest = Endpoint(V4("10.9.0.5"), 5432)
    assert policy.route(dest) is Route.REMOTE and policy.route(dest) is Route.REMOTE
    names.record("db.corp.example", [V4("10.9.0.5")])
    assert policy.route(dest) is Route.LOCAL
    names.record("web.example", [V4("10.9.0.5")])  # resolved more recently, matches no rule
    assert policy.route(dest) is Route.LOCAL and policy.route(dest, "udp") is Route.LOCAL
    unrelated = RoutingPolicy(RuleSet.parse(local=[("10.96.2.0/24", "--local")]), names)
    for _ in range(2):
        assert unrelated.route(Endpoint(V4("10.96.2.1"), 80)) is Route.LOCAL
        assert unrelated.route(Endpoint(V4("10.96.3.1"), 80)) is Route.REMOTE


def test_cluster_nameserver_is_never_routed_by_address() -> None:
    dns = Endpoint(V4("10.96.0.10"), 53)
    policy = RoutingPolicy(RuleSet.parse(local=[("10.0.0.0/8", "--local")]), nameservers=frozenset({dns}))
    assert policy.route(dns, "udp") is Route.REMOTE
    assert policy.route(Endpoint(V4("10.96.0.10"), 80)) is Route.LOCAL


ICMP4 = SocketInfo(socket.AF_INET, socket.SOCK_DGRAM, 4, protocol=1)  # a ping socket
SCTP6 = SocketInfo(socket.AF_INET6, socket.SOCK_STREAM, 5, protocol=132)
RAW4 = SocketInfo(socket.AF_INET, socket.SOCK_RAW, 6, protocol=255)
UDPLITE4 = SocketInfo(socket.AF_INET, socket.SOCK_DGRAM, 7, protocol=136)
MPTCP4 = SocketInfo(socket.AF_INET, socket.SOCK_STREAM, 8, protocol=262)


@pytest.mark.parametrize(
    ("info", "tcp", "udp"),
    [
        (TCP4, True, False),
        (SocketInfo(socket.AF_INET, socket.SOCK_STREAM, 9, protocol=6), True, False),
        (MPTCP4, False, False),  # not carried: see decide.py
        (UDP4, False, True),
        (SocketInfo(socket.AF_INET6, socket.SOCK_DGRAM, 9, protocol=17), False, True),
        (ICMP4, False, False),
        (SCTP6, False, False),
        (RAW4, False, False),
        (UDPLITE4, False, False),
        (SocketInfo(socket.AF_UNIX, socket.SOCK_STREAM, 9), False, False),
    ],
)
def test_what_the_tunnel_carries(info: SocketInfo, tcp: bool, udp: bool) -> None:
    assert (info.is_tcp, info.is_udp) == (tcp, udp)


@pytest.mark.parametrize("info", [ICMP4, RAW4, UDPLITE4])
def test_other_ip_protocols_to_the_cluster_are_refused_not_sent_from_here(info: SocketInfo) -> None:
    assert decide.decide_uncarried(v4("10.96.1.10", 0), info, POLICY) == decide.Unsupported(
        Endpoint(V4("10.96.1.10"), 0), info.protocol, info.type
    )
    assert isinstance(decide.decide_uncarried(v4("127.0.0.1", 0), info, POLICY), Passthrough)
    assert isinstance(decide.decide_uncarried(v6("fd00::1", 0), info, POLICY), Passthrough)  # family mismatch
    local = RoutingPolicy(RuleSet.parse(local=[("10.96.0.0/16", "--local")]))
    assert isinstance(decide.decide_uncarried(v4("10.96.1.10", 0), info, local), Passthrough)


def test_connect_on_sctp_or_mptcp() -> None:
    assert isinstance(decide.decide_connect(v6("fd00::10"), SCTP6, False, POLICY), decide.Unsupported)
    assert isinstance(decide.decide_connect(v4("10.96.1.10"), MPTCP4, False, POLICY), decide.Unsupported)
    # Kept local, it runs as any local connect does.
    assert isinstance(decide.decide_connect(v4("127.0.0.1"), MPTCP4, False, POLICY), decide.Passthrough)
