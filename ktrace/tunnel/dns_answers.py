"""Pure: DNS messages as ktrace needs them (the only user of dnspython): the name and
addresses in an answer, a query's question, a response's outcome, and the few
messages ktrace makes itself."""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from .types import IPAddress


def addresses_in_answer(payload: bytes) -> tuple[str, list[IPAddress]] | None:
    """``(queried name, A/AAAA addresses)`` from a DNS response, or None when it is not one.

    The name is the question's, without the final dot; CNAME chains are followed
    implicitly (every A/AAAA record of the answer section is returned).
    """
    response = parse_response(payload)
    if response is None:
        return None
    return response.question.name, list(response.addresses)


@dataclass(frozen=True)
class Question:
    id: int
    name: str  # without the final dot, as asked (case kept)
    qtype: str  # "A", "AAAA", ... or "TYPE65"

    def with_id(self, message_id: int) -> Question:
        return Question(message_id, self.name, self.qtype)


@dataclass(frozen=True)
class Response:
    question: Question
    outcome: str  # "answer", "NODATA", "truncated", or the rcode name (NXDOMAIN, SERVFAIL, ...)
    addresses: tuple[IPAddress, ...]

    def with_id(self, message_id: int) -> Response:
        return Response(self.question.with_id(message_id), self.outcome, self.addresses)


def _message(payload: bytes, *, response: bool) -> dns.message.Message | None:
    """``payload`` parsed, when it is a DNS response (``response``) or a query (not)."""
    try:
        message = dns.message.from_wire(payload, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError):
        return None
    if bool(message.flags & dns.flags.QR) != response:
        return None
    return message


def _question(message: dns.message.Message) -> Question | None:
    if not message.question:
        return None
    rrset = message.question[0]
    return Question(message.id, rrset.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(rrset.rdtype))


# Parsing a message with dnspython costs ~35 µs (a query) to ~90 µs (an answer) warm, two
# to three times that inside ktrace between stops, and a lookup is a query and an answer per
# address family. Programs ask the same names again and again (most have no resolver cache),
# and the server's messages for the same question are the same bytes but for the 2-byte ID
# (a cluster DNS answers with fixed TTLs). So the parse is cached by the message without its
# ID, and the ID is put back: the result is exactly what parsing this payload gives.
# Bounded: at most this many messages of at most _CACHEABLE_BYTES each (DNS over TCP can
# carry 64 KiB; such messages are parsed every time).
_CACHED_MESSAGES = 256
_CACHEABLE_BYTES = 2048


class _Parsed(Protocol):
    def with_id(self, message_id: int) -> Self: ...


_P = TypeVar("_P", bound=_Parsed)


def _cached_without_id(parse: Callable[[bytes], _P | None]) -> Callable[[bytes], _P | None]:
    """``parse``, cached by the message without its ID, the ID put back (see above)."""

    @functools.lru_cache(maxsize=_CACHED_MESSAGES)
    def without_id(body: bytes) -> _P | None:
        return parse(b"\0\0" + body)

    def cached(payload: bytes) -> _P | None:
        if len(payload) > _CACHEABLE_BYTES:
            return parse(payload)
        parsed = without_id(payload[2:])
        return None if parsed is None else parsed.with_id(int.from_bytes(payload[:2], "big"))

    return cached


def parse_question_uncached(payload: bytes) -> Question | None:
    """``parse_question`` without the cache (the reference its tests compare with)."""
    message = _message(payload, response=False)
    return _question(message) if message is not None else None


_questions = _cached_without_id(parse_question_uncached)


def parse_question(payload: bytes) -> Question | None:
    """The first question of a DNS query message, or None when it is not a query."""
    return _questions(payload)


