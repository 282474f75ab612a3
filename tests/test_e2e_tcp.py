"""End-to-end: `ktrace run` gives programs on the laptop side the cluster's TCP reach.

Every program runs in the laptop namespace (loopback only, no routes), first without ktrace,
where it must fail, then under ``ktrace run`` against the agent in the cluster namespace,
where it must reach a service that exists only in the cluster.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from e2e_helpers import read_line, you_are
from fixture_programs import Programs
from nscluster import NamespaceCluster

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "servers"))
from cluster_services import pattern

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

HELLO = "hello from cluster, you are "
PY_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())"


def both(
    c: NamespaceCluster, argv: list[str], timeout: float = 60, connect_timeout: float | None = None
) -> tuple[subprocess.CompletedProcess[str], ...]:
    """(without ktrace, with ktrace), both run in the laptop namespace."""
    without = c.run_laptop(argv, timeout=timeout)
    with_ktrace = c.run_laptop(c.ktrace_argv(*argv, connect_timeout=connect_timeout), timeout=timeout)
    return without, with_ktrace


@dataclass(frozen=True)
class Client:
    argv: Callable[[Programs, NamespaceCluster], list[str]]
    succeeded: Callable[[str], bool]


def _hello_lines(n: int) -> Callable[[str], bool]:
    return lambda out: sum(line.startswith(HELLO) for line in out.splitlines()) == n


CLIENTS = {
    "go-static-200": Client(
        lambda p, c: [p["goclient"], "-n", "200", "-c", "200", c.hello_url],
        lambda out: out.startswith("ok 200/200 " + HELLO),
    ),
    "go-stripped-200": Client(
        lambda p, c: [p["goclient-stripped"], "-n", "200", "-c", "200", c.hello_url],
        lambda out: out.startswith("ok 200/200 " + HELLO),
    ),
    "c-static-blocking": Client(lambda p, c: [p["cconnect"], c.hello_v4, str(c.hello_port)], _hello_lines(1)),
    "c-static-nonblocking": Client(
        lambda p, c: [p["cconnect"], "--nonblock", c.hello_v4, str(c.hello_port)], _hello_lines(1)
    ),
    "c-8-threads": Client(
        lambda p, c: [p["cthreads"], c.hello_v4, str(c.hello_port), "8"], lambda out: out.rstrip().endswith("all 8 ok")
    ),
    "curl-dynamic": Client(lambda p, c: ["curl", "-sS", "--max-time", "30", c.hello_url], _hello_lines(1)),
    "python3-dynamic": Client(lambda p, c: [sys.executable, "-c", PY_GET, c.hello_url], _hello_lines(1)),
    "sh-curl-and-go": Client(
        lambda p, c: [
            "sh",
            "-c",
            f'curl -sS --max-time 30 "$1" && {p["goclient"]} -n 20 -c 20 "$1"',
            "sh",
            c.hello_url,
        ],
        lambda out: [line[:9] for line in out.splitlines()] == [HELLO[:9], "ok 20/20 "],
    ),
    "go-os-exec-children": Client(
        lambda p, c: [p["goclient"], "-spawn", "4", "-n", "10", "-c", "10", c.hello_url],
        lambda out: out.rstrip().endswith("children ok 4/4"),
    ),
    "go-os-exec-sh-curl": Client(
        lambda p, c: [p["goclient"], "-exec", "sh", "-c", f"curl -sS --max-time 30 {c.hello_url}"], _hello_lines(1)
    ),
}


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_reaches_cluster_only_service(name: str, ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    client = CLIENTS[name]
    argv = client.argv(programs, ktrace_cluster)
    without, traced = both(ktrace_cluster, argv)
    assert without.returncode != 0 and not client.succeeded(without.stdout), without
    assert traced.returncode == 0, traced
    assert client.succeeded(traced.stdout), traced
    assert "Traceback" not in traced.stderr, "ktrace printed a traceback without --debug"


@pytest.mark.parametrize("mode", ["blocking", "nonblocking", "go"])
def test_refused_port_is_econnrefused(mode: str, ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    c = ktrace_cluster
    argv = {
        "blocking": [programs["cconnect"], c.refused_v4, "80"],
        "nonblocking": [programs["cconnect"], "--nonblock", c.refused_v4, "80"],
        "go": [programs["goclient"], "-tcp", f"{c.refused_v4}:80"],
    }[mode]
    without, traced = both(c, argv)
    assert without.stdout.strip() == "error ENETUNREACH", without
    assert traced.stdout.strip() == "error ECONNREFUSED", traced
    assert traced.returncode == 1


@pytest.mark.parametrize("mode", ["blocking", "nonblocking", "go"])
def test_blackhole_times_out_after_connect_timeout(
    mode: str, ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    c = ktrace_cluster
    argv = {
        "blocking": [programs["cconnect"], c.blackhole_v4, "80"],
        "nonblocking": [programs["cconnect"], "--nonblock", c.blackhole_v4, "80"],
        "go": [programs["goclient"], "-tcp", f"{c.blackhole_v4}:80"],
    }[mode]
    assert c.run_laptop(argv, timeout=30).stdout.strip() == "error ENETUNREACH"
    start = time.monotonic()
    traced = c.run_laptop(c.ktrace_argv(*argv, connect_timeout=2), timeout=60)
    elapsed = time.monotonic() - start
    assert traced.stdout.strip() == "error ETIMEDOUT", traced
    assert 1.8 <= elapsed < 30, f"connect failed after {elapsed:.1f}s, expected about 2s"


LOCAL_SERVER = """
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, peer = srv.accept()
conn.recv(4096)
conn.sendall(f"laptop local server, you are {peer[0]}:{peer[1]}\\n".encode())
conn.close()
"""


def test_loopback_stays_local(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    """A server on the laptop's own 127.0.0.1 is reached directly (the cluster has none there)."""
    c = ktrace_cluster
    server = c.popen_laptop([sys.executable, "-c", LOCAL_SERVER])
    try:
        port = read_line(server, timeout=20)
        # Then the cluster, in the same traced tree: shows ktrace was really redirecting.
        script = f'"$1" 127.0.0.1 {port} && "$1" {c.hello_v4} {c.hello_port}'
        traced = c.run_laptop(c.ktrace_argv("sh", "-c", script, "sh", programs["cconnect"]), timeout=60)
        assert traced.returncode == 0, traced
        status, peer, sock = traced.stdout.splitlines()[0].split()
        assert (status, peer) == ("ok", f"127.0.0.1:{port}")
        assert f"laptop local server, you are {sock}" in traced.stdout
        assert "hello from cluster, you are " in traced.stdout
        assert server.wait(timeout=20) == 0
    finally:
        server.kill()
        server.communicate()


