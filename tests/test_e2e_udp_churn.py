"""End-to-end: programs that open many short-lived UDP sockets under `ktrace run`.

glibc opens a socket per lookup and, to sort the addresses it found (RFC 6724), connects
one more socket per address to port 0 only to read its source address. ktrace does not
trace close(); these tests check what such programs see, and that ktrace's own resources
stay bounded while they run.
"""

from __future__ import annotations

import sys

import pytest
from nscluster import NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT_ZERO = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 0))
host, port = s.getsockname()
print("sockname", host, port != 0)
print("peername", s.getpeername())
print("sent", s.send(b"to nobody"))
time.sleep(0.2)  # what an answer or an error would need to arrive; nothing should
print("error", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
s.close()
"""


def test_udp_connect_to_port_zero(ktrace_cluster: NamespaceCluster) -> None:
    """What a program sees of a socket connected to port 0 of a cluster address (glibc's
    RFC 6724 probe): a loopback source, the peer it asked for, and a send that goes nowhere."""
    c = ktrace_cluster
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", PORT_ZERO, c.hello_v4), timeout=60)
    assert traced.returncode == 0, traced
    assert traced.stdout.splitlines() == [
        "sockname 127.0.0.1 True",
        f"peername ('{c.hello_v4}', 0)",
        "sent 9",
        "error 0",
    ], traced


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
