"""End-to-end: a DNS question asked again within its TTL is answered by ktrace, not the cluster.

The cluster's dnsmasq logs every query it gets (``dnsmasq.log`` in the cluster's directory) and
answers with a TTL of 5 s, as CoreDNS does: the number of its log lines for a name tells how many
questions reached it. The program is a plain UDP DNS client that prints what it receives, so the
answer from the cache is compared, byte for byte, with the nameserver's.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

import pytest
from e2e_helpers import wait_until
from nscluster import NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

NAME = "kubernetes.default.svc.cluster.local"

# Asks ``NAME`` twice (in other letter cases, other IDs) on one socket, then on a new socket;
# prints per answer: the source, the ID, the question name and the answer's bytes.
CLIENT = r"""
import socket, struct, sys
import dns.message

def ask(sock, name, qid):
    query = dns.message.make_query(name, "A", id=qid, use_edns=False)
    sock.sendto(query.to_wire(), ("10.96.0.10", 53))
    data, source = sock.recvfrom(4096)
    answer = dns.message.from_wire(data)
    print(source[0], source[1], answer.id, answer.question[0].name, data.hex(), flush=True)

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(10)
ask(sock, "Kubernetes.Default.svc.cluster.local.", 0x1111)
ask(sock, "kUBERNETES.default.SVC.cluster.local.", 0x2222)
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.settimeout(10)
ask(other, "kubernetes.default.svc.cluster.local.", 0x3333)
"""


def _queries_seen(c: NamespaceCluster) -> int:
    log = pathlib.Path(c.tmpdir, "dnsmasq.log")
    lines = log.read_text(errors="replace").lower().splitlines() if log.exists() else []
    return sum(1 for line in lines if f"query[a] {NAME} " in line)


def _run(c: NamespaceCluster, *options: str, log: str) -> list[list[str]]:
    cmd = c.ktrace_argv(sys.executable, "-c", CLIENT)
    split = cmd.index("--")
    r = c.run_laptop([*cmd[:split], "-q", "--log-json", log, *options, *cmd[split:]], timeout=60)
    assert r.returncode == 0, r
    return [line.split() for line in r.stdout.splitlines()]


def _dns_events(log: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in pathlib.Path(log).read_text().splitlines()]
    return [e for e in events if e["event"] == "dns" and str(e.get("name", "")).lower() == NAME]


def test_a_repeated_question_is_answered_by_ktrace_as_the_nameserver_would(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    before = _queries_seen(c)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "cached.jsonl")
        answers = _run(c, log=log)
        wait_until(lambda: _queries_seen(c) >= before + 1, 10, "dnsmasq logged the first question")
        reported = _dns_events(log)
        uncached_log = os.path.join(tmp, "uncached.jsonl")
        uncached = _run(c, "--no-dns-cache", log=uncached_log)
        wait_until(lambda: _queries_seen(c) >= before + 4, 10, "dnsmasq logged the uncached run's questions")
        # Logged in the order received: the cached run's questions are all in by now.
        assert _queries_seen(c) == before + 4, "the cached run asked the cluster more than once"
        assert len(_dns_events(uncached_log)) == 3
    assert len(reported) == 3, reported  # the report still shows every lookup

    asked = [
        ("Kubernetes.Default.svc.cluster.local.", 0x1111),
        ("kUBERNETES.default.SVC.cluster.local.", 0x2222),
        ("kubernetes.default.svc.cluster.local.", 0x3333),
    ]
    for (host, port, qid, name, _wire), (asked_name, asked_id) in zip(answers + uncached, asked * 2, strict=True):
        assert (host, port) == ("10.96.0.10", "53")  # from the nameserver asked, as the program expects
        assert (int(qid), name) == (asked_id, asked_name)
    first = bytes.fromhex(answers[0][4])
    for _host, _port, _qid, name, wire in answers[1:]:
        cached = bytes.fromhex(wire)
        question_end = first.index(b"\x00\x00\x01\x00\x01", 12) + 5  # header, then the question
        # Everything but the ID, the question's letter case and the TTLs is the nameserver's:
        assert cached[2:12] == first[2:12]
        assert cached[12:question_end].lower() == first[12:question_end].lower()
        assert _without_ttls(cached[question_end:]) == _without_ttls(first[question_end:])
        assert cached[12:question_end] == _label_wire(name)


def _label_wire(name: str) -> bytes:
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    return wire + b"\x00\x00\x01\x00\x01"


def _without_ttls(records: bytes) -> bytes:
    """The answer section of one compressed A record (pointer, type, class, TTL, length, address)
    with the TTL zeroed: the only bytes a cache may change there."""
    assert len(records) == 16, records.hex()
    return records[:6] + b"\0\0\0\0" + records[10:]
