"""The summary and its hints, from events (pure)."""

from __future__ import annotations

import pytest

from ktrace.report import summary as summary_module
from ktrace.report.events import Closed, Connect, DnsQuery, Event, UdpFlow
from ktrace.report.searchlist import SearchList
from ktrace.report.summary import Tally, failed_lookups, names_to_probe, summarize

SEARCH = SearchList.parse(
    "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
)
DNS = "10.96.0.10:53"


def q(name: str, outcome: str, qtype: str = "A", route: str = "remote", rule: str | None = None) -> DnsQuery:
    addresses = ("10.96.1.10",) if outcome == "answer" else ()
    return DnsQuery(1.0, name, qtype, outcome, route, DNS, addresses, 0.001, rule)


def lookup(stem: str, outcomes: list[str]) -> list[DnsQuery]:
    return [q(name, outcome) for name, outcome in zip(SEARCH.candidates(stem), outcomes, strict=False)]


def test_search_list() -> None:
    assert SEARCH.domains == ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert SEARCH.nameservers == ("10.96.0.10",)
    assert SEARCH.namespace == "default" and SEARCH.cluster_domain == "cluster.local"
    assert SEARCH.looked_up("orders.default.svc.cluster.local") == "orders"
    assert SEARCH.looked_up("orders.svc.cluster.local") == "orders"
    assert SEARCH.looked_up("example.com") == "example.com"
    assert SEARCH.service_name("orders", "shop") == "orders.shop.svc.cluster.local"
    assert SEARCH.namespace_of("hello.other-ns.svc.cluster.local") == "other-ns"
    assert SEARCH.namespace_of("other-ns.svc.cluster.local") is None
    assert SearchList.parse("search a.b\nsearch c.d # later wins\n").domains == ("c.d",)


def test_search_list_nxdomains_of_a_found_name_are_not_failures() -> None:
    queries = lookup("example.com", ["NXDOMAIN", "NXDOMAIN", "NXDOMAIN", "answer"])
    queries += [q("hello.default.svc.cluster.local", "answer"), q("hello.default.svc.cluster.local", "NODATA", "AAAA")]
    assert failed_lookups(queries, SEARCH) == {}
    assert summarize(queries, SEARCH).rows == []


def test_short_name_nxdomain_is_one_failed_lookup_with_a_hint() -> None:
    queries = lookup("orders", ["NXDOMAIN", "NXDOMAIN", "NXDOMAIN", "REFUSED"])
    summary = summarize(queries, SEARCH)
    [row] = summary.rows
    assert (row.proto, row.name, row.attempts, row.ok) == ("dns", "orders", 4, 0)
    assert row.failures == {"NXDOMAIN": 3, "REFUSED": 1}
    assert row.asked == SEARCH.candidates("orders")
    assert names_to_probe(queries, SEARCH) == ["orders"]
    [hint] = summary.hints
    assert hint.startswith("orders: no service orders in namespace default (asked orders.default.svc.cluster.local")
    assert "orders.NAMESPACE" in hint


def test_same_named_service_elsewhere() -> None:
    queries = lookup("orders", ["NXDOMAIN", "NXDOMAIN", "NXDOMAIN", "NXDOMAIN"])
    summary = summarize(queries, SEARCH, {"orders": ["orders.shop.svc.cluster.local"]})
    assert summary.hints == [
        "orders: no such service in namespace default, but a service orders exists in namespace "
        "shop (orders.shop.svc.cluster.local): use orders.shop"
    ]


def test_dns_timeout_servfail_refused_and_local_rule() -> None:
    for outcome, words in [("timeout", "did not answer"), ("SERVFAIL", "SERVFAIL"), ("REFUSED", "REFUSED")]:
        [hint] = summarize([q("api.example.com", outcome)], SEARCH).hints
        assert hint.startswith("api.example.com: ") and words in hint
    local = q("db.corp.example", "NXDOMAIN", route="local", rule="--local db.corp.example")
    [hint] = summarize([local], SEARCH).hints
    assert "resolved on this machine because of --local db.corp.example" in hint
    assert names_to_probe([local], SEARCH) == []


def test_connect_rows_count_attempts_failures_and_bytes() -> None:
    hello, refused = "10.96.1.10:8080", "10.96.1.12:80"
    events: list[Event] = [
        Connect(1.0, 10, hello, "ok", "remote", "hello.default.svc.cluster.local"),
        Connect(1.1, 10, hello, "EINPROGRESS", "remote", "hello.default.svc.cluster.local"),
        Closed(2.0, hello, 100, 2000, "closed", "hello.default.svc.cluster.local"),
        Closed(2.1, hello, 50, 10, "reset: ECONNRESET", "hello.default.svc.cluster.local"),
        Connect(1.2, 11, refused, "ECONNREFUSED", "remote", "refused.default.svc.cluster.local"),
        Connect(1.3, 11, refused, "ECONNREFUSED", "remote", "refused.default.svc.cluster.local"),
        UdpFlow(1.4, 12, "10.96.1.11:7", "remote", "send", "echo.default.svc.cluster.local"),
    ]
    summary = summarize(events, SEARCH)
    rows = {(r.proto, r.dest): r for r in summary.rows}
    ok = rows["tcp", hello]
    assert (ok.attempts, ok.ok, ok.bytes_up, ok.bytes_down) == (2, 2, 150, 2010)
    assert ok.failures == {"reset: ECONNRESET": 1}
    bad = rows["tcp", refused]
    assert (bad.attempts, bad.ok, bad.failures_text()) == (2, 0, "ECONNREFUSED x2")
    assert rows["udp", "10.96.1.11:7"].ok == 1 and not rows["udp", "10.96.1.11:7"].failed
    assert summary.failed
    refused_hint = next(h for h in summary.hints if h.startswith(refused))
    assert refused_hint.startswith("10.96.1.12:80 (refused.default.svc.cluster.local): refused by the cluster")
    assert "no ready endpoints" in refused_hint and "port 80" in refused_hint


