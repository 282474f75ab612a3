"""Routing rules: which destinations stay on this machine and which go through the cluster.

Pure: parsing and matching only. ``decide.RoutingPolicy`` asks a ``RuleSet``.

A rule is ``[tcp://|udp://]HOST[:PORT[-PORT]]`` where HOST is

* an IP address or CIDR (``10.0.0.0/8``, ``fd00::/64``; IPv6 with a port in brackets:
  ``[fd00::1]:80``),
* a host name (``db.corp.example``), matched against the names the program resolved to
  the destination address (the DNS map), exactly as the program asked for them,
* a wildcard name ``*.corp.example`` (any name ending in ``.corp.example``).

The most specific matching rule decides (see ``Rule.specificity``): a name is more
specific than an address, an exact name than a wildcard, a longer wildcard or prefix
than a shorter one, a port than none, a protocol than none. At equal specificity
``local`` wins. No rule matching means remote. The defaults (``DEFAULT_LOCAL``) keep
loopback and unspecified addresses local; a more specific rule can still send one
loopback port through the cluster (``--remote 127.0.0.1:15000``: the pod's own
loopback).

Name rules also decide where a name is *resolved*: a DNS question whose name matches a
name rule is answered by the side that rule routes to (ports and protocols ignored).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = ("tcp", "udp")
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_PORT_SPAN = 65536


class Route(Enum):
    LOCAL = "local"
    REMOTE = "remote"


class RuleError(ValueError):
    """A rule that cannot be parsed, or a contradictory set of rules. ``str()`` says why."""


@dataclass(frozen=True)
class Rule:
    route: Route
    text: str  # as written, for messages
    source: str = ""  # where it came from: "--local", "KTRACE_LOCAL", "ktrace.toml", "default"
    proto: str | None = None
    network: IPNetwork | None = None
    name: str | None = None  # lower case, no final dot; for a wildcard the suffix without "*."
    wildcard: bool = False
    ports: tuple[int, int] | None = None

    # -- matching ------------------------------------------------------------------------

    def matches_name(self, name: str) -> bool:
        if self.name is None:
            return False
        if self.wildcard:
            return name.endswith("." + self.name)
        return name == self.name

    def matches_port(self, port: int, proto: str) -> bool:
        if self.proto is not None and self.proto != proto:
            return False
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    def host_specificity(self) -> tuple[int, int]:
        if self.name is not None:
            if self.wildcard:
                return 2, self.name.count(".") + 1
            return 3, 0
        assert self.network is not None
        return 1, self.network.prefixlen

    def specificity(self) -> tuple[int, int, int, int]:
        """Bigger is more specific: (host kind, host length, port narrowness, protocol given)."""
        kind, length = self.host_specificity()
        port = 0 if self.ports is None else _PORT_SPAN - (self.ports[1] - self.ports[0])
        return kind, length, port, 1 if self.proto else 0

    def key(self) -> tuple[str | None, IPNetwork | None, str | None, bool, tuple[int, int] | None]:
        """What the rule selects, without its route: two rules with the same key contradict or repeat."""
        return self.proto, self.network, self.name, self.wildcard, self.ports

    def describe(self) -> str:
        """``--local 10.0.0.0/8``, ``local = 10.0.0.0/8 (ktrace.toml)``, ``default local 127.0.0.0/8``."""
        if self.source == "default":
            return f"default {self.route.value} {self.text}"
        if self.source.startswith("-") or not self.source:
            return f"--{self.route.value} {self.text}"
        return f"{self.route.value} {self.text} ({self.source})"


def normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _parse_ports(text: str, rule: str) -> tuple[int, int]:
    low_text, dash, high_text = text.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        raise RuleError(f"bad port {text!r} in rule {rule!r}: expected PORT or PORT-PORT") from None
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise RuleError(f"port out of range in rule {rule!r}: ports are 1-65535")
    if low > high:
        raise RuleError(f"empty port range {text!r} in rule {rule!r}")
    return low, high


def _split_host_port(rest: str, rule: str) -> tuple[str, str | None, bool]:
    """(host, port text or None, host was bracketed)."""
    if rest.startswith("["):
        host, sep, after = rest[1:].partition("]")
        if not sep:
            raise RuleError(f"missing ']' in rule {rule!r}")
        if not after:
            return host, None, True
        if not after.startswith(":") or len(after) == 1:
            raise RuleError(f"unexpected {after!r} after ']' in rule {rule!r}: expected :PORT")
        return host, after[1:], True
    colons = rest.count(":")
    if colons >= 2:
        return rest, None, False  # a bare IPv6 address or network; a port needs brackets
    if colons == 1:
        host, _, port = rest.partition(":")
        if not port:
            raise RuleError(f"missing port after ':' in rule {rule!r}")
        return host, port, False
    return rest, None, False


def _in(part: str, rule: str) -> str:
    return repr(part) if part == rule else f"{part!r} in rule {rule!r}"


def _parse_network(host: str, rule: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        if "/" in host:
            try:
                loose = ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise RuleError(f"bad network {_in(host, rule)}: {exc}") from None
            raise RuleError(f"{_in(host, rule)} has host bits set: did you mean {loose}?") from None
        if ":" in host:
            raise RuleError(f"bad IPv6 address {_in(host, rule)}") from None
        return None


def _check_name(name: str, rule: str) -> None:
    if not name or len(name) > 253:
        raise RuleError(f"bad host name in rule {rule!r}")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise RuleError(f"bad host name {name!r} in rule {rule!r}: label {label!r}")
    if all(label.isdigit() for label in labels):
        raise RuleError(f"{_in(name, rule)} is neither an IP address nor a host name")


def parse_rule(text: str, route: Route, source: str = "") -> Rule:
    """Parse one rule; raises ``RuleError`` with what is wrong."""
    rule = text.strip()
    if not rule:
        raise RuleError("empty rule")
    proto: str | None = None
    rest = rule
    scheme, sep, after = rule.partition("://")
    if sep:
        proto = scheme.lower()
        if proto not in PROTOCOLS:
            raise RuleError(f"unknown protocol {scheme!r} in rule {rule!r}: use tcp:// or udp://")
        rest = after
    if not rest:
        raise RuleError(f"missing host in rule {rule!r}")
    host, port_text, bracketed = _split_host_port(rest, rule)
    ports = _parse_ports(port_text, rule) if port_text is not None else None
    network = _parse_network(host, rule)
    if network is not None:
        return Rule(route, rule, source, proto, network=network, ports=ports)
    if bracketed:
        raise RuleError(f"brackets are for IPv6 addresses, not {host!r} in rule {rule!r}")
    name = normalize_name(host)
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    _check_name(name, rule)
    return Rule(route, rule, source, proto, name=name, wildcard=wildcard, ports=ports)


def _loopback_defaults() -> tuple[Rule, ...]:
    texts = ("127.0.0.0/8", "::1", "0.0.0.0", "::")  # noqa: S104 - destinations, not a bind
    return tuple(parse_rule(t, Route.LOCAL, "default") for t in texts)


DEFAULT_LOCAL = _loopback_defaults()


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    rule: Rule | None = None  # None: no rule matched (remote)

    @property
    def by_user_rule(self) -> bool:
        return self.rule is not None and self.rule.source != "default"


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class RuleSet:
    """The user's rules (in any order) on top of ``DEFAULT_LOCAL``."""

    rules: tuple[Rule, ...] = ()
    defaults: tuple[Rule, ...] = field(default=DEFAULT_LOCAL)

    def __post_init__(self) -> None:
        seen: dict[object, Rule] = {}
        for rule in self.rules:
            other = seen.get(rule.key())
            if other is not None and other.route is not rule.route:
                raise RuleError(
                    f"{rule.text!r} is both a local and a remote rule ({other.describe()}, {rule.describe()})"
                )
            seen[rule.key()] = rule

    @classmethod
    def parse(cls, local: Iterable[tuple[str, str]] = (), remote: Iterable[tuple[str, str]] = ()) -> RuleSet:
        """From ``(rule text, source)`` pairs."""
        rules = [parse_rule(text, Route.LOCAL, source) for text, source in local]
        rules += [parse_rule(text, Route.REMOTE, source) for text, source in remote]
        return cls(tuple(rules))

    @property
    def has_name_rules(self) -> bool:
        return any(rule.name is not None for rule in self.rules)

    def decide(self, ip: IPAddress, port: int, proto: str, names: Sequence[str] = ()) -> RouteDecision:
        """Where a connection (or datagram) to ``ip:port`` goes.

        ``names``: what the program resolved to ``ip``, most recent first; at equal
        specificity a rule matching a more recent name wins.
        """
        address = _unmapped(ip)
        names = [normalize_name(name) for name in names]
        best: tuple[tuple[int, ...], Rule] | None = None
        for rule in (*self.rules, *self.defaults):
            if not rule.matches_port(port, proto):
                continue
            if rule.network is not None:
                if address.version != rule.network.version or address not in rule.network:
                    continue
                recency = 0
            else:
                index = next((i for i, name in enumerate(names) if rule.matches_name(name)), None)
                if index is None:
                    continue
                recency = -index
            user = 0 if rule.source == "default" else 1
            rank = (*rule.specificity(), recency, user, 1 if rule.route is Route.LOCAL else 0)
            if best is None or rank > best[0]:
                best = (rank, rule)
        if best is None:
            return RouteDecision(Route.REMOTE)
        return RouteDecision(best[1].route, best[1])

    def resolve(self, qname: str) -> RouteDecision:
        """Where the DNS question for ``qname`` is answered: by the most specific name rule
        matching it (ports and protocols ignored), else by the cluster."""
        name = normalize_name(qname)
        best: tuple[tuple[int, ...], Rule] | None = None
        for rule in self.rules:
            if rule.name is None or not rule.matches_name(name):
                continue
            rank = (*rule.host_specificity(), 1 if rule.route is Route.LOCAL else 0)
            if best is None or rank > best[0]:
                best = (rank, rule)
        if best is None:
            return RouteDecision(Route.REMOTE)
        return RouteDecision(best[1].route, best[1])
