"""What the recorder shows live and logs, per verbosity (no tracer: callbacks driven directly)."""

from __future__ import annotations

import io
import ipaddress
import json
import pathlib
from typing import TextIO

import dns.message
import dns.rcode

from ktrace.report.recorder import Recorder
from ktrace.report.render import Renderer, Verbosity
from ktrace.report.searchlist import SearchList
from ktrace.rules import Route, RuleSet
from ktrace.tracer.tcp import ConnectEvent
from ktrace.tunnel.dns_answers import build_query
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.types import Endpoint, TcpStats

SEARCH = SearchList.parse("nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n")
DNS = Endpoint(ipaddress.ip_address("10.96.0.10"), 53)
REFUSED = Endpoint(ipaddress.ip_address("10.96.1.12"), 80)


def recorder(verbosity: Verbosity, log: TextIO | None = None) -> tuple[Recorder, io.StringIO]:
    err = io.StringIO()
    rules = RuleSet()
    return Recorder(Renderer(err, verbosity), SEARCH, DnsMap(), rules.resolve, log, frozenset({DNS})), err


def nxdomain(rec: Recorder, name: str) -> None:
    query = build_query(name + ".")
    rec.sent(1, DNS, query)
    response = dns.message.make_response(dns.message.from_wire(query))
    response.set_rcode(dns.rcode.NXDOMAIN)
    rec.received(1, DNS, response.to_wire())


def test_default_shows_each_new_failure_once_and_a_failed_lookup_once() -> None:
    rec, err = recorder(Verbosity.FAILURES)
    rec.on_connect(ConnectEvent(10, REFUSED, "ECONNREFUSED"))
    rec.on_connect(ConnectEvent(10, REFUSED, "ECONNREFUSED"))
    rec.on_connect(ConnectEvent(10, Endpoint(ipaddress.ip_address("10.96.1.10"), 80), "ok"))
    for name in SEARCH.candidates("orders"):
        nxdomain(rec, name)
    assert err.getvalue().splitlines() == [
        "ktrace: connect 10.96.1.12:80 -> ECONNREFUSED [remote] pid 10",
        "ktrace: dns lookup of orders failed: NXDOMAIN x4 (asked orders.default.svc.cluster.local, "
        "orders.svc.cluster.local, orders.cluster.local, orders) [remote]",
    ]
    rec.finish_dns()
    summary = rec.finish(1)
    assert summary.failed and len(summary.rows) == 3
    lines = err.getvalue().splitlines()
    assert lines[2] == "ktrace: summary: 3 destination(s), 2 with failures"
    assert lines[3].split() == [
        "ktrace:",
        "NAME",
        "ADDRESS",
        "PROTO",
        "ROUTE",
        "ATTEMPTS",
        "OK",
        "FAILED",
        "UP",
        "DOWN",
    ]
    assert lines[4].split()[1:8] == ["-", "10.96.1.12:80", "tcp", "remote", "2", "0", "ECONNREFUSED"]
    assert any(line.startswith("ktrace: hint: orders: no service orders in namespace default") for line in lines)


def test_quiet_shows_nothing_but_still_logs(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "log.jsonl"
    log = path.open("w", encoding="utf-8")
    rec, err = recorder(Verbosity.QUIET, log)
    rec.start(["curl", "x"], "unix:/a.sock")
    rec.on_connect(ConnectEvent(10, REFUSED, "ECONNREFUSED"))
    rec.closed(REFUSED, TcpStats(1, 2, "reset: ECONNRESET"), None)
    rec.finish(3)
    assert err.getvalue() == "" and log.closed
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "connect", "close", "exit"]
    assert events[-1] == {**events[-1], "status": 3, "events": 3}


def test_verbose_shows_everything_and_the_summary_of_a_clean_run() -> None:
    rec, err = recorder(Verbosity.ALL)
    hello = Endpoint(ipaddress.ip_address("10.96.1.10"), 8080)
    rec.dns_map.record("hello.default.svc.cluster.local", [hello.ip])
    rec.on_connect(ConnectEvent(10, hello, "ok", duration=0.002))
    rec.closed(hello, TcpStats(74, 1234), None)
    rec.finish(0)
    text = err.getvalue()
    assert "ktrace: connect 10.96.1.10:8080 (hello.default.svc.cluster.local) -> ok [remote] pid 10 2.0ms" in text
    assert "ktrace: close tcp 10.96.1.10:8080 (hello.default.svc.cluster.local) up 74 B down 1.2 kB closed" in text
    assert "ktrace: summary: 1 destination(s), 0 with failures" in text


def test_default_prints_nothing_for_a_clean_run() -> None:
    rec, err = recorder(Verbosity.FAILURES)
    rec.on_connect(ConnectEvent(10, Endpoint(ipaddress.ip_address("10.96.1.10"), 80), "ok"))
    rec.finish(0)
    assert err.getvalue() == ""


def test_the_terminal_form_is_a_table() -> None:
    err = io.StringIO()
    rec = Recorder(Renderer(err, Verbosity.FAILURES, terminal=True), SEARCH, DnsMap(), RuleSet().resolve)
    rec.on_connect(ConnectEvent(10, REFUSED, "ECONNREFUSED", decision=None))
    rec.finish(1)
    text = err.getvalue()
    assert "ktrace: network summary" in text and "ECONNREFUSED" in text and "│" in text
    assert "hint: 10.96.1.12:80: refused by the cluster" in " ".join(text.split())


def test_a_json_log_that_cannot_be_written_stops_with_one_message() -> None:
    log = io.StringIO()
    log.close()
    rec, err = recorder(Verbosity.FAILURES, log)
    rec.on_connect(ConnectEvent(10, REFUSED, "ECONNREFUSED"))
    rec.on_connect(ConnectEvent(10, REFUSED, "ETIMEDOUT"))
    assert err.getvalue().count("cannot write the JSON log") == 1
    assert Route.REMOTE.value in err.getvalue()


def test_a_connect_reported_after_the_program_resumed_keeps_its_time(tmp_path: pathlib.Path) -> None:
    """The tracer reports a tunnelled connect once the program is on its way again: the
    event's time is when it started (when its outcome was known, minus its duration),
    however much later the recorder sees it."""
    path = tmp_path / "log.json"
    with path.open("w") as log:
        rec, _ = recorder(Verbosity.QUIET, log)
        rec.on_connect(ConnectEvent(10, REFUSED, "ECONNREFUSED", duration=0.25, wall=1000.0))
    [connect] = [json.loads(line) for line in path.read_text().splitlines()]
    assert connect["event"] == "connect" and connect["time"] == 999.75
