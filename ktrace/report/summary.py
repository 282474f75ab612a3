"""The summary at exit: one row per destination, and hints where the cause is clear (pure).

Rows:
* one per (protocol, address:port) the program connected or sent to, named by the
  name it resolved to that address;
* one per name whose lookup failed, whatever the search list tried: the questions a
  resolver asks for one name (``orders.default.svc.cluster.local``, ...,
  ``orders``) are one lookup, which failed only if none of them found the name.
  The NXDOMAINs of a lookup that succeeded at a later search domain are the search
  list working as designed and are not failures.

Hints only say what the events show. "A same-named service exists in another
namespace" needs to know which services exist: ``elsewhere`` maps a looked-up name
to the fully qualified names ktrace found for it in other namespaces (see
``report/probe.py``); the summary does not guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ktrace.report.events import AGENT_UNREACHABLE, DNS_OK, Closed, Connect, DnsQuery, Event, UdpFlow
from ktrace.report.searchlist import SearchList

# DNS outcomes that show the name exists.
FOUND = frozenset({"answer", "NODATA", "truncated"})


@dataclass
class Row:
    proto: str  # "tcp", "udp" or "dns" (a lookup that never produced an address)
    dest: str | None  # "ip:port"; None for a dns row
    name: str | None
    route: str
    attempts: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    rule: str | None = None
    asked: list[str] = field(default_factory=list)  # dns rows: the names asked, in order
    detail: str | None = None  # dns rows: what was wrong with the last malformed answer

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def failures_text(self) -> str:
        return ", ".join(f"{reason} x{count}" if count > 1 else reason for reason, count in self.failures.items())

    def subject(self) -> str:
        if self.dest is None:
            return self.name or "?"
        return f"{self.dest} ({self.name})" if self.name else self.dest


@dataclass
class Summary:
    rows: list[Row]
    hints: list[str]
    untracked: int = 0  # events past the bounds, counted but not itemised

    @property
    def failed(self) -> bool:
        return any(row.failed for row in self.rows)


@dataclass
class AskedName:
    """Every question for one name (as asked on the wire): outcome counts, where it was answered."""

    name: str
    route: str
    rule: str | None
    outcomes: Counter[str] = field(default_factory=Counter)
    detail: str | None = None  # what was wrong with the last malformed answer

    @property
    def found(self) -> bool:
        return any(outcome in FOUND for outcome in self.outcomes)

    @property
    def failures(self) -> Counter[str]:
        return Counter({o: n for o, n in self.outcomes.items() if o not in DNS_OK})


# Bounds for a program that reaches millions of destinations or names: past them, new ones are
# counted but not itemised.
MAX_ROWS = 10000
MAX_NAMES = 65536


class Tally:
    """The summary's numbers, kept as events arrive (memory grows with distinct destinations
    and names, not with events)."""

    def __init__(self, hosts: frozenset[str] = frozenset()) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.names: dict[str, AskedName] = {}  # lower-case name -> its questions
        self.events = 0
        self.untracked = 0
        # Names in the hosts file the program reads: a resolver that found one there did not
        # fail, whatever DNS said for it (glibc asks DNS for AAAA first when the file has only
        # an IPv4 address for it, as `getent hosts` does).
        self.hosts = hosts
        # Set while (and after) ktrace could not reach the agent: says where and why.
        self.agent_outage: str | None = None

    def add(self, event: Event) -> None:
        self.events += 1
        if isinstance(event, DnsQuery):
            key = event.name.lower()
            asked = self.names.get(key)
            if asked is None:
                if len(self.names) >= MAX_NAMES:
                    self.untracked += 1
                    return
                asked = self.names[key] = AskedName(event.name, event.route, event.rule)
            asked.outcomes[_reason(event.outcome, event.cause)] += 1
            asked.route, asked.rule = event.route, event.rule
            if event.detail:
                asked.detail = event.detail
        elif isinstance(event, Connect | UdpFlow):
            proto = event.proto if isinstance(event, Connect) else "udp"
            row = self._row(proto, event.dest, event.name, event.route)
            if row is None:
                return
            row.name = event.name or row.name
            row.route = event.route
            row.rule = event.rule
            row.attempts += 1
            if isinstance(event, Connect) and event.failed:
                row.failures[_reason(event.outcome, event.cause)] += 1
            else:
                row.ok += 1
        elif isinstance(event, Closed):
            row = self._row(event.proto, event.dest, event.name, "remote")
            if row is None:
                return
            row.name = row.name or event.name
            row.bytes_up += event.bytes_up
            row.bytes_down += event.bytes_down
            if event.failed:
                row.failures[event.outcome] += 1

    def _row(self, proto: str, dest: str, name: str | None, route: str) -> Row | None:
        row = self.rows.get((proto, dest))
        if row is None:
            if len(self.rows) >= MAX_ROWS:
                self.untracked += 1
                return None
            row = self.rows[(proto, dest)] = Row(proto, dest, name, route)
        return row

    def failed_lookups(self, search: SearchList) -> dict[str, list[AskedName]]:
        """Names never found, grouped by the name the program looked up, leaving out those a
        later (or earlier) search-list candidate found."""
        groups: dict[str, list[AskedName]] = {}
        for key, asked in self.names.items():
            if not asked.failures or asked.found:
                continue
            stems = search.stems(key)
            if any(stem in self.hosts for stem in stems):
                continue
            candidates = (c for stem in stems for c in search.candidates(stem))
            if any(c in self.names and self.names[c].found for c in candidates):
                continue
            groups.setdefault(search.looked_up(key), []).append(asked)
        return groups

    def names_to_probe(self, search: SearchList) -> list[str]:
        """Short names the cluster answered NXDOMAIN for: candidates for "exists in another namespace"."""
        return [
            name
            for name, group in self.failed_lookups(search).items()
            if "." not in name and any(a.outcomes["NXDOMAIN"] and a.route == "remote" for a in group)
        ]

    def namespaces_seen(self, search: SearchList) -> list[str]:
        """Namespaces of the services the program resolved."""
        found: list[str] = []
        for asked in self.names.values():
            namespace = search.namespace_of(asked.name) if asked.found else None
            if namespace and namespace not in found:
                found.append(namespace)
        return found

    def summary(
        self, search: SearchList | None = None, elsewhere: Mapping[str, Sequence[str]] | None = None
    ) -> Summary:
        search = search or SearchList()
        result = list(self.rows.values())
        for name, group in self.failed_lookups(search).items():
            last = group[-1]
            row = Row("dns", None, name, last.route, rule=last.rule, asked=[a.name for a in group])
            for asked in group:
                row.failures.update(asked.failures)
                row.detail = asked.detail or row.detail
            row.attempts = sum(row.failures.values())
            result.append(row)
        answered = _answered_ports(result)
        hints: list[str] = []
        if self.agent_outage is not None:
            hints.append(f"{self.agent_outage}: is it still running, and is the path to it (port-forward, network) up?")
        for row in result:
            hint = hint_for(row, search, (elsewhere or {}).get(row.name or "", ()), answered.get(_ip(row.dest), ()))
            if hint:
                hints.append(hint)
        return Summary(result, hints, self.untracked)


def _reason(outcome: str, cause: str | None) -> str:
    """A failure's key in the counts: its outcome, and the cause when one was known."""
    return f"{outcome} ({cause})" if cause else outcome


