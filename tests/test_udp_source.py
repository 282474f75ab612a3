"""The source address a program's UDP socket shows, without a tracee: the agent's probe
targets, the handshake's new fields (and their absence from older agents), the decisions."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ktrace_agent import host_info
from ktrace_agent.wire import PROTOCOL_VERSION, rpc

from ktrace.tracer import decide, sockaddr
from ktrace.tracer.decide import AgentSources, UdpSocketName
from ktrace.tracer.sockaddr import InetAddr
from ktrace.tunnel.client import _parse_info
from ktrace.tunnel.types import Endpoint, SourceRoute

ip = ipaddress.ip_address
POD4 = ipaddress.IPv4Address("10.1.2.3")
POD6 = ipaddress.IPv6Address("fd00::1:2:3")
DUAL = AgentSources.from_routes([SourceRoute(4, POD4), SourceRoute(6, POD6)], [POD4, POD6])
V4_ONLY = AgentSources.from_routes([SourceRoute(4, POD4), SourceRoute(6, None, "ENETUNREACH")], [POD4])
OLD_AGENT = AgentSources()


def peer(text: str, port: int = 53, family: int | None = None) -> InetAddr:
    address = ip(text)
    return InetAddr(family or (socket.AF_INET6 if address.version == 6 else socket.AF_INET), address, port)


def name(family: int, peer_addr: InetAddr, agent_port: int | None, sources: AgentSources) -> bytes | None:
    return decide.udp_sock_name(UdpSocketName(family, peer_addr, 40000, agent_port), sources)


# --- the agent's probe --------------------------------------------------------------------


def test_probe_targets_skip_local_and_loopback_nameservers() -> None:
    resolv = "nameserver 127.0.0.53\nnameserver 169.254.20.10\nnameserver 10.96.0.10\nnameserver fd00::a\n"
    own = [ip("169.254.20.10")]
    assert host_info.probe_targets(resolv, own, socket.AF_INET) == [ip("10.96.0.10"), ip("192.0.2.1")]
    assert host_info.probe_targets(resolv, own, socket.AF_INET6) == [ip("fd00::a"), ip("2001:db8::1")]
    assert host_info.probe_targets("", [], socket.AF_INET6) == [ip("2001:db8::1")]
    assert host_info.probe_targets("nameserver fe80::1%eth0\n", [], socket.AF_INET6) == [ip("2001:db8::1")]


def test_source_route_first_target_with_a_route_wins() -> None:
    def lookup(family: int, target: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address:
        if target == ip("10.96.0.10"):
            raise OSError(errno.EHOSTUNREACH, "no")
        return POD4

    route = host_info.source_route(socket.AF_INET, [ip("10.96.0.10"), ip("192.0.2.1")], lookup)
    assert route == host_info.SourceRoute(socket.AF_INET, POD4)


def test_source_route_says_why_there_is_none() -> None:
    def lookup(family: int, target: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    route = host_info.source_route(socket.AF_INET6, [ip("2001:db8::1")], lookup)
    assert route == host_info.SourceRoute(socket.AF_INET6, None, "ENETUNREACH")


def test_kernel_source_towards_loopback_is_loopback() -> None:
    """The real lookup (a connected UDP socket, nothing sent) on a destination every host routes."""
    assert host_info.kernel_source(socket.AF_INET, ip("127.0.0.1")) == ip("127.0.0.1")


# --- the handshake ------------------------------------------------------------------------


def test_an_older_agents_handshake_has_no_source_routes() -> None:
    """A reply without the new field (an agent from before it) keeps the old behaviour: the
    kernel answers getsockname() (the relay's loopback address) and no connect() is refused."""
    info = _parse_info(rpc.HandshakeReply(agent_version="0.1", protocol_version=PROTOCOL_VERSION))
    assert info.source_routes == ()
    sources = AgentSources.from_routes(info.source_routes, info.addresses)
    assert name(socket.AF_INET, peer("10.96.7.7"), 5000, sources) is None
    assert decide.udp_no_route(Endpoint(ip("fd00::7"), 53), sources) is None


def test_handshake_source_routes_are_parsed_and_malformed_ones_ignored() -> None:
    reply = rpc.HandshakeReply(
        source_routes=[
            rpc.SourceRoute(family=rpc.FAMILY_INET, ip=POD4.packed),
            rpc.SourceRoute(family=rpc.FAMILY_INET, ip=ip("10.9.9.9").packed),  # a second one: ignored
            rpc.SourceRoute(family=rpc.FAMILY_INET6, ip=POD4.packed),  # wrong version: ignored
            rpc.SourceRoute(family=rpc.FAMILY_INET6, ip=b"\x01\x02"),  # bad length: ignored
            rpc.SourceRoute(family=rpc.FAMILY_INET6, errno_name="ENETUNREACH"),
            rpc.SourceRoute(ip=POD4.packed),  # no family: ignored
        ]
    )
    assert _parse_info(reply).source_routes == (SourceRoute(4, POD4), SourceRoute(6, None, "ENETUNREACH"))


def test_an_unknown_errno_name_is_enetunreach() -> None:
    assert SourceRoute(6, None, "EWHATEVER").errno == errno.ENETUNREACH
    assert SourceRoute(6, None, "EHOSTUNREACH").errno == errno.EHOSTUNREACH


# --- decisions ----------------------------------------------------------------------------


def test_connected_socket_shows_the_agent_source_and_the_agent_port() -> None:
    assert name(socket.AF_INET, peer("10.96.7.7"), 5000, DUAL) == sockaddr.encode(socket.AF_INET, POD4, 5000)
    assert name(socket.AF_INET6, peer("fd00::7"), 5000, DUAL) == sockaddr.encode(socket.AF_INET6, POD6, 5000)


def test_without_an_agent_socket_the_own_port_is_shown() -> None:
    assert name(socket.AF_INET, peer("10.96.7.7", 0), None, DUAL) == sockaddr.encode(socket.AF_INET, POD4, 40000)


def test_v4_mapped_peer_on_a_dual_stack_socket_gets_the_v4_source_mapped() -> None:
    shown = name(socket.AF_INET6, peer("::ffff:10.96.7.7", family=socket.AF_INET6), 5000, DUAL)
    assert shown == sockaddr.encode(socket.AF_INET6, ip("::ffff:10.1.2.3"), 5000)


def test_a_peer_that_is_the_agents_own_address_is_its_own_source() -> None:
    sources = AgentSources.from_routes(DUAL.routes, [POD4, ip("10.96.1.10")])
    assert name(socket.AF_INET, peer("10.96.1.10"), 5000, sources) == sockaddr.encode(
        socket.AF_INET, ip("10.96.1.10"), 5000
    )


@pytest.mark.parametrize("loopback", ["127.0.0.53", "::1", "::ffff:127.0.0.1"])
def test_loopback_peers_are_left_to_the_kernel(loopback: str) -> None:
    """A node-local nameserver: the relay's own loopback source is the true answer already,
    and the agent reaches it without a route."""
    address = peer(loopback)
    assert name(address.family, address, 5000, V4_ONLY) is None
    assert decide.udp_no_route(address.endpoint, V4_ONLY) is None


def test_no_route_of_a_version_is_its_errno() -> None:
    assert decide.udp_no_route(Endpoint(ip("fd00::7"), 53), V4_ONLY) == errno.ENETUNREACH
    assert decide.udp_no_route(Endpoint(ip("10.96.7.7"), 53), V4_ONLY) is None
    assert decide.udp_no_route(Endpoint(ip("fd00::7"), 53), DUAL) is None
    assert name(socket.AF_INET6, peer("fd00::7"), 5000, V4_ONLY) is None


@given(
    v4=st.ip_addresses(v=4),
    v6=st.ip_addresses(v=6),
    dest=st.ip_addresses(),
    dual_stack=st.booleans(),
    agent_port=st.none() | st.integers(1, 65535),
)
def test_a_shown_name_is_always_a_valid_address_of_the_sockets_family(
    v4: ipaddress.IPv4Address,
    v6: ipaddress.IPv6Address,
    dest: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dual_stack: bool,
    agent_port: int | None,
) -> None:
    family = socket.AF_INET6 if dual_stack or dest.version == 6 else socket.AF_INET
    sources = AgentSources.from_routes([SourceRoute(4, v4), SourceRoute(6, v6)])
    written = ip(f"::ffff:{dest}") if family == socket.AF_INET6 and dest.version == 4 else dest
    shown = name(family, InetAddr(family, written, 53), agent_port, sources)
    if shown is None:
        assert sockaddr.is_loopback(dest)
        return
    decoded = sockaddr.decode(shown)
    assert isinstance(decoded, InetAddr) and decoded.family == family
    assert decoded.port == (agent_port if agent_port is not None else 40000)
