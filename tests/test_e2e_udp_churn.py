"""End-to-end: programs that open many short-lived UDP sockets under `ktrace run`.

glibc opens a socket per lookup and, to sort the addresses it found (RFC 6724), connects
one more socket per address to port 0 only to read its source address. ktrace does not
trace close(); these tests check what such programs see, and that ktrace's own resources
stay bounded while they run.
"""

from __future__ import annotations

import errno
import sys

import pytest
from nscluster import NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT_ZERO = r"""
import errno, select, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 0))
host, port = s.getsockname()[:2]
print("sockname", host, port != 0)
try:
    print("peername", s.getpeername())
except OSError as e:
    print("peername", errno.errorcode[e.errno])
print("sent", s.send(b"to nobody"))
# The port unreachable the datagram draws, if any: Linux stores it in SO_ERROR and wakes poll().
select.select([s], [], [], 5)
print("error", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
s.close()
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_connect_to_port_zero(ktrace_cluster: NamespaceCluster, v6: bool) -> None:
    """What a program sees of a socket connected to port 0 of a cluster address (glibc's
    RFC 6724 probe): the source address the cluster's kernel picks (here the service address
    itself: in the test cluster it is local to the agent), no peer (ENOTCONN, as Linux says for
    port 0 although the socket counts as connected), a send that works, and the port unreachable
    it draws (ECONNREFUSED in SO_ERROR). The same program inside the cluster namespace says the
    same."""
    c = ktrace_cluster
    hello = c.hello_v6 if v6 else c.hello_v4
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", PORT_ZERO, hello), timeout=60)
    in_cluster = c.run_cluster([sys.executable, "-c", PORT_ZERO, hello], timeout=60)
    assert traced.returncode == 0, traced
    assert in_cluster.returncode == 0, in_cluster
    expected = [f"sockname {hello} True", "peername ENOTCONN", "sent 9", f"error {errno.ECONNREFUSED}"]
    assert traced.stdout.splitlines() == expected, traced
    assert in_cluster.stdout.splitlines() == expected, in_cluster


CHURN = r"""
import os, socket, sys
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Every other socket like glibc's address sorting (port 0), the others to a real peer.
    s.connect((sys.argv[1], 0 if i % 2 else 7))
    s.getsockname()
    s.close()
print("ktrace descriptors", len(os.listdir(f"/proc/{os.getppid()}/fd")))
"""


def test_short_lived_udp_sockets_do_not_pile_up_in_ktrace(ktrace_cluster: NamespaceCluster) -> None:
    """4,000 sockets connected and closed within a second or two: ktrace reclaims what it kept
    for the closed ones long before its periodic sweep (every 30 s), so a program resolving
    names in a loop cannot run it out of descriptors."""
    c = ktrace_cluster
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", CHURN, c.echo_v4, "4000"), timeout=100)
    assert traced.returncode == 0, traced
    descriptors = int(traced.stdout.split()[-1])
    assert descriptors < 1000, traced.stdout