def parse_response_uncached(payload: bytes) -> Response | None:
    """``parse_response`` without the cache (the reference its tests compare with)."""
    message = _message(payload, response=True)
    if message is None:
        return None
    question = _question(message)
    if question is None:
        return None
    addresses = tuple(
        ipaddress.ip_address(rdata.address)
        for rrset in message.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    )
    rcode = message.rcode()
    if rcode != dns.rcode.NOERROR:
        outcome = dns.rcode.to_text(rcode)
    elif message.answer:
        outcome = "answer"
    elif message.flags & dns.flags.TC:
        outcome = "truncated"
    else:
        outcome = "NODATA"
    return Response(question, outcome, addresses)


_responses = _cached_without_id(parse_response_uncached)


def parse_response(payload: bytes) -> Response | None:
    """A DNS response's question, outcome and A/AAAA addresses, or None when it is not one.

    A truncated answer (TC) that carries no records is "truncated": the resolver
    retries over TCP, so it is not a failure. Cached by content (see above): the DNS
    map and the report both read each answer the program receives, and the same
    answers come back for every lookup of a name.
    """
    return _responses(payload)


@dataclass(frozen=True)
class Malformed:
    """A message from a DNS server that is not a well-formed response: what ktrace could read of
    it (the ID, the question when that part parsed) and what was wrong."""

    id: int
    question: Question | None
    problem: str
    outcome: str = "malformed"  # or the rcode of a well-formed response without its question


_HEADER = struct.Struct(">HHHHHH")


def _problem(exc: Exception) -> str:
    if isinstance(exc, dns.name.BadPointer):
        return "a name's compression pointer loops or points forward"
    if isinstance(exc, dns.name.BadLabelType):
        return "a name has a label of an unknown type"
    if isinstance(exc, dns.name.NameTooLong):
        return "a name is longer than 255 bytes"
    if isinstance(exc, dns.exception.FormError):
        return "the message ends before the records its header counts"
    return f"{type(exc).__name__}: {exc}"


def malformed_response(payload: bytes) -> Malformed | None:
    """``payload`` as a DNS response that does not parse (``parse_response`` gave None), or None
    when it is not a response at all (a query, or too short to say)."""
    if len(payload) < 2:
        return None
    if len(payload) < _HEADER.size:
        return Malformed(int.from_bytes(payload[:2], "big"), None, f"shorter than a DNS header ({len(payload)} bytes)")
    message_id, flags, qd, an, ns, ar = _HEADER.unpack_from(payload)
    if not flags & dns.flags.QR:
        return None
    counts = f"header counts {qd} question(s), {an} answer(s), {ns} authority, {ar} additional; {len(payload)} bytes"
    try:
        head = dns.message.from_wire(payload, question_only=True, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError) as exc:
        return Malformed(message_id, None, f"in the question: {_problem(exc)} ({counts})")
    question = _question(head)
    try:
        message = dns.message.from_wire(payload, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError) as exc:
        return Malformed(message_id, question, f"in the records: {_problem(exc)} ({counts})")
    if question is not None:
        return None  # parses: not malformed
    # A server may answer a question it could not read (FORMERR, NOTIMP) without repeating it.
    rcode = message.rcode()
    if rcode != dns.rcode.NOERROR:
        text = dns.rcode.to_text(rcode)
        return Malformed(message_id, None, f"{text} without the question", outcome=text)
    return Malformed(message_id, None, f"no question ({counts})")


def build_query(name: str, qtype: str = "A") -> bytes:
    """A recursive query for ``name`` (absolute), for ktrace's own lookups."""
    return dns.message.make_query(dns.name.from_text(name), dns.rdatatype.from_text(qtype)).to_wire()


def servfail_for(query: bytes) -> bytes | None:
    """A SERVFAIL response to ``query`` (when ktrace cannot forward it), or None if it is not a query."""
    message = _message(query, response=False)
    if message is None:
        return None
    response = dns.message.make_response(message)
    response.set_rcode(dns.rcode.SERVFAIL)
    wire: bytes = response.to_wire()
    return wire
