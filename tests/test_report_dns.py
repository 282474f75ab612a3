"""Pairing DNS questions with answers, timeouts (pure), and answering names locally (loopback sockets)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest

from ktrace.report.dns_tracker import DnsTracker
from ktrace.rules import Route, RouteDecision, RuleSet
from ktrace.tunnel.dns_answers import build_query, parse_question, parse_response, servfail_for
from ktrace.tunnel.local_dns import LocalResolver, first_nameserver
from ktrace.tunnel.types import Endpoint

SERVER = Endpoint(ipaddress.ip_address("10.96.0.10"), 53)
RULES = RuleSet.parse(local=[("db.corp", "--local")])


def answer(query: bytes, *addresses: str, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> bytes:
    message = dns.message.from_wire(query)
    response = dns.message.make_response(message)
    response.set_rcode(rcode)
    if addresses:
        response.answer.append(dns.rrset.from_text(message.question[0].name, 30, "IN", "A", *addresses))
    wire: bytes = response.to_wire()
    return wire


def test_question_and_response_parsing() -> None:
    query = build_query("hello.default.svc.cluster.local.", "AAAA")
    question = parse_question(query)
    assert question is not None and (question.name, question.qtype) == ("hello.default.svc.cluster.local", "AAAA")
    assert parse_response(query) is None and parse_question(b"junk") is None
    ok = parse_response(answer(build_query("a.b.", "A"), "10.0.0.1", "10.0.0.2"))
    assert (
        ok is not None and ok.outcome == "answer" and sorted(str(a) for a in ok.addresses) == ["10.0.0.1", "10.0.0.2"]
    )
    nodata = parse_response(answer(build_query("a.b.", "AAAA")))
    assert nodata is not None and nodata.outcome == "NODATA"
    nx = parse_response(answer(build_query("a.b."), rcode=dns.rcode.NXDOMAIN))
    assert nx is not None and nx.outcome == "NXDOMAIN"
    fail = servfail_for(query)
    assert fail is not None
    parsed = parse_response(fail)
    assert parsed is not None and parsed.outcome == "SERVFAIL" and parsed.question.id == question.id


def test_tracker_pairs_answers_and_ignores_retransmissions() -> None:
    tracker = DnsTracker(RULES.resolve)
    query = build_query("hello.default.svc.cluster.local.")
    tracker.sent(7, SERVER, query, wall=100.0, now=1.0)
    tracker.sent(7, SERVER, query, wall=101.0, now=2.0)  # the same question again
    assert len(tracker) == 1
    assert tracker.received(8, SERVER, answer(query, "10.96.1.10"), 102.0, 2.5) is not None  # another socket: unpaired
    event = tracker.received(7, SERVER, answer(query, "10.96.1.10"), wall=102.0, now=2.5)
    assert event is not None and len(tracker) == 0
    assert (event.time, event.name, event.qtype, event.outcome) == (
        100.0,
        "hello.default.svc.cluster.local",
        "A",
        "answer",
    )
    assert event.addresses == ("10.96.1.10",) and event.duration == 1.5 and event.route == "remote"
    assert event.server == "10.96.0.10:53" and event.rule is None


def test_tracker_times_out_and_flushes_at_exit() -> None:
    tracker = DnsTracker(RULES.resolve, timeout=5.0)
    tracker.sent(1, SERVER, build_query("db.corp."), wall=10.0, now=0.0)
    tracker.sent(1, SERVER, build_query("late.example."), wall=14.0, now=4.0)
    assert tracker.expire(now=4.9) == []
    [late] = tracker.expire(now=5.0)
    assert (late.name, late.outcome, late.route, late.rule, late.duration) == (
        "db.corp",
        "timeout",
        "local",
        "--local db.corp",
        None,
    )
    [cut] = tracker.expire(now=5.0, everything=True)
    assert (cut.name, cut.outcome, cut.failed) == ("late.example", "unanswered", False)


def test_name_rules_decide_where_a_question_is_answered() -> None:
    assert RULES.resolve("DB.corp.").route is Route.LOCAL
    assert RULES.resolve("db.corp.default.svc.cluster.local") == RouteDecision(Route.REMOTE)
    assert first_nameserver("# x\nnameserver fe80::1%eth0\nnameserver 1.1.1.1\n") == ("fe80::1", 53)
    assert first_nameserver("search x\n") is None


@pytest.fixture
def loopback_dns() -> Iterator[tuple[str, int]]:
    """A DNS server on 127.0.0.1 that answers every A question with 192.0.2.7."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            sock.sendto(answer(data, "192.0.2.7"), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()
    finally:
        stop.set()
        thread.join(5)
        sock.close()


