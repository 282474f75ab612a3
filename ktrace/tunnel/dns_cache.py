"""Pure: a DNS cache in front of the cluster's nameservers, as a node-local cache would keep one.

The program's question goes through ``DnsCache.lookup``: an answer to the same question (name,
type and class; the same nameserver; the same query flags and EDNS) stored less than its TTL
ago comes back at once, as the nameserver sent it but for three things a cache changes: the
query's ID, its question section (the name's case, RFC 4343 and 0x20), and every TTL lowered by
the whole seconds it has been kept. Otherwise the question is remembered, and the nameserver's
answer, handed to ``DnsCache.store``, is kept if it answers a remembered question and is worth
keeping:

* positive answers for their smallest TTL (at most ``MAX_TTL``); negative ones (NXDOMAIN, and
  NODATA: no record of the asked type) only with the zone's SOA in the authority section, for
  the smaller of the SOA's TTL and its MINIMUM field (RFC 2308 section 5; at most
  ``MAX_NEGATIVE_TTL``): the SOA's TTL is lowered like any other when served;
* never: another RCODE (SERVFAIL, REFUSED, ...), a truncated answer, a malformed one, one
  whose question or flags do not match the question asked, a TTL of 0, one larger than
  ``MAX_ANSWER_BYTES``.

Questions the cache leaves alone (answered by the nameserver every time): anything but a
standard query with one question; EDNS versions other than 0 and EDNS options (a client
COOKIE or ECS ties the answer to the client; glibc, musl and Go send none); TSIG. A stored
answer larger than what the query allows over UDP (512 bytes, or its EDNS payload size) is not
served to it either.

All message parsing is dnspython's; the offsets of the TTLs to lower are found with its wire
parser, so that everything else of the answer stays byte for byte the nameserver's. Parsing an
answer costs ~0.1 ms, on the path of the lookup that got it (the program waits for its next
stop to be handled): ``store`` only looks at the header and keeps the answer as it came, and
the full check (``cacheable``) is made the first time the question is asked again. Most
answers never are within their TTL, and a repeated question saves a whole round trip anyway.
"""

from __future__ import annotations

import functools
import struct
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.wire

MAX_ENTRIES = 2048
MAX_ANSWER_BYTES = 4096
# Caps on how long anything is kept, whatever the TTLs say (CoreDNS's cache plugin: 3600 s
# for answers, 1800 s for denials); a cluster's own records live 5-30 s.
MAX_TTL = 3600
MAX_NEGATIVE_TTL = 1800
# Questions asked and not answered yet: how many are remembered, and for how long.
MAX_PENDING = 1024
PENDING_SECONDS = 30.0

_HEADER = 12
_QUERY_FLAGS = dns.flags.RD | dns.flags.CD | dns.flags.AD  # those a server's answer depends on
_PLAIN_UDP = 512


@dataclass(frozen=True)
class QuestionKey:
    """What an answer depends on, besides the nameserver (pure data, hashable)."""

    name: bytes  # the question's name in wire form, lower case
    rdtype: int
    rdclass: int
    flags: int  # the query's RD, CD and AD bits
    edns: bool  # an OPT record (version 0, no options)
    dnssec_ok: bool  # the OPT record's DO bit


@dataclass(frozen=True)
class Query:
    """A query the cache can answer: its key, ID, question section bytes and UDP size limit."""

    key: QuestionKey
    id: int
    question: bytes  # the question section as the client sent it
    max_size: int


@dataclass(frozen=True)
class Unchecked:
    """An answer kept as it came, checked (``cacheable``) when its question is asked again."""

    answer: bytes
    query: Query
    received_at: float


@dataclass(frozen=True)
class Entry:
    wire: bytes  # the nameserver's answer as received
    stored_at: float
    expires_at: float
    ttls: tuple[tuple[int, int], ...]  # (offset of a TTL field in ``wire``, its value)


def parse_query(payload: bytes) -> Query | None:
    """The query as the cache sees it, or None when the cache must leave it alone."""
    parsed = _parse_query_without_id(payload[2:]) if len(payload) >= _HEADER else None
    if parsed is None:
        return None
    key, question, max_size = parsed
    return Query(key, int.from_bytes(payload[:2], "big"), question, max_size)


