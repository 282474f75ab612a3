"""Routing rules: parsing, matching and precedence (pure), table-tested and fuzzed."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktrace.rules import DEFAULT_LOCAL, Route, RuleError, RuleSet, parse_rule
from ktrace.tunnel.dns_map import DnsMap

L, R = Route.LOCAL, Route.REMOTE
ip = ipaddress.ip_address
net = ipaddress.ip_network

# text -> (proto, network, name, wildcard, ports)
PARSED = {
    "10.0.0.0/8": (None, net("10.0.0.0/8"), None, False, None),
    "10.1.2.3": (None, net("10.1.2.3/32"), None, False, None),
    "10.1.2.3:80": (None, net("10.1.2.3/32"), None, False, (80, 80)),
    "tcp://10.0.0.0/8:5432": ("tcp", net("10.0.0.0/8"), None, False, (5432, 5432)),
    "UDP://10.0.0.0/8:53": ("udp", net("10.0.0.0/8"), None, False, (53, 53)),
    "fd00::/64": (None, net("fd00::/64"), None, False, None),
    "fd00::1": (None, net("fd00::1/128"), None, False, None),
    "[fd00::1]": (None, net("fd00::1/128"), None, False, None),
    "[fd00::1]:443": (None, net("fd00::1/128"), None, False, (443, 443)),
    "tcp://[fd00::/64]:8000-8100": ("tcp", net("fd00::/64"), None, False, (8000, 8100)),
    "db.corp.example": (None, None, "db.corp.example", False, None),
    "DB.Corp.Example.": (None, None, "db.corp.example", False, None),
    "db.corp.example:5432": (None, None, "db.corp.example", False, (5432, 5432)),
    "*.svc.cluster.local": (None, None, "svc.cluster.local", True, None),
    "udp://*.corp:53": ("udp", None, "corp", True, (53, 53)),
    "localhost": (None, None, "localhost", False, None),
    "hello": (None, None, "hello", False, None),
}


@pytest.mark.parametrize("text", sorted(PARSED))
def test_parse(text: str) -> None:
    rule = parse_rule(text, L, "--local")
    assert (rule.proto, rule.network, rule.name, rule.wildcard, rule.ports) == PARSED[text]
    assert rule.route is L and rule.text == text.strip()


BAD = {
    "": "empty rule",
    "http://10.0.0.0/8": "unknown protocol",
    "tcp://": "missing host",
    "10.0.0.1/8": "did you mean 10.0.0.0/8",
    "10.0.0.0/33": "bad network",
    "10.0.0.1:": "missing port",
    "10.0.0.1:http": "bad port",
    "10.0.0.1:0": "out of range",
    "10.0.0.1:70000": "out of range",
    "10.0.0.1:90-80": "empty port range",
    "[fd00::1": "missing ']'",
    "[fd00::1]x": "unexpected",
    "[db.corp]:80": "brackets are for IPv6",
    "fd00::zz": "bad IPv6",
    "10.0.0": "neither an IP address nor a host name",
    "bad name.corp": "bad host name",
    "*": "bad host name",
    "a..b": "bad host name",
    "-x.corp": "bad host name",
    "*.*.corp": "bad host name",
}


@pytest.mark.parametrize("text", sorted(BAD))
def test_parse_errors_say_why(text: str) -> None:
    with pytest.raises(RuleError, match=__import__("re").escape(BAD[text])):
        parse_rule(text, R)


def rules(local: list[str] = [], remote: list[str] = []) -> RuleSet:  # noqa: B006
    return RuleSet.parse([(t, "--local") for t in local], [(t, "--remote") for t in remote])


# (local rules, remote rules, destination ip, port, proto, names) -> (route, deciding rule text or None)
DECISIONS = [
    # defaults
    ([], [], "127.0.0.1", 80, "tcp", (), (L, "127.0.0.0/8")),
    ([], [], "::1", 80, "tcp", (), (L, "::1")),
    ([], [], "::ffff:127.0.0.1", 80, "tcp", (), (L, "127.0.0.0/8")),
    ([], [], "0.0.0.0", 80, "tcp", (), (L, "0.0.0.0")),
    ([], [], "10.96.1.10", 8080, "tcp", (), (R, None)),
    # a CIDR and a more specific CIDR inside it
    (["10.0.0.0/8"], [], "10.96.1.10", 80, "tcp", (), (L, "10.0.0.0/8")),
    (["10.0.0.0/8"], ["10.96.0.0/12"], "10.96.1.10", 80, "tcp", (), (R, "10.96.0.0/12")),
    (["10.0.0.0/8"], ["10.96.0.0/12"], "10.1.0.1", 80, "tcp", (), (L, "10.0.0.0/8")),
    # v4-mapped destinations match IPv4 rules
    (["10.0.0.0/8"], [], "::ffff:10.1.2.3", 80, "tcp", (), (L, "10.0.0.0/8")),
    # ports and protocols
    (["10.0.0.0/8:5432"], [], "10.1.2.3", 5432, "tcp", (), (L, "10.0.0.0/8:5432")),
    (["10.0.0.0/8:5432"], [], "10.1.2.3", 80, "tcp", (), (R, None)),
    (["udp://10.0.0.0/8"], [], "10.1.2.3", 53, "tcp", (), (R, None)),
    (["udp://10.0.0.0/8"], [], "10.1.2.3", 53, "udp", (), (L, "udp://10.0.0.0/8")),
    (["10.1.2.3"], ["tcp://10.1.2.3"], "10.1.2.3", 80, "tcp", (), (R, "tcp://10.1.2.3")),
    (["10.1.2.3:1-1000"], ["10.1.2.3:80-90"], "10.1.2.3", 85, "tcp", (), (R, "10.1.2.3:80-90")),
    # a loopback port can go through the cluster (the pod's own loopback)
    ([], ["127.0.0.1:15000"], "127.0.0.1", 15000, "tcp", (), (R, "127.0.0.1:15000")),
    ([], ["0.0.0.0/0"], "127.0.0.1", 80, "tcp", (), (L, "127.0.0.0/8")),
    # names beat addresses; exact names beat wildcards; longer wildcards beat shorter ones
    (
        ["10.0.0.0/8"],
        ["hello.default.svc.cluster.local"],
        "10.96.1.10",
        80,
        "tcp",
        ("hello.default.svc.cluster.local",),
        (R, "hello.default.svc.cluster.local"),
    ),
    (
        ["*.svc.cluster.local"],
        ["hello.default.svc.cluster.local"],
        "10.96.1.10",
        80,
        "tcp",
        ("hello.default.svc.cluster.local",),
        (R, "hello.default.svc.cluster.local"),
    ),
    (
        ["*.cluster.local"],
        ["*.default.svc.cluster.local"],
        "10.96.1.10",
        80,
        "tcp",
        ("hello.default.svc.cluster.local",),
        (R, "*.default.svc.cluster.local"),
    ),
    (["db.corp"], [], "10.9.9.9", 80, "tcp", ("web.corp",), (R, None)),
    (["*.corp"], [], "10.9.9.9", 80, "tcp", ("corp",), (R, None)),
    # one address, two names: the most recently resolved one's rule wins
    (
        ["hello.default.svc.cluster.local"],
        ["hello.other-ns.svc.cluster.local"],
        "10.96.1.10",
        80,
        "tcp",
        ("hello.other-ns.svc.cluster.local", "hello.default.svc.cluster.local"),
        (R, "hello.other-ns.svc.cluster.local"),
    ),
    # equal specificity: local wins
    (["10.1.2.3:80-90"], ["10.1.2.3:85-95"], "10.1.2.3", 86, "tcp", (), (L, "10.1.2.3:80-90")),
]


@pytest.mark.parametrize(("local", "remote", "dest", "port", "proto", "names", "expected"), DECISIONS)
def test_decide(
    local: list[str],
    remote: list[str],
    dest: str,
    port: int,
    proto: str,
    names: tuple[str, ...],
    expected: tuple[Route, str | None],
) -> None:
    decision = rules(local, remote).decide(ip(dest), port, proto, names)
    assert (decision.route, decision.rule.text if decision.rule else None) == expected


def test_default_rules_are_not_user_rules() -> None:
    decision = rules().decide(ip("127.0.0.1"), 80, "tcp")
    assert decision.rule in DEFAULT_LOCAL and not decision.by_user_rule
    assert rules(["127.0.0.1"]).decide(ip("127.0.0.1"), 80, "tcp").by_user_rule


def test_contradicting_rules_are_an_error() -> None:
    with pytest.raises(RuleError, match="both a local and a remote rule"):
        rules(["10.0.0.0/8"], ["10.0.0.0/8"])
    rules(["10.0.0.0/8", "10.0.0.0/8"])  # a repeat is harmless


RESOLVE = [
    ([], [], "hello.default.svc.cluster.local", (R, None)),
    (["db.corp.example"], [], "db.corp.example", (L, "db.corp.example")),
    # the program's search list expands short names; rules match what it asks, as asked
    (["db.corp.example"], [], "db.corp.example.default.svc.cluster.local", (R, None)),
    (["*.corp.example"], [], "DB.corp.example.", (L, "*.corp.example")),
    (["db.corp.example:5432"], [], "db.corp.example", (L, "db.corp.example:5432")),
    (["*.example"], ["*.corp.example"], "db.corp.example", (R, "*.corp.example")),
    (["10.0.0.0/8"], [], "db.corp.example", (R, None)),
]


@pytest.mark.parametrize(("local", "remote", "qname", "expected"), RESOLVE)
def test_resolve(local: list[str], remote: list[str], qname: str, expected: tuple[Route, str | None]) -> None:
    decision = rules(local, remote).resolve(qname)
    assert (decision.route, decision.rule.text if decision.rule else None) == expected


def test_describe_names_the_source() -> None:
    assert parse_rule("10.0.0.0/8", L, "--local").describe() == "--local 10.0.0.0/8"
    assert parse_rule("10.0.0.0/8", R, "ktrace.toml").describe() == "remote 10.0.0.0/8 (ktrace.toml)"
    assert DEFAULT_LOCAL[0].describe() == "default local 127.0.0.0/8"


def test_dns_map_most_recent_first_and_bounded() -> None:
    m = DnsMap(capacity=2)
    m.record("hello.default.svc.cluster.local", [ip("10.96.1.10")])
    m.record("hello.other-ns.svc.cluster.local", [ip("10.96.1.10"), ip("::ffff:10.96.1.11")])
    assert m.names_of(ip("::ffff:10.96.1.10")) == (
        "hello.other-ns.svc.cluster.local",
        "hello.default.svc.cluster.local",
    )
    assert m.name_of(ip("10.96.1.11")) == "hello.other-ns.svc.cluster.local"
    m.record("x.corp", [ip("10.0.0.1")])
    assert len(m) == 2 and m.name_of(ip("10.96.1.10")) is None


# -- fuzzing ------------------------------------------------------------------------------

label = st.text(alphabet="abcz019-", min_size=1, max_size=6).filter(lambda s: s[0] != "-" and s[-1] != "-")
names = st.lists(label, min_size=1, max_size=4).map(".".join).filter(lambda n: not n.replace(".", "").isdigit())
ports = st.integers(1, 65535)
v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    proto = draw(st.sampled_from(["", "tcp://", "udp://"]))
    kind = draw(st.sampled_from(["v4", "v6", "name", "wild"]))
    port = draw(st.one_of(st.none(), ports))
    if kind == "v4":
        host = str(ipaddress.ip_network(f"{draw(v4)}/{draw(st.integers(0, 32))}", strict=False))
    elif kind == "v6":
        host = "[" + str(ipaddress.ip_network(f"{draw(v6)}/{draw(st.integers(0, 128))}", strict=False)) + "]"
        return f"{proto}{host}" + (f":{port}" if port else "")
    elif kind == "name":
        host = draw(names)
    else:
        host = "*." + draw(names)
    return f"{proto}{host}" + (f":{port}" if port else "")


@given(rule_texts(), st.sampled_from([L, R]))
def test_fuzz_valid_rules_parse_and_round_trip(text: str, route: Route) -> None:
    rule = parse_rule(text, route, "--x")
    again = parse_rule(rule.text, route, "--x")
    assert again == rule


@given(st.text(max_size=40), st.sampled_from([L, R]))
def test_fuzz_any_text_parses_or_raises_rule_error(text: str, route: Route) -> None:
    try:
        parse_rule(text, route)
    except RuleError as exc:
        assert str(exc)


@given(
    st.lists(rule_texts(), max_size=6),
    st.lists(rule_texts(), max_size=6),
    st.one_of(v4, v6),
    ports,
    st.sampled_from(["tcp", "udp"]),
    st.lists(names, max_size=3),
)
def test_fuzz_decision_is_the_most_specific_matching_rule(
    local: list[str],
    remote: list[str],
    dest: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    proto: str,
    dest_names: list[str],
) -> None:
    try:
        ruleset = rules(local, remote)
    except RuleError:
        return  # the same rule in both lists
    decision = ruleset.decide(dest, port, proto, dest_names)
    if decision.rule is None:
        assert decision.route is R
        return
    rule = decision.rule
    assert rule.route is decision.route
    assert rule.matches_port(port, proto)
    assert (rule.network is not None and dest in rule.network) or any(rule.matches_name(n) for n in dest_names)
    for other in (*ruleset.rules, *ruleset.defaults):
        matches = other.matches_port(port, proto) and (
            (other.network is not None and dest.version == other.network.version and dest in other.network)
            or any(other.matches_name(n) for n in dest_names)
        )
        if matches:
            assert other.specificity() <= rule.specificity()
