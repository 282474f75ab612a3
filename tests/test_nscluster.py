"""The namespace cluster itself: services answer inside the cluster, the laptop reaches nothing.

These run without ktrace; they check the environment the end-to-end tests rely on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from fixture_programs import Programs
from nscluster import NETNS_ETC, NamespaceCluster

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "servers"))
from cluster_services import pattern

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]


def _you_are(reply: str) -> str:
    return reply.split("you are ", 1)[1].split(maxsplit=1)[0]


def test_hello_reports_the_client_address(ns_cluster: NamespaceCluster, programs: Programs) -> None:
    for host in (ns_cluster.hello_v4, ns_cluster.hello_v6):
        r = ns_cluster.run_cluster([programs["cconnect"], host, str(ns_cluster.hello_port)], timeout=10)
        assert r.returncode == 0, r
        first, *rest = r.stdout.splitlines()
        _, peer, sock = first.split()
        assert peer == f"{host}:{ns_cluster.hello_port}"
        assert _you_are("\n".join(rest)) == sock


def test_refused_and_blackhole(ns_cluster: NamespaceCluster, programs: Programs) -> None:
    r = ns_cluster.run_cluster([programs["cconnect"], ns_cluster.refused_v4, "80"], timeout=10)
    assert r.stdout.strip() == "error ECONNREFUSED"
    probe = (
        "import socket\ns = socket.socket()\ns.settimeout(1)\n"
        f"try:\n    s.connect(('{ns_cluster.blackhole_v4}', 80))\n"
        "except TimeoutError:\n    print('timeout')\n"
    )
    r = ns_cluster.run_cluster([sys.executable, "-c", probe], timeout=10)
    assert r.stdout.strip() == "timeout", r


def test_echo_answers_after_half_close(ns_cluster: NamespaceCluster, programs: Programs) -> None:
    r = ns_cluster.run_cluster(
        [programs["cconnect"], "--send", "ping half-close\n", ns_cluster.echo_v4, str(ns_cluster.echo_port)],
        timeout=10,
    )
    assert r.returncode == 0, r
    assert r.stdout.split("reply:\n", 1)[1] == "ping half-close\n"


def test_udp_echo(ns_cluster: NamespaceCluster) -> None:
    probe = (
        "import socket, sys\n"
        "for fam, host in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):\n"
        "    s = socket.socket(fam, socket.SOCK_DGRAM)\n    s.settimeout(5)\n"
        "    s.sendto(b'dgram', (host, 7))\n    data, src = s.recvfrom(100)\n"
        "    print(data.decode(), src[0], src[1])\n"
    )
    argv = [sys.executable, "-c", probe, ns_cluster.echo_v4, ns_cluster.echo_v6]
    r = ns_cluster.run_cluster(argv, timeout=10)
    assert r.stdout.splitlines() == [f"dgram {ns_cluster.echo_v4} 7", f"dgram {ns_cluster.echo_v6} 7"], r


def test_bulk_sha256_both_ways(ns_cluster: NamespaceCluster, programs: Programs) -> None:
    size = 4 << 20
    r = ns_cluster.run_cluster(
        [programs["cbulk"], ns_cluster.echo_v4, str(ns_cluster.bulk_port), str(size), str(size + 1)],
        timeout=30,
    )
    assert r.returncode == 0, r
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    expected_up = hashlib.sha256(pattern(size)).hexdigest()
    assert lines["sent"] == f"{size} {expected_up}"
    assert lines["server"] == lines["sent"]
    assert lines["received"] == f"{size + 1} {hashlib.sha256(pattern(size + 1)).hexdigest()}"


def test_laptop_reaches_nothing(ns_cluster: NamespaceCluster, programs: Programs) -> None:
    assert ns_cluster.run_laptop(["ip", "-4", "route"], timeout=10).stdout.strip() == ""
    assert ns_cluster.run_laptop(["ip", "-6", "route"], timeout=10).stdout.strip() == ""
    assert ns_cluster.run_laptop(["cat", "/etc/resolv.conf"], timeout=10).stdout == "nameserver 127.0.0.1\n"
    argv = [programs["cconnect"], ns_cluster.hello_v4, str(ns_cluster.hello_port)]
    r = ns_cluster.run_laptop(argv, timeout=10)
    assert r.stdout.strip() == "error ENETUNREACH"


def test_io_uring_works_natively(programs: Programs) -> None:
    """The e2e ENOSYS check means something only if io_uring works without ktrace."""
    r = subprocess.run([programs["iouring"]], capture_output=True, text=True, timeout=10, check=False)
    assert r.stdout.strip() == "ok", r


def test_teardown_removes_everything() -> None:
    cluster = NamespaceCluster.up(start_agent=False)
    child = cluster.popen_laptop(["sleep", "300"])
    try:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert cluster.laptop in names and cluster.cluster in names
    finally:
        cluster.teardown()
    assert child.wait(timeout=10) == -9
    cluster.teardown()  # idempotent
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert cluster.laptop not in names and cluster.cluster not in names
    assert not (NETNS_ETC / cluster.laptop).exists() and not (NETNS_ETC / cluster.cluster).exists()
    assert not os.path.exists(cluster.tmpdir)


@pytest.mark.parametrize("mode", ["connected", "sendto", "mmsg", "cmmsg"])
def test_udp_fixture_sees_the_service_as_source(mode: str, ns_cluster: NamespaceCluster, programs: Programs) -> None:
    for host in (ns_cluster.echo_v4, ns_cluster.echo_v6):
        r = ns_cluster.run_cluster([programs["cudp"], mode, host, str(ns_cluster.echo_port), "4"], timeout=20)
        assert r.returncode == 0, r
        replies = [line.split(" ", 2) for line in r.stdout.splitlines() if line.startswith("reply ")]
        assert len(replies) == (1 if mode in ("connected", "sendto") else 4), r.stdout
        assert {source for _, source, _ in replies} == {f"{host}:{ns_cluster.echo_port}"}
        assert all(payload.startswith("cudp ") for _, _, payload in replies)


def test_musl_static_client_connects(ns_cluster: NamespaceCluster, programs: Programs) -> None:
    r = ns_cluster.run_cluster([programs["mresolve"], ns_cluster.hello_v4, str(ns_cluster.hello_port)], timeout=20)
    assert r.returncode == 0, r
    assert r.stdout.startswith(f"addr {ns_cluster.hello_v4}:{ns_cluster.hello_port}\n")
    assert "hello from cluster, you are " in r.stdout


def test_cluster_dns(ns_cluster: NamespaceCluster) -> None:
    if ns_cluster.dns_error:
        pytest.skip(ns_cluster.dns_error)

    def dig(*args: str) -> str:
        r = ns_cluster.run_cluster(["dig", "+time=2", "+tries=1", f"@{ns_cluster.dns_v4}", *args], timeout=20)
        return r.stdout

    assert dig("+short", "hello.default.svc.cluster.local").split() == [ns_cluster.hello_v4]
    assert dig("+short", "hello.default.svc.cluster.local", "AAAA").split() == [ns_cluster.hello_v6]
    assert dig("+short", "echo.other-ns.svc.cluster.local").split() == [ns_cluster.echo_v4]
    assert "status: NXDOMAIN" in dig("nope.default.svc.cluster.local")
    assert "status: REFUSED" in dig("example.com"), "names outside cluster.local must never be forwarded"
    big = dig("big.default.svc.cluster.local")
    assert "Truncated, retrying in TCP mode" in big and "ANSWER: 120," in big


@pytest.mark.parametrize(
    "argv",
    [
        ["getent", "hosts", "hello.default.svc.cluster.local"],
        ["dig", "+time=1", "+tries=1", "hello.default.svc.cluster.local"],
    ],
)
def test_laptop_cannot_resolve_cluster_names(argv: list[str], ns_cluster: NamespaceCluster) -> None:
    r = ns_cluster.run_laptop(argv, timeout=20)
    assert r.returncode != 0 and "10.96.1.10" not in r.stdout, r


def test_laptop_go_resolver_cannot_resolve(ns_cluster: NamespaceCluster, programs: Programs) -> None:
    r = ns_cluster.run_laptop([programs["goclient"], "-resolve", "hello.default.svc.cluster.local"], timeout=40)
    assert r.returncode == 1 and r.stdout.startswith("error "), r
