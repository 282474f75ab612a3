"""What the agent tells the client about the host it runs on (the Handshake reply).

Addresses are read from the kernel's own tables (/proc/net/fib_trie for IPv4,
/proc/net/if_inet6 for IPv6) instead of running tools the pod image may lack.
The parsers are pure functions of the file text.

Source routes: per family, the address the kernel picks as source towards the cluster,
learnt by connecting a UDP socket (no packet is sent: connect() of a UDP socket only
looks the route up) to the first nameserver of that family, else to a documentation
address that only a default route covers. A nameserver that is one of the host's own
addresses (a node-local resolver seen from a hostNetwork pod, 127.0.0.53) is skipped: the
kernel would answer with that address itself, which is no source towards anything else.
When the connect fails (an IPv4-only pod has no IPv6 route: ENETUNREACH), its errno
name is what the client makes the program's connect() of that family fail with.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .wire.values import IPAddress

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


# Towards these when resolv.conf names no usable nameserver of the family: documentation
# prefixes (RFC 5737, RFC 3849), which no host routes specially, so only a default route
# covers them, as it covers a cluster's service addresses in a pod.
FALLBACK_TARGETS: dict[int, IPAddress] = {
    socket.AF_INET: ipaddress.IPv4Address("192.0.2.1"),
    socket.AF_INET6: ipaddress.IPv6Address("2001:db8::1"),
}


@dataclass(frozen=True)
class SourceRoute:
    """Per family: the source address towards the cluster, or the errno name of no route."""

    family: int
    source: IPAddress | None
    errno_name: str = ""


def probe_targets(resolv_conf: str, own: Sequence[IPAddress], family: int) -> list[IPAddress]:
    """Where to look the route up for ``family``: its first nameserver that is not one of the
    host's own (or loopback) addresses, then the fallback target."""
    version = 4 if family == socket.AF_INET else 6
    targets: list[IPAddress] = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            ip = ipaddress.ip_address(fields[1].split("%", 1)[0])
        except ValueError:
            continue
        if ip.version == version and not ip.is_loopback and not ip.is_link_local and ip not in own:
            targets.append(ip)
            break
    targets.append(FALLBACK_TARGETS[family])
    return targets


def kernel_source(family: int, target: IPAddress) -> IPAddress:
    """The source address the kernel picks for a UDP socket connected to ``target``
    (raises OSError, e.g. ENETUNREACH). The connect sends nothing."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((str(target), 9))  # any port but 0 (RFC 6724 probes use 0; either works)
        return ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])


def source_route(
    family: int, targets: Sequence[IPAddress], lookup: Callable[[int, IPAddress], IPAddress] = kernel_source
) -> SourceRoute:
    """The first target with a route decides; the last failure names the errno otherwise."""
    failure = errno.ENETUNREACH
    for target in targets:
        try:
            return SourceRoute(family, lookup(family, target))
        except OSError as exc:
            failure = exc.errno or errno.ENETUNREACH
    return SourceRoute(family, None, errno.errorcode.get(failure, "ENETUNREACH"))


def source_routes(resolv_conf: str, own: Sequence[IPAddress]) -> tuple[SourceRoute, ...]:
    return tuple(
        source_route(family, probe_targets(resolv_conf, own, family)) for family in (socket.AF_INET, socket.AF_INET6)
    )


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    addresses: tuple[IPAddress, ...]
    resolv_conf: str
    hosts: str
    source_routes: tuple[SourceRoute, ...] = ()


def gather(resolv_conf_path: str | None = None, hosts_path: str | None = None) -> HostInfo:
    """Read the host's view now (files can change while a pod runs, so per handshake)."""
    resolv = resolv_conf_path or os.environ.get(RESOLV_CONF_ENV) or DEFAULT_RESOLV_CONF
    hosts = hosts_path or os.environ.get(HOSTS_ENV) or DEFAULT_HOSTS
    addresses = tuple(local_addresses())
    resolv_conf = _read(resolv)
    return HostInfo(
        hostname=socket.gethostname(),
        addresses=addresses,
        resolv_conf=resolv_conf,
        hosts=_read(hosts),
        source_routes=source_routes(resolv_conf, addresses),
    )
