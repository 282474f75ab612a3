"""The DNS cache (ktrace/tunnel/dns_cache.py): what it keeps, for how long, and what it answers.

Table tests build queries and answers with dnspython; the fuzz tests check the invariants a
program relies on (an answer from the cache is the nameserver's but for the ID, the question's
case and lowered TTLs; nothing malformed, failed or truncated is ever served; arbitrary bytes
never raise).
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktrace.tunnel.dns_cache import MAX_NEGATIVE_TTL, MAX_TTL, DnsCache, parse_query

SERVER = ("10.96.0.10", 53)
NAME = "hello.default.svc.cluster.local."
SOA = "ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 {minimum}"


def query(
    name: str = NAME, qtype: str = "A", *, qid: int = 0x1234, edns: int = -1, flags: int = dns.flags.RD, **kw: object
) -> dns.message.QueryMessage:
    message = dns.message.make_query(name, qtype, use_edns=edns, id=qid, flags=flags, **kw)  # type: ignore[arg-type]
    return message


def answer_to(
    q: dns.message.Message,
    *records: tuple[str, int, str, str],
    authority: tuple[tuple[str, int, str, str], ...] = (),
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    tc: bool = False,
) -> bytes:
    """The answer a server would send to ``q``: (owner, ttl, type, rdata) records."""
    response = dns.message.make_response(q)
    response.set_rcode(rcode)
    for owner, ttl, rdtype, rdata in records:
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, rdata))
    for owner, ttl, rdtype, rdata in authority:
        response.authority.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, rdata))
    if tc:
        response.flags |= dns.flags.TC
    return bytes(response.to_wire())


def ask(cache: DnsCache, q: dns.message.Message, now: float, server: object = SERVER) -> bytes | None:
    return cache.lookup(server, q.to_wire(), now)


def stored(cache: DnsCache, q: dns.message.Message, answer: bytes, now: float = 100.0) -> bool:
    assert ask(cache, q, now) is None
    return cache.store(SERVER, answer, now)


def ttls(wire: bytes) -> list[int]:
    message = dns.message.from_wire(wire)
    return [rrset.ttl for section in (message.answer, message.authority) for rrset in section]


def same_but_id_and_ttls(a: bytes, b: bytes) -> bool:
    ma, mb = dns.message.from_wire(a), dns.message.from_wire(b)
    mb.id = ma.id
    for section in (mb.answer, mb.authority, mb.additional):
        for rrset in section:
            rrset.ttl = 0
    for section in (ma.answer, ma.authority, ma.additional):
        for rrset in section:
            rrset.ttl = 0
    return bool(ma == mb)


A_RECORD = (NAME, 30, "A", "10.96.1.10")


def test_a_repeated_question_is_answered_from_the_cache_with_its_id_and_lowered_ttls() -> None:
    cache = DnsCache()
    first = query(qid=1)
    answer = answer_to(first, A_RECORD)
    assert stored(cache, first, answer)
    again = query(qid=2)
    got = ask(cache, again, 100.9)
    assert got is not None
    assert got == struct.pack("!H", 2) + answer[2:]  # under a second: the nameserver's bytes, our ID
    later = ask(cache, query(qid=3), 112.5)
    assert later is not None and dns.message.from_wire(later).id == 3
    assert ttls(later) == [18]  # 30 - 12 whole seconds
    assert same_but_id_and_ttls(answer, later)
    assert (cache.hits, cache.misses) == (2, 1)


def test_the_answer_echoes_the_questions_case() -> None:
    cache = DnsCache()
    first = query("Hello.Default.svc.cluster.local.", qid=1)
    assert stored(cache, first, answer_to(first, A_RECORD))
    mixed = query("hELLo.default.SVC.cluster.local.", qid=7)
    got = ask(cache, mixed, 101.0)
    assert got is not None
    assert got[12:].startswith(mixed.to_wire()[12:])
    assert str(dns.message.from_wire(got).question[0].name) == "hELLo.default.SVC.cluster.local."


def test_expired_answers_are_asked_again() -> None:
    cache = DnsCache()
    first = query()
    assert stored(cache, first, answer_to(first, (NAME, 5, "A", "10.96.1.10")))
    assert ask(cache, query(), 104.99) is not None
    assert ask(cache, query(), 105.0) is None
    assert len(cache) == 0


def test_the_smallest_ttl_of_a_cname_chain_bounds_the_entry() -> None:
    cache = DnsCache()
    first = query("www.example.", qid=1)
    answer = answer_to(first, ("www.example.", 300, "CNAME", "web.example."), ("web.example.", 20, "A", "192.0.2.1"))
    assert stored(cache, first, answer)
    got = ask(cache, query("www.example."), 110.0)
    assert got is not None and ttls(got) == [290, 10]
    assert ask(cache, query("www.example."), 120.0) is None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(query(flags=dns.flags.RD), query(flags=0), id="RD"),
        pytest.param(query(flags=dns.flags.RD), query(flags=dns.flags.RD | dns.flags.CD), id="CD"),
        pytest.param(query(flags=dns.flags.RD), query(flags=dns.flags.RD | dns.flags.AD), id="AD"),
        pytest.param(query(), query(edns=0), id="EDNS"),
        pytest.param(query(edns=0), query(edns=0, want_dnssec=True), id="DO"),
        pytest.param(query(), query(qtype="AAAA"), id="type"),
        pytest.param(query(), query(rdclass="CH"), id="class"),
        pytest.param(query(), query("other.default.svc.cluster.local."), id="name"),
    ],
)
def test_questions_that_may_get_another_answer_are_kept_apart(
    first: dns.message.Message, second: dns.message.Message
) -> None:
    cache = DnsCache()
    assert stored(cache, first, answer_to(first, (str(first.question[0].name), 30, "A", "10.96.1.10")))
    assert ask(cache, second, 101.0) is None
    assert ask(cache, first, 101.0) is not None


def test_answers_of_two_nameservers_are_not_mixed() -> None:
    cache = DnsCache()
    first = query()
    assert stored(cache, first, answer_to(first, A_RECORD))
    assert ask(cache, query(), 101.0, server=("10.96.0.11", 53)) is None


def test_nxdomain_is_kept_for_the_soas_minimum() -> None:
    cache = DnsCache()
    first = query("nosuch.cluster.local.")
    soa = ("cluster.local.", 30, "SOA", SOA.format(minimum=10))
    answer = answer_to(first, authority=(soa,), rcode=dns.rcode.NXDOMAIN)
    assert stored(cache, first, answer)
    got = ask(cache, query("nosuch.cluster.local."), 103.0)
    assert got is not None
    message = dns.message.from_wire(got)
    assert message.rcode() == dns.rcode.NXDOMAIN and ttls(got) == [27]  # the SOA's own TTL, lowered
    assert ask(cache, query("nosuch.cluster.local."), 110.0) is None  # min(30, minimum 10)


def test_nodata_is_kept_and_a_soas_ttl_below_its_minimum_wins() -> None:
    cache = DnsCache()
    first = query(qtype="AAAA")
    soa = ("cluster.local.", 4, "SOA", SOA.format(minimum=60))
    assert stored(cache, first, answer_to(first, authority=(soa,)))
    assert ask(cache, query(qtype="AAAA"), 103.9) is not None
    assert ask(cache, query(qtype="AAAA"), 104.0) is None


def test_caps_on_how_long_anything_is_kept() -> None:
    cache = DnsCache()
    first = query()
    assert stored(cache, first, answer_to(first, (NAME, 86400, "A", "10.96.1.10")))
    assert ask(cache, query(), 100.0 + MAX_TTL - 1) is not None
    assert ask(cache, query(), 100.0 + MAX_TTL) is None
    negative = query("gone.cluster.local.")
    soa = ("cluster.local.", 86400, "SOA", SOA.format(minimum=86400))
    assert stored(cache, negative, answer_to(negative, authority=(soa,), rcode=dns.rcode.NXDOMAIN), 200.0)
    assert ask(cache, query("gone.cluster.local."), 200.0 + MAX_NEGATIVE_TTL) is None


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda q: answer_to(q, rcode=dns.rcode.SERVFAIL), id="SERVFAIL"),
        pytest.param(lambda q: answer_to(q, rcode=dns.rcode.REFUSED), id="REFUSED"),
        pytest.param(lambda q: answer_to(q, rcode=dns.rcode.FORMERR), id="FORMERR"),
        pytest.param(lambda q: answer_to(q, A_RECORD, tc=True), id="truncated"),
        pytest.param(lambda q: answer_to(q, (NAME, 0, "A", "10.96.1.10")), id="TTL 0"),
        pytest.param(lambda q: answer_to(q, rcode=dns.rcode.NXDOMAIN), id="NXDOMAIN without SOA"),
        pytest.param(answer_to, id="NODATA without SOA"),
        pytest.param(
            lambda q: answer_to(q, authority=(("default.svc.cluster.local.", 30, "NS", "ns1.example."),)),
            id="referral",
        ),
        pytest.param(lambda q: answer_to(q, A_RECORD)[:-3], id="cut short"),
        pytest.param(lambda q: answer_to(q, A_RECORD) + b"junk", id="trailing bytes"),
        pytest.param(lambda q: answer_to(query("other.example."), A_RECORD), id="another question"),
        pytest.param(lambda q: answer_to(query(qid=0x4321), A_RECORD), id="another ID"),
        pytest.param(lambda q: answer_to(query(flags=0), A_RECORD), id="RD not echoed"),
        pytest.param(lambda q: answer_to(query(edns=0), A_RECORD), id="EDNS to a query without"),
        pytest.param(lambda q: q.to_wire(), id="a query"),
    ],
)
def test_answers_never_kept(make: object) -> None:
    cache = DnsCache()
    first = query()
    answer = make(first)  # type: ignore[operator]
    stored(cache, first, answer)  # some are refused by their header, the rest when asked again
    assert ask(cache, query(), 101.0) is None
    assert len(cache) == 0


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR, dns.rcode.NOTIMP], ids=str)
def test_failures_are_not_even_kept_unchecked(rcode: dns.rcode.Rcode) -> None:
    cache = DnsCache()
    first = query()
    assert not stored(cache, first, answer_to(first, rcode=rcode))
    assert not stored(cache, query(qid=9), answer_to(query(qid=9), A_RECORD, tc=True))


def test_an_answer_nobody_asked_for_is_not_kept() -> None:
    cache = DnsCache()
    unasked = answer_to(query(), A_RECORD)
    assert not cache.store(SERVER, unasked, 100.0)
    assert ask(cache, query(qid=5), 101.0) is None
    first = query(qid=6)
    assert ask(cache, first, 100.0, server=("10.96.0.11", 53)) is None
    assert not cache.store(SERVER, answer_to(first, A_RECORD), 100.0)  # asked of another server


def test_only_the_first_answer_to_a_question_is_taken() -> None:
    cache = DnsCache()
    first = query()
    assert stored(cache, first, answer_to(first, A_RECORD))
    assert not cache.store(SERVER, answer_to(first, (NAME, 30, "A", "10.96.6.6")), 100.5)


@pytest.mark.parametrize(
    "q",
    [
        pytest.param(
            query(edns=0, options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8)]), id="client cookie"
        ),
        pytest.param(query(edns=1), id="EDNS version 1"),
        pytest.param(dns.message.make_query(NAME, "A", id=1).to_wire()[:-2], id="malformed"),
        pytest.param(b"\x12\x34", id="too short"),
    ],
)
def test_queries_left_alone(q: dns.message.Message | bytes) -> None:
    wire = q if isinstance(q, bytes) else q.to_wire()
    assert parse_query(wire) is None
    cache = DnsCache()
    assert cache.lookup(SERVER, wire, 100.0) is None
    assert cache.misses == 0


def test_a_query_with_an_answer_section_or_an_update_is_left_alone() -> None:
    q = query()
    q.answer.append(dns.rrset.from_text(NAME, 30, "IN", "A", "10.96.1.10"))
    assert parse_query(q.to_wire()) is None
    update = query()
    update.set_opcode(dns.opcode.UPDATE)
    assert parse_query(update.to_wire()) is None


def test_an_answer_too_large_for_a_plain_query_is_not_served_to_it() -> None:
    cache = DnsCache()
    big = query("big.cluster.local.", edns=0, payload=1232)
    records = [("big.cluster.local.", 30, "A", f"10.96.3.{i}") for i in range(1, 60)]
    answer = answer_to(big, *records)
    assert 512 < len(answer) <= 1232
    assert stored(cache, big, answer)
    assert ask(cache, query("big.cluster.local.", edns=0, payload=1232), 101.0) is not None
    assert ask(cache, query("big.cluster.local.", edns=0, payload=512), 101.0) is None


def test_least_recently_used_entries_go_first() -> None:
    cache = DnsCache(max_entries=2)
    names = [f"n{i}.cluster.local." for i in range(3)]
    for i, name in enumerate(names[:2]):
        q = query(name, qid=i)
        assert stored(cache, q, answer_to(q, (name, 30, "A", "10.0.0.1")))
    assert ask(cache, query(names[0]), 100.5) is not None  # n0 used: n1 is now the oldest
    q = query(names[2], qid=9)
    assert stored(cache, q, answer_to(q, (names[2], 30, "A", "10.0.0.1")))
    assert len(cache) == 2
    assert ask(cache, query(names[1]), 100.6) is None
    assert ask(cache, query(names[0]), 100.6) is not None


# --- fuzz -------------------------------------------------------------------------------------

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
NAMES = st.lists(LABEL, min_size=1, max_size=4).map(lambda labels: ".".join(labels) + ".")
IPV4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
RCODES = st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED])
FLAGS = st.sampled_from([0, dns.flags.RD, dns.flags.RD | dns.flags.CD, dns.flags.RD | dns.flags.AD])

EXCHANGES = st.fixed_dictionaries(
    {
        "name": NAMES,
        "qtype": st.sampled_from(["A", "AAAA", "TXT"]),
        "flags": FLAGS,
        "edns": st.sampled_from([-1, 0]),
        "rcode": RCODES,
        "addresses": st.lists(IPV4, max_size=3),
        "ttl": st.integers(0, 2**31 - 1),
        "soa": st.none() | st.tuples(st.integers(0, 100_000), st.integers(0, 100_000)),
        "tc": st.booleans(),
        "ids": st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
        "case": st.lists(st.booleans(), min_size=64, max_size=64),
        "elapsed": st.floats(0, 4000, allow_nan=False),
    }
)


def _recase(name: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flip else c for c, flip in zip(name, flips + [False] * len(name), strict=False))


@settings(max_examples=300, deadline=None)
@given(EXCHANGES)
def test_fuzz_a_cached_answer_is_the_nameservers_and_never_a_failure(ex: dict[str, object]) -> None:
    name, qtype, ids = str(ex["name"]), str(ex["qtype"]), ex["ids"]
    assert isinstance(ids, tuple)
    first = query(name, qtype, qid=ids[0], edns=int(ex["edns"]), flags=int(ex["flags"]))  # type: ignore[call-overload]
    records = [(name, ex["ttl"], "A", a) for a in ex["addresses"]] if qtype == "A" else []  # type: ignore[attr-defined]
    soa = ex["soa"]
    authority = ((name, soa[0], "SOA", SOA.format(minimum=soa[1])),) if isinstance(soa, tuple) else ()
    answer = answer_to(first, *records, authority=authority, rcode=ex["rcode"], tc=bool(ex["tc"]))  # type: ignore[arg-type]
    cache = DnsCache()
    stored(cache, first, answer, now=1000.0)
    message = dns.message.from_wire(answer)
    again = query(_recase(name, ex["case"]), qtype, qid=ids[1], edns=int(ex["edns"]), flags=int(ex["flags"]))  # type: ignore[arg-type,call-overload]
    elapsed = float(ex["elapsed"])  # type: ignore[arg-type]
    got = ask(cache, again, 1000.0 + elapsed)
    if got is None:
        return
    assert message.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    assert not message.flags & dns.flags.TC
    assert min(ttls(answer)) > 0
    served = dns.message.from_wire(got)
    assert served.id == ids[1]
    asked = parse_query(again.to_wire())
    assert asked is not None
    assert got[12 : 12 + len(asked.question)] == asked.question  # the question, as asked
    assert same_but_id_and_ttls(answer, got)
    original, lowered = ttls(answer), ttls(got)
    assert all(0 < low == ttl - int(elapsed) for ttl, low in zip(original, lowered, strict=True))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_fuzz_arbitrary_bytes_never_raise_nor_get_served(q: bytes, a: bytes) -> None:
    cache = DnsCache()
    assert cache.lookup(SERVER, q, 1.0) is None
    cache.store(SERVER, a, 1.5)
    got = cache.lookup(SERVER, q, 2.0)
    if got is not None:  # only when a really answers q: then it parses, and is no failure
        message = dns.message.from_wire(got)
        assert message.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 600))
def test_fuzz_a_damaged_answer_is_never_served_unless_it_still_parses(damage: bytes, at: int) -> None:
    cache = DnsCache()
    first = query()
    answer = bytearray(answer_to(first, A_RECORD, (NAME, 30, "A", "10.96.1.11")))
    at = at % len(answer)
    answer[at : at + len(damage)] = damage
    if cache.lookup(SERVER, first.to_wire(), 1.0) is not None:
        return
    cache.store(SERVER, bytes(answer), 1.0)
    got = cache.lookup(SERVER, query(qid=first.id).to_wire(), 1.5)
    if got is not None:
        message = dns.message.from_wire(bytes(answer))  # raises if the cache served something malformed
        assert message.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) and not message.flags & dns.flags.TC


def test_parse_query_reads_the_udp_size_and_flags() -> None:
    parsed = parse_query(query(edns=0, payload=1232, want_dnssec=True, flags=dns.flags.RD | dns.flags.CD).to_wire())
    assert parsed is not None
    assert parsed.max_size == 1232 and parsed.key.dnssec_ok and parsed.key.edns
    assert parsed.key.flags == dns.flags.RD | dns.flags.CD
    assert parsed.key.name == dns.name.from_text(NAME).to_wire()
    assert parsed.key.rdtype == dns.rdatatype.A
    plain = parse_query(query().to_wire())
    assert plain is not None and plain.max_size == 512 and not plain.key.edns
