"""End-to-end: the report names the real cause of a failure, and counts what the program saw.

Real `ktrace run` in the laptop namespace, the agent and the services in the cluster namespace,
and for the malformed answers a DNS server of the test's own in the cluster namespace.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from e2e_helpers import read_line
from nscluster import AGENT_POD_NAME, NamespaceCluster, ip

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def ktrace(c: NamespaceCluster, *opts: str) -> list[str]:
    cmd = c.ktrace_argv()
    return [*cmd[:-1], *opts, "--"]


def test_lookup_line_counts_every_question_as_the_summary_does(ktrace_cluster: NamespaceCluster) -> None:
    """glibc asks A and AAAA for each search-list candidate at once: the live line must wait for
    the last answer, not say NXDOMAIN x7 where the summary says x8."""
    c = ktrace_cluster
    r = c.run_laptop([*ktrace(c), "getent", "ahosts", "orders"], timeout=60)
    assert r.returncode == 2, r
    live = re.search(r"ktrace: dns lookup of orders failed: NXDOMAIN x(\d+) ", r.stderr)
    row = re.search(r"ktrace:   orders\s+-\s+dns\s+remote\s+(\d+)\s+0\s+NXDOMAIN x(\d+)", r.stderr)
    assert live and row, r.stderr
    assert live.group(1) == row.group(2) == row.group(1) == "8", r.stderr


def test_name_in_the_cluster_hosts_file_is_not_a_failed_lookup(ktrace_cluster: NamespaceCluster) -> None:
    """`getent hosts` asks DNS for AAAA first; the agent's hosts file then gives the IPv4 address:
    the program found the name, so the report shows no failure."""
    c = ktrace_cluster
    r = c.run_laptop([*ktrace(c, "--hosts", "cluster"), "getent", "hosts", AGENT_POD_NAME], timeout=60)
    assert r.returncode == 0, r
    assert r.stdout.split() == [c.pod_ip, AGENT_POD_NAME]
    assert "failed" not in r.stderr and "summary" not in r.stderr, r.stderr


def test_timeout_on_a_service_names_the_port_it_may_not_expose(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    program = (
        "import socket\ntry:\n    socket.create_connection(('blackhole', 8080))\nexcept OSError as e:\n    print(e)"
    )
    r = c.run_laptop([*ktrace(c, "--connect-timeout", "1"), sys.executable, "-c", program], timeout=60)
    assert r.returncode == 0, r
    assert "timed out" in r.stdout, r
    hints = [line for line in r.stderr.splitlines() if line.startswith("ktrace: hint: ")]
    assert len(hints) == 1, r.stderr
    assert "10.96.2.1:8080 (blackhole.default.svc.cluster.local): the cluster got no answer" in hints[0]
    assert "port 8080 may not be one the Service blackhole.default.svc.cluster.local exposes" in hints[0]


# -- malformed answers --------------------------------------------------------------------------

BAD_DNS = "10.96.9.53"  # on the cluster's lo for the test only

# Answers every query at once with the question and one A record whose name is broken: for
# "loop.test" a compression pointer to itself, for "counts.test" a header announcing 5 answers.
BAD_DNS_SERVER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("READY", flush=True)
while True:
    query, peer = s.recvfrom(512)
    end = 12 + query[12:].index(0) + 5
    qname = query[12:end - 4]
    header = bytearray(query[:12])
    header[2] |= 0x80
    header[6:8] = struct.pack(">H", 5 if b"counts" in qname else 1)
    if b"loop" in qname:
        owner = struct.pack(">H", 0xC000 | end)  # points at itself
    else:
        owner = struct.pack(">H", 0xC00C)
    record = owner + struct.pack(">HHIH", 1, 1, 30, 4) + bytes([10, 1, 2, 3])
    s.sendto(bytes(header) + query[12:end] + record, peer)
"""

ASK = r"""
import random, socket, struct, sys
for name in sys.argv[1:]:
    qname = b"".join(bytes([len(l)]) + l for l in name.encode().split(b".")) + b"\0"
    query = struct.pack(">HHHHHH", random.getrandbits(16), 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(query, ("%s", 53))
    answer = s.recv(512)
    print(name, len(answer), flush=True)
"""


def test_malformed_answers_are_reported_as_such_not_as_timeouts(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    ip("-n", c.cluster, "addr", "add", f"{BAD_DNS}/32", "dev", "lo")
    server = subprocess.Popen(
        [*c.netns_argv(c.cluster), sys.executable, "-c", BAD_DNS_SERVER, BAD_DNS],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(server, 30) == "READY"
        ask = ASK % BAD_DNS
        r = c.run_laptop([*ktrace(c), sys.executable, "-c", ask, "loop.test", "counts.test"], timeout=60)
        assert r.returncode == 0, r
        assert [line.split()[0] for line in r.stdout.splitlines()] == ["loop.test", "counts.test"], r
        assert "did not answer" not in r.stderr and "-> timeout" not in r.stderr, r.stderr
        assert (
            "ktrace: dns A loop.test -> malformed (in the records: a name's compression pointer loops or points "
            "forward (header counts 1 question(s), 1 answer(s), 0 authority, 0 additional;"
        ) in r.stderr
        assert (
            "ktrace: dns A counts.test -> malformed (in the records: the message ends before the records its "
            "header counts (header counts 1 question(s), 5 answer(s)"
        ) in r.stderr
        assert "loop.test: the DNS server's answer did not parse (in the records: a name's compression pointer" in (
            r.stderr
        )
    finally:
        server.kill()
        server.wait()
        assert server.stdout is not None
        server.stdout.close()
        ip("-n", c.cluster, "addr", "del", f"{BAD_DNS}/32", "dev", "lo")
