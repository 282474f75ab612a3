"""The DNS parse cache (ktrace/tunnel/dns_answers.py) gives exactly what parsing gives.

Messages are cached without their 2-byte ID and the ID is put back; these tests compare
the cached functions with the uncached reference on messages that differ only by ID, on
real dnspython messages of every shape the report distinguishes, and on arbitrary bytes.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from ktrace.tunnel.dns_answers import (
    _CACHEABLE_BYTES,
    parse_question,
    parse_question_uncached,
    parse_response,
    parse_response_uncached,
)

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(lambda labels: ".".join(labels) + ".")
IPV4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
RCODES = st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED])


def with_id(payload: bytes, message_id: int) -> bytes:
    return message_id.to_bytes(2, "big") + payload[2:]


MESSAGES = st.tuples(
    NAME,
    st.sampled_from(["A", "AAAA", "SRV", "TXT"]),
    st.booleans(),  # a response
    RCODES,
    st.lists(IPV4, max_size=3),
    st.integers(0, 300),
    st.booleans(),  # truncated
)


def build(spec: tuple[str, str, bool, dns.rcode.Rcode, list[str], int, bool]) -> bytes:
    """Built in the test, not in the strategy: dnspython touches the random module."""
    name, qtype, is_response, rcode, addresses, ttl, truncated = spec
    query = dns.message.make_query(name, qtype, id=0)
    if not is_response:
        return bytes(query.to_wire())
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if addresses:
        response.answer.append(dns.rrset.from_text(query.question[0].name, ttl, "IN", "A", *addresses))
    if truncated:
        response.flags |= dns.flags.TC
    return bytes(response.to_wire())


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_cached_parse_equals_parse_for_any_id(
    spec: tuple[str, str, bool, dns.rcode.Rcode, list[str], int, bool], first: int, second: int
) -> None:
    payload = build(spec)
    for message_id in (first, second, first):  # the second and third are cache hits
        wire = with_id(payload, message_id)
        assert parse_question(wire) == parse_question_uncached(wire)
        assert parse_response(wire) == parse_response_uncached(wire)
    response = parse_response(with_id(payload, second))
    question = response.question if response is not None else parse_question(with_id(payload, second))
    assert question is not None and question.id == second


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.integers(0, 0xFFFF))
def test_cached_parse_equals_parse_for_any_bytes(payload: bytes, message_id: int) -> None:
    for wire in (payload, with_id(payload, message_id) if len(payload) >= 2 else payload):
        assert parse_question(wire) == parse_question_uncached(wire)
        assert parse_response(wire) == parse_response_uncached(wire)


def test_large_messages_are_parsed_without_the_cache() -> None:
    query = dns.message.make_query("big.example.", "TXT", id=0)
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("big.example.", 30, "IN", "TXT", *[f'"{i} {"x" * 200}"' for i in range(12)])
    )
    wire = bytes(response.to_wire())
    assert len(wire) > _CACHEABLE_BYTES
    for message_id in (1, 2):
        parsed = parse_response(with_id(wire, message_id))
        assert parsed is not None and parsed.outcome == "answer" and parsed.question.id == message_id
        assert parsed == parse_response_uncached(with_id(wire, message_id))
