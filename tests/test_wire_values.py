"""The wire's pure values (ktrace_agent.wire.values), gRPC targets, and who imports what: the values
without gRPC, the agent without ktrace."""

from __future__ import annotations

import errno
import ipaddress
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ktrace_agent.wire import rpc
from ktrace_agent.wire.values import Endpoint, SourceRoute, TunnelError


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


def test_source_route_errno() -> None:
    assert SourceRoute(6, None, "ENETUNREACH").errno == errno.ENETUNREACH
    assert SourceRoute(6, None, "ENOSUCH").errno == errno.ENETUNREACH


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


AGENT = pathlib.Path(__file__).resolve().parent.parent / "agent"


def _imported_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{name.partition('.')[0] for name in sys.modules}})))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(r.stdout.split())


def test_the_values_cost_no_grpc_nor_protobuf() -> None:
    """What ktrace/tracer uses of the wire imports neither (``import ktrace_agent`` itself does not)."""
    imported = _imported_after("import ktrace_agent.wire.values, ktrace_agent.wire.errnos")
    assert "grpc" not in imported and "google" not in imported and "ktrace_proto" not in imported


def test_the_agent_imports_nothing_of_ktrace() -> None:
    """The agent image drops ktrace/: every agent module imports without it (only ktrace_version)."""
    modules = sorted(
        ".".join(("ktrace_agent", *path.relative_to(AGENT).with_suffix("").parts)).removesuffix(".__init__")
        for path in AGENT.rglob("*.py")
        if path.name != "__main__.py"
    )
    imported = _imported_after("\n".join(f"import {module}" for module in modules))
    assert {"ktrace_agent", "grpc"} <= imported
    assert "ktrace" not in imported