def _ip(dest: str | None) -> str:
    return (dest or "").rpartition(":")[0]


def _answered_ports(rows: Iterable[Row]) -> dict[str, tuple[str, ...]]:
    """Per address, the TCP ports some connect reached."""
    found: dict[str, list[str]] = {}
    for row in rows:
        if row.proto == "tcp" and row.ok and row.dest:
            ip, _, port = row.dest.rpartition(":")
            found.setdefault(ip, []).append(port)
    return {ip: tuple(sorted(ports, key=int)) for ip, ports in found.items()}


def tally(events: Iterable[Event]) -> Tally:
    counted = Tally()
    for event in events:
        counted.add(event)
    return counted


def failed_lookups(events: Iterable[Event], search: SearchList) -> dict[str, list[AskedName]]:
    return tally(events).failed_lookups(search)


def names_to_probe(events: Iterable[Event], search: SearchList) -> list[str]:
    return tally(events).names_to_probe(search)


def summarize(
    events: Iterable[Event], search: SearchList | None = None, elsewhere: Mapping[str, Sequence[str]] | None = None
) -> Summary:
    return tally(events).summary(search, elsewhere)


# -- hints --------------------------------------------------------------------------------


def _dns_hint(row: Row, search: SearchList, elsewhere: Sequence[str]) -> str | None:
    name = row.name or "?"
    reasons = row.failures
    if row.route == "local":
        if row.rule:
            return f"{name}: resolved on this machine because of {row.rule}, and it failed ({row.failures_text()})"
        return None
    if "NXDOMAIN" in reasons:
        here = search.namespace
        if elsewhere:
            where = ", ".join(f"{search.namespace_of(fqdn) or fqdn} ({fqdn})" for fqdn in elsewhere)
            use = search.namespace_of(elsewhere[0])
            suggestion = f"{name}.{use}" if use else elsewhere[0]
            in_ns = f" in namespace {here}" if here else ""
            return f"{name}: no such service{in_ns}, but a service {name} exists in namespace {where}: use {suggestion}"
        if "." not in name and here:
            return (
                f"{name}: no service {name} in namespace {here} (asked {', '.join(row.asked)}); "
                f"check the name, or write {name}.NAMESPACE for a service in another namespace"
            )
        return f"{name}: the cluster's DNS does not know this name (NXDOMAIN)"
    if "malformed" in reasons:
        return (
            f"{name}: the DNS server's answer did not parse ({row.detail or 'malformed'}); it came at once, so "
            "this is no timeout: the server, or something on the way, sends broken DNS messages"
        )
    if _agent_cause(reasons):
        return f"{name}: ktrace could not reach the agent, so the question never reached the cluster's DNS"
    if "timeout" in reasons:
        return (
            f"{name}: the cluster's DNS server did not answer (is kube-dns/CoreDNS running and reachable from the pod?)"
        )
    if "SERVFAIL" in reasons:
        return f"{name}: the cluster's DNS failed to resolve it (SERVFAIL: its upstream resolver failed or timed out)"
    if "REFUSED" in reasons:
        return f"{name}: the cluster's DNS refused to answer for this name (REFUSED)"
    return None


