"""End-to-end: a program's UDP sockets show the source addresses a pod's would.

"What is my outbound IP" (Go's ``net.Dial("udp", ...)`` then ``LocalAddr()``, or connect()
and getsockname() in any language) and glibc's RFC 6724 address sorting read the source the
kernel picks for a connected UDP socket. Each program runs twice: under ktrace in the laptop
namespace, and directly in the cluster namespace, where the agent runs; both must print the
same. The cluster namespace, like a pod, has an address of its own (``pod_ip``) and a default
route whose source it is; its service addresses are local to it (their own source).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from e2e_helpers import read_line
from fixture_programs import Programs
from nscluster import NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

# Cluster addresses nothing owns: reached through the default route (connecting sends nothing).
ROUTED_V4 = "10.96.7.7"
ROUTED_V6 = "fd00:96::7:7"

SOURCES = r"""
import errno, socket, sys
ip = sys.argv[1]
family = socket.AF_INET6 if ":" in ip else socket.AF_INET

def show(what, family, address):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.connect(address)
    except OSError as e:
        print(what, "error", errno.errorcode[e.errno])
        return
    host, port = s.getsockname()[:2]
    print(what, host, port != 0)
    s.close()

show("connected", family, (ip, 53))
show("port-zero", family, (ip, 0))  # glibc's RFC 6724 probe
if family == socket.AF_INET:
    show("v4-mapped", socket.AF_INET6, ("::ffff:" + ip, 53))
s = socket.socket(family, socket.SOCK_DGRAM)
s.sendto(b"x", (ip, 9))
print("unconnected", s.getsockname()[0])  # the kernel's own answer: the wildcard address
"""


def _same(c: NamespaceCluster, argv: list[str]) -> tuple[list[str], list[str]]:
    traced = c.run_laptop(c.ktrace_argv(*argv), timeout=60)
    in_cluster = c.run_cluster(argv, timeout=60)
    assert traced.returncode == 0, traced
    assert in_cluster.returncode == 0, in_cluster
    return traced.stdout.splitlines(), in_cluster.stdout.splitlines()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_go_outbound_address_is_the_pods(ktrace_cluster: NamespaceCluster, programs: Programs, v6: bool) -> None:
    c = ktrace_cluster
    target = f"[{ROUTED_V6}]:53" if v6 else f"{ROUTED_V4}:53"
    traced, in_cluster = _same(c, [programs["goclient"], "-udp-local", target])
    assert in_cluster == [f"local {c.pod_ip_v6 if v6 else c.pod_ip} true"], in_cluster
    assert traced == in_cluster


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_connected_udp_sockets_show_the_pods_source(ktrace_cluster: NamespaceCluster, v6: bool) -> None:
    """connect() to a port and to port 0, an IPv4 peer on a dual-stack socket (v4-mapped), and
    an unconnected socket (left to the kernel)."""
    c = ktrace_cluster
    traced, in_cluster = _same(c, [sys.executable, "-c", SOURCES, ROUTED_V6 if v6 else ROUTED_V4])
    pod = c.pod_ip_v6 if v6 else c.pod_ip
    expected = [f"connected {pod} True", f"port-zero {pod} True"]
    expected += ["unconnected ::"] if v6 else [f"v4-mapped ::ffff:{pod} True", "unconnected 0.0.0.0"]
    assert in_cluster == expected, in_cluster
    assert traced == in_cluster


def test_a_peer_local_to_the_agent_is_its_own_source(ktrace_cluster: NamespaceCluster) -> None:
    """The test cluster's services are addresses of its own: the kernel picks the peer itself."""
    c = ktrace_cluster
    traced, in_cluster = _same(c, [sys.executable, "-c", SOURCES, c.echo_v4])
    assert in_cluster[0] == f"connected {c.echo_v4} True", in_cluster
    assert traced == in_cluster


SORTED = r"""
import socket, sys
print(" ".join(a[4][0] for a in socket.getaddrinfo(sys.argv[1], 7, type=socket.SOCK_DGRAM)))
"""


def test_getaddrinfo_sorts_as_in_the_pod(ktrace_cluster: NamespaceCluster) -> None:
    """glibc sorts a name's addresses by the source it would use for each (RFC 6724): with
    loopback sources it would prefer IPv4 (a source of the same label), as no pod does."""
    c = ktrace_cluster
    traced, in_cluster = _same(c, [sys.executable, "-c", SORTED, "echo.default.svc.cluster.local"])
    assert sorted(in_cluster[0].split()) == sorted([c.echo_v4, c.echo_v6]), in_cluster
    assert traced == in_cluster


WHOAMI = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print("READY", s.getsockname()[1], flush=True)
while True:
    data, source = s.recvfrom(2048)
    s.sendto(f"{source[0]} {source[1]}".encode(), source)
"""

PORTS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
print("before", s.getsockname()[1])
s.settimeout(10)
s.send(b"who am I")
print("seen", s.recv(100).decode().split()[1])
print("after", s.getsockname()[1])
"""


def test_the_port_shown_is_the_one_the_peer_sees(ktrace_cluster: NamespaceCluster) -> None:
    """Once a connected socket has exchanged a datagram, its port is the source port the peer
    saw: the agent socket's. (Before, it may be the socket's own: ktrace does not wait for the
    agent's answer in getsockname, see docs/architecture.md.)"""
    c = ktrace_cluster
    server = subprocess.Popen(
        [*c.netns_argv(c.cluster), sys.executable, "-c", WHOAMI, c.hello_v4],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        port = read_line(server, 20).split()[1]
        traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", PORTS, c.hello_v4, port), timeout=60)
    finally:
        server.kill()
        server.wait(10)
    assert traced.returncode == 0, traced
    lines = dict(line.split() for line in traced.stdout.splitlines())
    assert lines["seen"] == lines["after"], traced.stdout


NO_ROUTE = r"""
import errno, socket, sys
for ip in sys.argv[1:]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for port in (53, 0):
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.connect((ip, port))
            print(ip, port, "connected", s.getsockname()[0])
        except OSError as e:
            print(ip, port, "connect", errno.errorcode[e.errno])
    try:
        s.sendto(b"x", (ip, 53))
        print(ip, "sent")
    except OSError as e:
        print(ip, "sendto", errno.errorcode[e.errno])
"""


def test_no_route_of_a_family_fails_as_on_the_agent(ktrace_cluster: NamespaceCluster) -> None:
    """An agent without a route (here `--agent local` in the laptop namespace, which routes
    nowhere, as an IPv4-only pod has no IPv6 route): connect() and sendto() of a UDP socket to
    a remote peer fail with its kernel's errno, not succeed through a relay."""
    c = ktrace_cluster
    argv = [sys.executable, "-c", NO_ROUTE, ROUTED_V4, ROUTED_V6]
    ktrace = c.ktrace_argv("true")[0]
    direct = c.run_laptop(argv, timeout=60)
    traced = c.run_laptop([ktrace, "run", "--agent", "local", "--", *argv], timeout=60)
    assert direct.returncode == 0, direct
    assert traced.returncode == 0, traced
    assert f"{ROUTED_V6} 0 connect ENETUNREACH" in direct.stdout.splitlines(), direct
    assert traced.stdout == direct.stdout
