"""What the agent tells the client about the host it runs on (the Handshake reply).

Addresses are read from the kernel's own tables (/proc/net/fib_trie for IPv4,
/proc/net/if_inet6 for IPv6) instead of running tools the pod image may lack.
The parsers are pure functions of the file text.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from .rpc import IPAddress

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_HOSTS = "/etc/hosts"
# Environment overrides, so tests (and odd images) can point at other files.
RESOLV_CONF_ENV = "KTRACE_AGENT_RESOLV_CONF"
HOSTS_ENV = "KTRACE_AGENT_HOSTS"

# if_inet6 scope values (include/net/ipv6.h): host (loopback) and link-local
# addresses are of no use to a program talking to the cluster.
_IPV6_SCOPE_HOST = 0x10
_IPV6_SCOPE_LINK = 0x20


def parse_fib_trie(text: str) -> list[ipaddress.IPv4Address]:
    """Local IPv4 addresses from /proc/net/fib_trie, loopback excluded.

    A local address appears as a ``|-- A.B.C.D`` leaf immediately followed by a
    ``/32 host LOCAL`` line. The same address is listed once per routing table.
    """
    found: list[ipaddress.IPv4Address] = []
    previous_leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            previous_leaf = stripped[3:].strip()
            continue
        if previous_leaf is not None and stripped.startswith("/32 host LOCAL"):
            try:
                ip = ipaddress.IPv4Address(previous_leaf)
            except ValueError:
                continue
            if not ip.is_loopback and ip not in found:
                found.append(ip)
        if not stripped.startswith("/"):
            previous_leaf = None
    return found


def parse_if_inet6(text: str) -> list[ipaddress.IPv6Address]:
    """Global IPv6 addresses from /proc/net/if_inet6 (hex address, ifindex, plen, scope, flags, name)."""
    found: list[ipaddress.IPv6Address] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or len(fields[0]) != 32:
            continue
        try:
            ip = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            scope = int(fields[3], 16)
        except ValueError:
            continue
        if scope in (_IPV6_SCOPE_HOST, _IPV6_SCOPE_LINK) or ip.is_loopback or ip.is_link_local:
            continue
        if ip not in found:
            found.append(ip)
    return found


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def local_addresses(proc_net: str = "/proc/net") -> list[IPAddress]:
    v4: Iterable[IPAddress] = parse_fib_trie(_read(os.path.join(proc_net, "fib_trie")))
    v6: Iterable[IPAddress] = parse_if_inet6(_read(os.path.join(proc_net, "if_inet6")))
    return [*v4, *v6]


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    addresses: tuple[IPAddress, ...]
    resolv_conf: str
    hosts: str


def gather(resolv_conf_path: str | None = None, hosts_path: str | None = None) -> HostInfo:
    """Read the host's view now (files can change while a pod runs, so per handshake)."""
    resolv = resolv_conf_path or os.environ.get(RESOLV_CONF_ENV) or DEFAULT_RESOLV_CONF
    hosts = hosts_path or os.environ.get(HOSTS_ENV) or DEFAULT_HOSTS
    return HostInfo(
        hostname=socket.gethostname(),
        addresses=tuple(local_addresses()),
        resolv_conf=_read(resolv),
        hosts=_read(hosts),
    )