_CONNECT_HINTS = {
    "ECONNREFUSED": (
        "refused by the cluster: nothing listens on port {port} there; for a Service this means no ready "
        "endpoints (no pod matches its selector, or none is ready) or a port the Service does not expose"
    ),
    "ETIMEDOUT": ("the cluster got no answer: a NetworkPolicy or firewall drops it, or nothing routes to that address"),
    "ENETUNREACH": "the cluster has no route to that address",
    "EHOSTUNREACH": "the cluster has no route to that host",
    "ENOBUFS": (
        "the agent refused a new stream: the program had more connections open through it than the agent "
        "allows one client (ktrace-agent --max-client-streams)"
    ),
}


def _agent_cause(reasons: Iterable[str]) -> bool:
    return any(reason.endswith(f"({AGENT_UNREACHABLE})") for reason in reasons)


def _timeout_hint(row: Row, search: SearchList, port: str, answered: Sequence[str]) -> str | None:
    """ETIMEDOUT on a Service's address: its ClusterIP drops what comes to a port the Service
    does not list (kube-proxy forwards only the listed ones), so say that too."""
    service = row.name if row.name and search.namespace_of(row.name) else None
    if (service is None and not answered) or port in answered:
        return None
    others = [p for p in answered if p != port]
    also = f" (it answered on port {', '.join(others)})" if others else ""
    what = f"the Service {service}" if service else "that address"
    return (
        f"{row.subject()}: the cluster got no answer: port {port} may not be one {what} exposes{also}, "
        "and traffic to a Service IP on a port it does not list is dropped; or a NetworkPolicy or firewall drops "
        "it, or nothing routes to that address"
    )


def hint_for(
    row: Row,
    search: SearchList,
    elsewhere: Sequence[str] = (),
    answered: Sequence[str] = (),
) -> str | None:
    """``answered``: ports of the same address that some connect reached."""
    if not row.failed:
        return None
    if row.proto == "dns":
        return _dns_hint(row, search, elsewhere)
    subject = row.subject()
    if _agent_cause(row.failures):
        return (
            f"{subject}: ktrace could not reach the agent, so the cluster never saw these connects "
            "(the program got ETIMEDOUT once it had waited for the agent)"
        )
    if row.route == "local":
        if row.rule:
            return (
                f"{subject}: stayed on this machine because of {row.rule} ({row.failures_text()}); "
                "without that rule it would go through the cluster"
            )
        return None
    port = (row.dest or "").rpartition(":")[2]
    if "ETIMEDOUT" in row.failures:
        timeout_hint = _timeout_hint(row, search, port, answered)
        if timeout_hint:
            return timeout_hint
    for reason in row.failures:
        template = _CONNECT_HINTS.get(reason)
        if template:
            return f"{subject}: {template.format(port=port)}"
    if any(reason.startswith("reset") for reason in row.failures):
        return f"{subject}: the connection was reset (by the destination, or the agent's connection ended)"
    return None