@pytest.mark.timeout(30)
def test_local_resolver_forwards_and_fails_fast(loopback_dns: tuple[str, int]) -> None:
    async def scenario() -> tuple[bytes, bytes, bytes]:
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[bytes]] = [loop.create_future() for _ in range(3)]
        wants = LocalResolver(lambda name: RULES.resolve(name).route is Route.LOCAL, loopback_dns)
        assert wants.wants(build_query("db.corp.")) and not wants.wants(build_query("hello."))
        wants.forward(build_query("db.corp."), replies[0].set_result)
        # Nothing listens on this port: ECONNREFUSED comes back as an ICMP error, then SERVFAIL.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
            closed.bind(("127.0.0.1", 0))
            dead_port = closed.getsockname()[1]
        refused = LocalResolver(lambda name: True, ("127.0.0.1", dead_port))
        refused.forward(build_query("db.corp."), replies[1].set_result)
        LocalResolver(lambda name: True, None).forward(build_query("db.corp."), replies[2].set_result)
        try:
            return tuple([await asyncio.wait_for(r, 10) for r in replies])  # type: ignore[return-value]
        finally:
            wants.close()
            refused.close()

    forwarded, refused, nowhere = asyncio.run(scenario())
    ok = parse_response(forwarded)
    assert ok is not None and [str(a) for a in ok.addresses] == ["192.0.2.7"]
    for reply in (refused, nowhere):
        failed = parse_response(reply)
        assert failed is not None and failed.outcome == "SERVFAIL" and failed.question.name == "db.corp"


def _wire_with_bad_pointer(query: bytes) -> bytes:
    """An answer to ``query`` whose record's owner name points at itself (a loop)."""
    good = bytearray(answer(query, "10.0.0.1"))
    record = len(query)  # the answer section starts where the query's question ended
    good[record : record + 2] = (0xC000 | record).to_bytes(2, "big")
    return bytes(good)


def test_a_malformed_answer_ends_its_question_as_malformed() -> None:
    tracker = DnsTracker(RULES.resolve)
    query = build_query("loop.test.")
    tracker.sent(7, SERVER, query, 100.0, 1.0)
    event = tracker.received(7, SERVER, _wire_with_bad_pointer(query), 100.1, 1.1)
    assert event is not None and event.outcome == "malformed" and event.name == "loop.test"
    assert event.detail is not None and event.detail.startswith(
        "in the records: a name's compression pointer loops or points forward (header counts 1 question(s), 1 answer(s)"
    )
    assert len(tracker) == 0 and tracker.expire(10.0) == []


def test_a_response_without_its_question_pairs_by_id() -> None:
    tracker = DnsTracker(RULES.resolve)
    query = build_query("hello.default.svc.cluster.local.")
    tracker.sent(7, SERVER, query, 100.0, 1.0)
    formerr = bytearray(query[:12])
    formerr[2] |= 0x80  # QR
    formerr[3] = (formerr[3] & 0xF0) | dns.rcode.FORMERR
    formerr[4:6] = b"\0\0"  # no question
    event = tracker.received(7, SERVER, bytes(formerr), 100.1, 1.1)
    assert event is not None and (event.name, event.outcome) == ("hello.default.svc.cluster.local", "FORMERR")
    assert event.detail == "FORMERR without the question"
    short = tracker.received(7, SERVER, query[:2] + b"\x80", 100.2, 1.2)
    assert short is None  # nothing pending with that id any more