@pytest.mark.parametrize(("family", "nonblock"), [("v4", False), ("v4", True), ("v6", False)])
def test_getpeername_is_destination_getsockname_is_agent_side(
    family: str, nonblock: bool, ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    c = ktrace_cluster
    host = c.hello_v4 if family == "v4" else c.hello_v6
    argv = [programs["cconnect"], *(["--nonblock"] if nonblock else []), host, str(c.hello_port)]
    without, traced = both(c, argv)
    assert without.stdout.strip() == "error ENETUNREACH", without
    assert traced.returncode == 0, traced
    status, peer, sock = traced.stdout.splitlines()[0].split()
    assert (status, peer) == ("ok", f"{host}:{c.hello_port}")
    # The hello server reports the address the agent's socket had; getsockname must show it.
    assert you_are(traced.stdout) == sock


def test_ipv6_service(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    c = ktrace_cluster
    for argv in (
        [programs["goclient"], "-n", "20", "-c", "20", c.hello_url_v6],
        ["curl", "-sS", "-g", "--max-time", "30", c.hello_url_v6],
    ):
        without, traced = both(c, argv)
        assert without.returncode != 0, without
        assert traced.returncode == 0, traced
        assert you_are(traced.stdout).startswith("fd00:96::"), traced


@pytest.mark.timeout(600)
def test_64mib_each_way_with_equal_sha256(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    c = ktrace_cluster
    size = 64 << 20
    argv = [programs["cbulk"], c.echo_v4, str(c.bulk_port), str(size), str(size)]
    without, traced = both(c, argv, timeout=540)
    assert without.stdout.strip() == "error ENETUNREACH", without
    assert traced.returncode == 0, traced
    lines = dict(line.split(" ", 1) for line in traced.stdout.splitlines())
    digest = hashlib.sha256(pattern(size)).hexdigest()
    assert lines["sent"] == f"{size} {digest}"
    assert lines["server"] == lines["sent"], "the server did not receive exactly what was sent"
    assert lines["received"] == f"{size} {digest}", "the program did not receive exactly what was sent"


def test_half_close_server_still_answers(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    """cconnect sends, shuts down writing, and the echo server answers only then."""
    c = ktrace_cluster
    argv = [programs["cconnect"], "--send", "after half-close\n", c.echo_v4, str(c.echo_port)]
    without, traced = both(c, argv)
    assert without.stdout.strip() == "error ENETUNREACH", without
    assert traced.returncode == 0, traced
    assert traced.stdout.split("reply:\n", 1)[1] == "after half-close\n"


MANY_CONNECTIONS = """
import collections, errno, socket, sys
held, outcomes = [], collections.Counter()
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.settimeout(20)
    try:
        s.connect((sys.argv[1], 8080))
        held.append(s)
        outcomes["ok"] += 1
    except OSError as e:
        outcomes[errno.errorcode.get(e.errno, str(e))] += 1
        s.close()
print(" ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))
"""


def test_a_socket_ktrace_cannot_inspect_never_connects_directly(ktrace_cluster: NamespaceCluster) -> None:
    """Under a hard limit of 64 descriptors ktrace runs out while the program holds its
    connections open: the connects it cannot look at must fail (ENOBUFS), never run unchanged
    from this machine (which the laptop namespace would answer with ENETUNREACH)."""
    c = ktrace_cluster
    argv = ["prlimit", "--nofile=64:64", *c.ktrace_argv(sys.executable, "-c", MANY_CONNECTIONS, c.hello_v4, "50")]
    traced = c.run_laptop(argv, timeout=100)
    assert traced.returncode == 0, traced
    outcomes = dict(item.split("=") for item in traced.stdout.split())
    assert set(outcomes) == {"ok", "ENOBUFS"}, traced
    assert traced.stderr.count("its network calls fail with ENOBUFS") == 1, traced.stderr
