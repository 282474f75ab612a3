"""Pure: the name and addresses in a DNS answer (A/AAAA), for ktrace's record of lookups."""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.flags
import dns.message
import dns.rdatatype

from .types import IPAddress


def addresses_in_answer(payload: bytes) -> tuple[str, list[IPAddress]] | None:
    """``(queried name, A/AAAA addresses)`` from a DNS response, or None when it is not one.

    The name is the question's, without the final dot; CNAME chains are followed
    implicitly (every A/AAAA record of the answer section is returned).
    """
    try:
        message = dns.message.from_wire(payload, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError):
        return None
    if not message.flags & dns.flags.QR or not message.question:
        return None
    name = message.question[0].name.to_text(omit_final_dot=True)
    found: list[IPAddress] = []
    for rrset in message.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rdata in rrset:
                found.append(ipaddress.ip_address(rdata.address))
    return name, found
