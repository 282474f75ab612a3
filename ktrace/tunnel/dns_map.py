"""What the program learnt from DNS: address → the name it asked for.

Every answer the program receives through the agent (UDP, or TCP after a
truncated answer) is recorded here, so reports and name-based filters can say
``orders.shop.svc.cluster.local:8080`` rather than ``10.96.14.3:8080``.

Bounded: the oldest addresses are forgotten first (a program resolving millions
of names must not grow ktrace without limit). Pure: no I/O.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable, Iterable

from .dns_answers import addresses_in_answer
from .types import IPAddress

DEFAULT_CAPACITY = 65536
_TCP_BUFFER_LIMIT = 2 * 65537  # two full DNS-over-TCP messages; anything larger is not DNS


NAMES_PER_ADDRESS = 8


def _canonical(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses are the IPv4 address they carry."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class DnsMap:
    """One address can carry several names (two services, or the same service asked
    under two names): the most recently resolved comes first, as the one the program
    most likely meant when it connected."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._names: collections.OrderedDict[IPAddress, list[str]] = collections.OrderedDict()
        self.listeners: list[Callable[[str, list[IPAddress]], None]] = []

    def record(self, name: str, addresses: Iterable[IPAddress]) -> None:
        found = list(addresses)
        for ip in found:
            key = _canonical(ip)
            names = self._names.pop(key, [])
            if name in names:
                names.remove(name)
            names.insert(0, name)
            del names[NAMES_PER_ADDRESS:]
            self._names[key] = names
        while len(self._names) > self._capacity:
            self._names.popitem(last=False)
        for listener in self.listeners:
            listener(name, found)

    def name_of(self, ip: IPAddress) -> str | None:
        """The name most recently resolved to ``ip``, if the program resolved one."""
        names = self._names.get(_canonical(ip))
        return names[0] if names else None

    def names_of(self, ip: IPAddress) -> tuple[str, ...]:
        """Every name resolved to ``ip`` (up to ``NAMES_PER_ADDRESS``), most recent first."""
        return tuple(self._names.get(_canonical(ip), ()))

    def __len__(self) -> int:
        return len(self._names)

    def record_answer(self, payload: bytes) -> None:
        """Record a DNS response message (wire format); anything else is ignored."""
        answer = addresses_in_answer(payload)
        if answer is not None and answer[1]:
            self.record(*answer)


class DnsTcpTap:
    """Splits the server → client bytes of a DNS-over-TCP connection into messages
    (RFC 1035 4.2.2: each prefixed by its 2-byte length) and records each answer.

    Gives up (and stays silent) on anything that does not look like DNS, so a
    non-DNS service on port 53 costs nothing but a short buffer.
    """

    def __init__(self, dns_map: DnsMap) -> None:
        self._map = dns_map
        self._buffer = b""
        self._dead = False

    def feed(self, data: bytes) -> None:
        if self._dead:
            return
        self._buffer += data
        while len(self._buffer) >= 2:
            length = int.from_bytes(self._buffer[:2], "big")
            if len(self._buffer) < 2 + length:
                break
            message, self._buffer = self._buffer[2 : 2 + length], self._buffer[2 + length :]
            if addresses_in_answer(message) is None:
                self._dead = True
                self._buffer = b""
                return
            self._map.record_answer(message)
        if len(self._buffer) > _TCP_BUFFER_LIMIT:
            self._dead = True
            self._buffer = b""
