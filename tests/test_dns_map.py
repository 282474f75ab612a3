"""DnsMap, DnsTcpTap, resolv.conf nameservers and the UDP socket table: pure codecs, table-tested and fuzzed."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rrset
from hypothesis import given
from hypothesis import strategies as st

from ktrace.tracer.decide import Route, RoutingPolicy, nameservers_of
from ktrace.tunnel.dns_map import DnsMap, DnsTcpTap
from ktrace.tunnel.socket_table import parse_inodes
from ktrace.tunnel.types import Endpoint


def response(name: str, addresses: list[str], qtype: str = "A") -> bytes:
    message = dns.message.make_response(dns.message.make_query(name, qtype))
    for address in addresses:
        kind = "AAAA" if ":" in address else "A"
        message.answer.append(dns.rrset.from_text(name + ".", 30, "IN", kind, address))
    return message.to_wire()


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_record_and_name_of() -> None:
    names = DnsMap()
    names.record("hello.default.svc.cluster.local", [ip("10.96.1.10"), ip("fd00::10")])
    names.record("other.default.svc.cluster.local", [ip("10.96.1.11")])
    assert names.name_of(ip("10.96.1.10")) == "hello.default.svc.cluster.local"
    assert names.name_of(ip("fd00::10")) == "hello.default.svc.cluster.local"
    assert names.name_of(ip("10.96.1.12")) is None
    names.record("alias.default.svc.cluster.local", [ip("10.96.1.10")])  # the latest answer wins
    assert names.name_of(ip("10.96.1.10")) == "alias.default.svc.cluster.local"


def test_capacity_forgets_the_oldest_first() -> None:
    names = DnsMap(capacity=3)
    for i in range(5):
        names.record(f"n{i}", [ip(f"10.0.0.{i}")])
    assert len(names) == 3
    assert names.name_of(ip("10.0.0.1")) is None
    assert names.name_of(ip("10.0.0.4")) == "n4"


def test_listeners_see_every_answer() -> None:
    names = DnsMap()
    seen: list[tuple[str, list[str]]] = []
    names.listeners.append(lambda name, found: seen.append((name, [str(a) for a in found])))
    names.record_answer(response("hello.default.svc.cluster.local", ["10.96.1.10"]))
    names.record_answer(b"not dns")
    names.record_answer(response("empty.default.svc.cluster.local", []))  # no addresses: nothing to map
    assert seen == [("hello.default.svc.cluster.local", ["10.96.1.10"])]


def framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


def test_tcp_tap_splits_messages_fed_in_any_pieces() -> None:
    stream = framed(response("a.cluster.local", ["10.0.0.1"])) + framed(
        response("b.cluster.local", [f"10.0.1.{i}" for i in range(1, 121)])
    )
    for step in (1, 2, 7, 100, len(stream)):
        names = DnsMap()
        tap = DnsTcpTap(names)
        for i in range(0, len(stream), step):
            tap.feed(stream[i : i + step])
        assert names.name_of(ip("10.0.0.1")) == "a.cluster.local"
        assert names.name_of(ip("10.0.1.120")) == "b.cluster.local"


def test_tcp_tap_gives_up_on_non_dns() -> None:
    names = DnsMap()
    tap = DnsTcpTap(names)
    tap.feed(framed(b"HTTP/1.1 200 OK\r\n\r\n"))
    tap.feed(framed(response("late.cluster.local", ["10.0.0.9"])))
    assert names.name_of(ip("10.0.0.9")) is None


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_tcp_tap_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    tap = DnsTcpTap(DnsMap())
    for chunk in chunks:
        tap.feed(chunk)
        assert len(tap._buffer) <= 2 * 65537 + 300


@given(st.binary(max_size=600))
def test_record_answer_accepts_any_bytes(payload: bytes) -> None:
    DnsMap().record_answer(payload)


def test_nameservers_of_resolv_conf() -> None:
    text = (
        "# comment\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n"
        "nameserver not-an-ip\nnameserver\noptions ndots:5\n nameserver 127.0.0.53\n"
    )
    assert nameservers_of(text) == {
        Endpoint(ip("10.96.0.10"), 53),
        Endpoint(ip("fe80::1"), 53),
        Endpoint(ip("127.0.0.53"), 53),
    }


@given(st.text(max_size=400))
def test_nameservers_of_never_raises(text: str) -> None:
    for endpoint in nameservers_of(text):
        assert endpoint.port == 53


def test_a_loopback_nameserver_of_the_agent_is_remote() -> None:
    policy = RoutingPolicy(nameservers=frozenset({Endpoint(ip("127.0.0.53"), 53)}))
    assert policy.route(Endpoint(ip("127.0.0.53"), 53)) is Route.REMOTE
    assert policy.route(Endpoint(ip("127.0.0.53"), 80)) is Route.LOCAL
    assert policy.route(Endpoint(ip("127.0.0.1"), 53)) is Route.LOCAL
    assert policy.route(Endpoint(ip("10.96.0.10"), 53)) is Route.REMOTE
    assert RoutingPolicy().route(Endpoint(ip("127.0.0.53"), 53)) is Route.LOCAL


UDP_TABLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 58792 2 0000000000000000 0
  456: 0A00600A:D431 0A00600A:0035 01 00000000:00000000 00:00000000 00000000  1000        0 60001 2 0000000000000000 0
garbage line
"""


def test_parse_udp_table_inodes() -> None:
    assert parse_inodes(UDP_TABLE) == {58792, 60001}
    assert parse_inodes("") == set()


@given(st.text(max_size=500))
def test_parse_udp_table_never_raises(text: str) -> None:
    parse_inodes(text)