def test_local_because_of_a_rule_only_hints_when_it_failed() -> None:
    kept = Connect(1.0, 10, "10.96.2.1:80", "ECONNREFUSED", "local", rule="--local 10.96.2.0/24")
    fine = Connect(1.0, 10, "10.96.2.2:80", "ok", "local", rule="--local 10.96.2.0/24")
    loopback = Connect(1.0, 10, "127.0.0.1:9", "ECONNREFUSED", "local")
    summary = summarize([kept, fine, loopback], SEARCH)
    assert summary.hints == [
        "10.96.2.1:80: stayed on this machine because of --local 10.96.2.0/24 (ECONNREFUSED); "
        "without that rule it would go through the cluster"
    ]


def test_timeout_and_unreachable_hints() -> None:
    events: list[Event] = [
        Connect(1.0, 10, "10.96.2.1:80", "ETIMEDOUT", "remote", "blackhole.default.svc.cluster.local"),
        Connect(1.0, 10, "10.1.0.1:80", "ENETUNREACH", "remote"),
    ]
    hints = summarize(events, SEARCH).hints
    assert hints[0].startswith("10.96.2.1:80 (blackhole.default.svc.cluster.local): the cluster got no answer")
    assert hints[1] == "10.1.0.1:80: the cluster has no route to that address"


def test_the_tally_is_bounded_by_distinct_destinations_not_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(summary_module, "MAX_ROWS", 2)
    monkeypatch.setattr(summary_module, "MAX_NAMES", 1)
    counted = Tally()
    for i in range(1000):
        counted.add(Connect(1.0, 10, f"10.0.0.{i % 3}:80", "ok", "remote"))
        counted.add(q(f"n{i % 2}.example", "NXDOMAIN"))
    assert counted.events == 2000 and len(counted.rows) == 2 and len(counted.names) == 1
    assert counted.rows["tcp", "10.0.0.0:80"].attempts == 334
    assert counted.untracked == 333 + 500
    assert counted.summary(SEARCH).untracked == 833


def test_timeout_on_a_service_port_it_may_not_expose() -> None:
    events: list[Event] = [
        Connect(1.0, 10, "10.96.1.10:8080", "ok", "remote", "hello.default.svc.cluster.local"),
        Connect(1.0, 10, "10.96.1.10:9090", "ETIMEDOUT", "remote", "hello.default.svc.cluster.local"),
        Connect(1.0, 10, "10.1.0.1:80", "ETIMEDOUT", "remote"),  # no Service name, no other port: generic
    ]
    hints = summarize(events, SEARCH).hints
    assert hints[0] == (
        "10.96.1.10:9090 (hello.default.svc.cluster.local): the cluster got no answer: port 9090 may not be one "
        "the Service hello.default.svc.cluster.local exposes (it answered on port 8080), and traffic to a Service "
        "IP on a port it does not list is dropped; or a NetworkPolicy or firewall drops it, or nothing routes to "
        "that address"
    )
    assert hints[1].startswith("10.1.0.1:80: the cluster got no answer: a NetworkPolicy")


def test_names_in_the_hosts_file_are_not_failed_lookups() -> None:
    counted = Tally(hosts=frozenset({"ktrace-agent-pod"}))
    for event in lookup("ktrace-agent-pod", ["NXDOMAIN"] * 4) + lookup("orders", ["NXDOMAIN"] * 4):
        counted.add(event)
    assert list(counted.failed_lookups(SEARCH)) == ["orders"]


def test_failures_while_the_agent_was_unreachable_name_it() -> None:
    counted = Tally()
    counted.agent_outage = "the agent (unix:/run/a.sock) stopped answering at 12:00:00 (cannot connect to it)"
    counted.add(Connect(1.0, 10, "10.96.1.10:8080", "ETIMEDOUT", "remote", cause="agent unreachable"))
    counted.add(DnsQuery(1.0, "hello", "A", "timeout", "remote", DNS, cause="agent unreachable"))
    summary = counted.summary(SEARCH)
    assert [row.failures_text() for row in summary.rows] == [
        "ETIMEDOUT (agent unreachable)",
        "timeout (agent unreachable)",
    ]
    assert summary.hints == [
        "the agent (unix:/run/a.sock) stopped answering at 12:00:00 (cannot connect to it): is it still running, "
        "and is the path to it (port-forward, network) up?",
        "10.96.1.10:8080: ktrace could not reach the agent, so the cluster never saw these connects (the program "
        "got ETIMEDOUT once it had waited for the agent)",
        "hello: ktrace could not reach the agent, so the question never reached the cluster's DNS",
    ]


def test_malformed_answer_hint_says_what_was_wrong() -> None:
    bad = DnsQuery(1.0, "loop.test", "A", "malformed", "remote", DNS, detail="in the records: a pointer loop")
    assert summarize([bad], SEARCH).hints == [
        "loop.test: the DNS server's answer did not parse (in the records: a pointer loop); it came at once, so "
        "this is no timeout: the server, or something on the way, sends broken DNS messages"
    ]