# Programs ask the same questions again and again with fresh IDs: what depends on the rest of
# the message is parsed once (the ID is put back by ``parse_query``).
@functools.lru_cache(maxsize=512)
def _parse_query_without_id(body: bytes) -> tuple[QuestionKey, bytes, int] | None:
    payload = b"\0\0" + body
    try:
        message = dns.message.from_wire(payload)
    except (dns.exception.DNSException, ValueError, IndexError):
        return None
    if message.flags & dns.flags.QR or message.opcode() != dns.opcode.QUERY:
        return None
    if len(message.question) != 1 or message.answer or message.authority or message.additional:
        return None
    if message.had_tsig or message.edns > 0 or message.options:
        return None
    question_end = _question_end(payload)
    if question_end is None:
        return None
    rrset = message.question[0]
    edns = message.edns == 0
    key = QuestionKey(
        name=_wire_name(rrset.name),
        rdtype=rrset.rdtype,
        rdclass=rrset.rdclass,
        flags=message.flags & _QUERY_FLAGS,
        edns=edns,
        dnssec_ok=bool(message.ednsflags & dns.flags.DO),
    )
    max_size = max(_PLAIN_UDP, message.payload) if edns else _PLAIN_UDP
    return key, payload[_HEADER:question_end], max_size


def _wire_name(name: dns.name.Name) -> bytes:
    wire = name.canonicalize().to_wire()
    assert wire is not None  # to_wire without a file returns the bytes
    return wire


def _question_end(wire: bytes) -> int | None:
    """Where the (single) question section ends."""
    parser = dns.wire.Parser(wire, _HEADER)
    try:
        parser.get_name(decompress=False)
        parser.get_struct("!HH")
    except dns.exception.DNSException:
        return None
    return parser.current


def _ttl_fields(wire: bytes) -> tuple[tuple[int, int], ...] | None:
    """Offset and value of the TTL of every record but OPT (whose TTL field holds EDNS flags)."""
    parser = dns.wire.Parser(wire, _HEADER)
    try:
        counts = struct.unpack_from("!HHHH", wire, 4)
        for _ in range(counts[0]):
            parser.get_name(decompress=True)
            parser.get_struct("!HH")
        found: list[tuple[int, int]] = []
        for _ in range(sum(counts[1:])):
            parser.get_name(decompress=True)
            rdtype, _rdclass = parser.get_struct("!HH")
            offset = parser.current
            ttl, rdlength = parser.get_struct("!IH")
            parser.get_bytes(rdlength)
            if rdtype != dns.rdatatype.OPT:
                found.append((offset, ttl))
    except (dns.exception.DNSException, struct.error):
        return None
    return tuple(found)


def _lifetime(message: dns.message.Message, key: QuestionKey, ttls: tuple[tuple[int, int], ...]) -> int:
    """Seconds the answer may be kept (0: not at all)."""
    if not ttls:
        return 0
    smallest = min(ttl for _offset, ttl in ttls)
    rcode = message.rcode()
    answered = any(rrset.rdtype == key.rdtype for rrset in message.answer)
    if rcode == dns.rcode.NOERROR and answered:
        return min(smallest, MAX_TTL)
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return 0
    # NXDOMAIN or NODATA (a CNAME chain may lead there): the SOA says for how long.
    soas = [rdata for rrset in message.authority if rrset.rdtype == dns.rdatatype.SOA for rdata in rrset]
    if not soas:
        return 0
    return min(smallest, *(int(soa.minimum) for soa in soas), MAX_NEGATIVE_TTL)


def cacheable(answer: bytes, query: Query, now: float) -> Entry | None:
    """``answer`` as an entry for ``query``'s key, or None when it must not be kept."""
    if len(answer) > MAX_ANSWER_BYTES or len(answer) < _HEADER:
        return None
    try:
        message = dns.message.from_wire(answer)
    except (dns.exception.DNSException, ValueError, IndexError):
        return None
    key = query.key
    if not message.flags & dns.flags.QR or message.flags & dns.flags.TC or message.opcode() != dns.opcode.QUERY:
        return None
    if message.id != query.id or len(message.question) != 1 or message.had_tsig:
        return None
    rrset = message.question[0]
    if (_wire_name(rrset.name), rrset.rdtype, rrset.rdclass) != (key.name, key.rdtype, key.rdclass):
        return None
    # A server copies RD and CD into its answer (RFC 1035, RFC 4035), and answers EDNS with EDNS.
    if message.flags & (dns.flags.RD | dns.flags.CD) != key.flags & (dns.flags.RD | dns.flags.CD):
        return None
    if (message.edns >= 0) != key.edns or message.edns > 0:
        return None
    if _question_end(answer) != _HEADER + len(query.question):
        return None
    ttls = _ttl_fields(answer)
    if ttls is None:
        return None
    lifetime = _lifetime(message, key, ttls)
    if lifetime <= 0:
        return None
    return Entry(answer, now, now + lifetime, ttls)


