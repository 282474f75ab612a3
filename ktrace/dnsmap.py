"""The DNS map: which names the program resolved to each address (pure, bounded).

Filled from the DNS answers the program received; read to route by name and to
name destinations in the report. One address can carry several names (two
services, or a CNAME chain): the most recently resolved comes first, because it
is the one the program most likely meant when it connected.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

from ktrace.rules import IPAddress, normalize_name

NAMES_PER_ADDRESS = 8
DEFAULT_LIMIT = 65536


def canonical(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses are the IPv4 address they carry."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class DnsMap:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = limit
        self._names: OrderedDict[IPAddress, list[str]] = OrderedDict()

    def add(self, name: str, addresses: Iterable[IPAddress]) -> None:
        name = normalize_name(name)
        if not name:
            return
        for raw in addresses:
            ip = canonical(raw)
            names = self._names.pop(ip, [])
            if name in names:
                names.remove(name)
            names.insert(0, name)
            del names[NAMES_PER_ADDRESS:]
            self._names[ip] = names
        while len(self._names) > self._limit:
            self._names.popitem(last=False)

    def names(self, ip: IPAddress) -> tuple[str, ...]:
        return tuple(self._names.get(canonical(ip), ()))

    def name(self, ip: IPAddress) -> str | None:
        names = self._names.get(canonical(ip))
        return names[0] if names else None

    def __len__(self) -> int:
        return len(self._names)
