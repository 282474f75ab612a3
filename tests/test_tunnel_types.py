"""Pure parts of the client side: endpoints, errno mapping, address codec, targets."""

from __future__ import annotations

import errno
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ktrace_agent import rpc as agent_rpc

from ktrace.tunnel import rpc
from ktrace.tunnel.types import Endpoint, TunnelError


@given(st.ip_addresses(), st.integers(0, 65535))
def test_endpoint_str_parse_roundtrip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    endpoint = Endpoint(ip, port)
    assert Endpoint.parse(str(endpoint)) == endpoint


@pytest.mark.parametrize("text", ["1.2.3.4", "::1:80", "[::1]", "[::1]x80", "1.2.3.4:x", "1.2.3.4:70000", "a:1"])
def test_endpoint_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


def test_endpoint_from_sockaddr() -> None:
    assert Endpoint.from_sockaddr(("::1", 5, 0, 0)) == Endpoint.parse("[::1]:5")
    assert Endpoint.from_sockaddr(("fe80::1%eth0", 5, 0, 2)) == Endpoint.parse("[fe80::1]:5")


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("ECONNREFUSED", errno.ECONNREFUSED),
        ("ETIMEDOUT", errno.ETIMEDOUT),
        ("ENOSUCH", errno.EIO),
        ("", errno.EIO),
        ("errorcode", errno.EIO),
    ],
)
def test_tunnel_error_errno(name: str, number: int) -> None:
    assert TunnelError(name, "m").errno == number


@given(st.ip_addresses(), st.integers(0, 65535))
def test_client_and_agent_codecs_agree(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    endpoint = Endpoint(ip, port)
    wire = rpc.encode_address(endpoint)
    agent_ip, agent_port = agent_rpc.decode_address(agent_rpc.Address.FromString(wire.SerializeToString()))
    expected = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert (agent_ip, agent_port) == (expected, port)
    back = rpc.decode_address(
        rpc.Address.FromString(agent_rpc.encode_address(agent_ip, agent_port).SerializeToString())
    )
    assert back == Endpoint(expected, port)


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("unix:/tmp/s", "unix:/tmp/s"),
        ("127.0.0.1:5", "ipv4:127.0.0.1:5"),
        ("[::1]:5", "ipv6:[::1]:5"),
        ("localhost:5", "localhost:5"),
    ],
)
def test_grpc_target(address: str, target: str) -> None:
    assert rpc.grpc_target(address) == target