def answer_from(entry: Entry, query: Query, now: float) -> bytes | None:
    """The stored answer for ``query``: its ID and question, TTLs lowered; None once expired
    or when it does not fit the query's UDP size."""
    if now >= entry.expires_at or now < entry.stored_at or len(entry.wire) > query.max_size:
        return None
    elapsed = int(now - entry.stored_at)
    wire = bytearray(entry.wire)
    struct.pack_into("!H", wire, 0, query.id)
    wire[_HEADER : _HEADER + len(query.question)] = query.question
    if elapsed:
        for offset, ttl in entry.ttls:
            struct.pack_into("!I", wire, offset, max(0, ttl - elapsed))
    return bytes(wire)


class DnsCache:
    """The cache of one ``ktrace run``. ``server``: the nameserver asked (any hashable), so that
    two nameservers' answers are never mixed. The caller passes the time (monotonic seconds)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[Hashable, QuestionKey], Entry | Unchecked] = OrderedDict()
        # (server, ID) -> the query and when it was asked (every answer the program gets is
        # offered to ``store``, most with nothing pending: one dictionary look-up then)
        self._pending: OrderedDict[tuple[Hashable, int], tuple[Query, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, server: Hashable, payload: bytes, now: float) -> bytes | None:
        """The answer to the query ``payload`` from the cache, or None: then its answer is
        awaited (``store``)."""
        query = parse_query(payload)
        if query is None:
            return None
        entry = self._checked((server, query.key))
        if entry is not None:
            answer = answer_from(entry, query, now)
            if answer is not None:
                self._entries.move_to_end((server, query.key))
                self.hits += 1
                return answer
            if now >= entry.expires_at:
                del self._entries[(server, query.key)]
        self.misses += 1
        self._remember(server, query, now)
        return None

    def _checked(self, key: tuple[Hashable, QuestionKey]) -> Entry | None:
        entry = self._entries.get(key)
        if isinstance(entry, Unchecked):
            checked = cacheable(entry.answer, entry.query, entry.received_at)
            if checked is None:
                del self._entries[key]
            else:
                self._entries[key] = checked
            return checked
        return entry

    def store(self, server: Hashable, payload: bytes, now: float) -> bool:
        """Keep the answer ``payload`` from ``server`` if it answers a question asked and its
        header says it may be worth keeping (fully checked when asked for again); True when kept."""
        if len(payload) < _HEADER:
            return False
        key = (server, int.from_bytes(payload[:2], "big"))
        pending = self._pending.get(key)
        if pending is None:
            return False
        query, asked_at = pending
        question = payload[_HEADER : _HEADER + len(query.question)]
        if _lowered(question) != _lowered(query.question):
            return False  # not the answer to that question (still awaited)
        del self._pending[key]
        if now - asked_at > PENDING_SECONDS or not _may_keep(payload):
            return False
        self._entries[(server, query.key)] = Unchecked(payload, query, now)
        self._entries.move_to_end((server, query.key))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return True

    def _remember(self, server: Hashable, query: Query, now: float) -> None:
        self._pending[(server, query.id)] = (query, now)
        self._pending.move_to_end((server, query.id))
        while self._pending:
            _oldest, asked_at = next(iter(self._pending.values()))
            if len(self._pending) <= MAX_PENDING and now - asked_at <= PENDING_SECONDS:
                break
            self._pending.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _may_keep(answer: bytes) -> bool:
    """What the header alone rules out: not a response, not a standard query, truncated, an
    RCODE other than NOERROR and NXDOMAIN (its low bits; EDNS's extended RCODE is checked with
    the rest), or a size the cache does not keep."""
    if not _HEADER <= len(answer) <= MAX_ANSWER_BYTES:
        return False
    flags, rcode = answer[2], answer[3] & 0x0F
    qr, opcode, tc = flags & 0x80, (flags >> 3) & 0x0F, flags & 0x02
    return bool(qr) and opcode == 0 and not tc and rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)


def _lowered(question: bytes) -> bytes:
    """A question section with its name in lower case (RFC 4343: ASCII letters only; a label's
    length byte, < 64, is never one). Its type and class bytes stay as they are."""
    return question[:-4].lower() + question[-4:]
