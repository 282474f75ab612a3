"""End-to-end: what `ktrace run` tells about the program's network, and the filters that route it.

Every program runs under the real `ktrace run` in the laptop namespace against the agent in the
cluster namespace; ktrace's report goes to stderr (checked never to reach the program's stdout).
"""

from __future__ import annotations

import json
import os
import pathlib
import pty
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import jsonschema
import pytest
from e2e_helpers import read_line, wait_until
from fixture_programs import Programs
from nscluster import LAPTOP_V4, NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SCHEMA = json.loads((pathlib.Path(__file__).resolve().parent.parent / "docs" / "log-schema.json").read_text())
HELLO = "hello from cluster, you are "
LAPTOP_PORT = 18080
LAPTOP_REPLY = "hello from the laptop"
LAPTOP_NAME = "api.laptop.test"


def ktrace(c: NamespaceCluster, *opts: str) -> list[str]:
    """`ktrace run` against the cluster's agent with extra options, up to and including `--`."""
    cmd = c.ktrace_argv()
    return [*cmd[:-1], *opts, "--"]


def report_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ktrace: ")]


def summary_row(stderr: str, *cells: str) -> str:
    """The summary line that contains every cell (as whole words)."""
    for line in report_lines(stderr):
        if line.startswith("ktrace:   ") and all(re.search(rf"(^|\s){re.escape(c)}(\s|$)", line) for c in cells):
            return line
    raise AssertionError(f"no summary row with {cells} in:\n{stderr}")


# -- the report ---------------------------------------------------------------------------


def test_summary_names_a_service_resolved_by_short_name(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    r = c.run_laptop([*ktrace(c, "-v"), "curl", "-sS", "--max-time", "20", "http://hello:8080/"], timeout=60)
    assert r.returncode == 0, r
    assert r.stdout.startswith(HELLO) and "ktrace" not in r.stdout, r.stdout
    # curl connects to the IPv6 address first, as in a pod: getaddrinfo sorts by the sources the
    # cluster's kernel picks (RFC 6724), which ktrace shows (test_e2e_udp_source.py).
    row = summary_row(r.stderr, "hello.default.svc.cluster.local", "[fd00:96::1:10]:8080", "tcp", "remote")
    assert re.search(r"remote\s+1\s+1\s+-\s+\d+ B\s+\d+ B$", row), row
    assert "ktrace: dns A hello.default.svc.cluster.local -> 10.96.1.10 [remote]" in r.stderr
    assert "ktrace: connect [fd00:96::1:10]:8080 (hello.default.svc.cluster.local) -> ok [remote] pid " in r.stderr


def test_a_successful_run_prints_nothing_by_default(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    r = c.run_laptop([*ktrace(c), "curl", "-sS", "--max-time", "20", "http://hello:8080/"], timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(HELLO), r
    assert report_lines(r.stderr) == [], r.stderr


def test_refused_port_shows_reason_and_hint(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    r = c.run_laptop([*ktrace(c), "curl", "-sS", "--max-time", "20", "http://refused/"], timeout=60)
    assert r.returncode == 7, r  # curl: failed to connect
    assert r.stdout == ""
    assert (
        "ktrace: connect 10.96.1.12:80 (refused.default.svc.cluster.local) -> ECONNREFUSED [remote] pid " in r.stderr
    ), r.stderr
    summary_row(r.stderr, "refused.default.svc.cluster.local", "10.96.1.12:80", "ECONNREFUSED")
    assert (
        "ktrace: hint: 10.96.1.12:80 (refused.default.svc.cluster.local): refused by the cluster: "
        "nothing listens on port 80 there; for a Service this means no ready endpoints"
    ) in r.stderr, r.stderr


def test_nxdomain_of_a_short_name_shows_reason_and_hint(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    c = ktrace_cluster
    r = c.run_laptop([*ktrace(c), programs["goclient"], "-resolve", "orders"], timeout=60)
    assert r.returncode == 1 and "no such host" in r.stdout, r
    assert re.search(
        r"ktrace: dns lookup of orders failed: NXDOMAIN x\d+ \(asked orders.default.svc.cluster.local, "
        r"orders.svc.cluster.local, orders.cluster.local, orders\) \[remote\]",
        r.stderr,
    ), r.stderr
    summary_row(r.stderr, "orders", "dns", "remote")
    assert "ktrace: hint: orders: no service orders in namespace default (asked orders.default.svc" in r.stderr


def test_nxdomain_hint_names_the_namespace_where_the_service_exists(
    ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    """ktrace asks the cluster's DNS (through the agent) about `orders` in the namespaces it was
    told about (--hint-namespace) and in those the program itself reached (hello.other-ns)."""
    c = ktrace_cluster
    expected = (
        "ktrace: hint: orders: no such service in namespace default, but a service orders exists in "
        "namespace other-ns (orders.other-ns.svc.cluster.local): use orders.other-ns"
    )
    told = c.run_laptop([*ktrace(c, "--hint-namespace", "other-ns"), programs["goclient"], "-resolve", "orders"], 60)
    assert told.returncode == 1 and expected in told.stderr, told.stderr
    go = programs["goclient"]
    seen = c.run_laptop([*ktrace(c), "sh", "-c", f"{go} -resolve hello.other-ns; {go} -resolve orders"], 60)
    assert "addrs 10.96.1.10" in seen.stdout and expected in seen.stderr, seen
    alone = c.run_laptop([*ktrace(c), go, "-resolve", "orders"], timeout=60)
    assert "other-ns" not in alone.stderr, alone.stderr  # nothing told ktrace to look there


def test_quiet_shows_nothing(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    r = c.run_laptop([*ktrace(c, "-q"), "curl", "-sS", "--max-time", "20", "http://refused/"], timeout=60)
    assert r.returncode == 7
    assert report_lines(r.stderr) == [], r.stderr
    assert "curl: (7)" in r.stderr  # the program's own stderr still passes


def test_json_log_validates_against_the_documented_schema(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    c = ktrace_cluster
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "events.jsonl")
        script = (
            "curl -sS --max-time 20 http://hello:8080/; curl -sS --max-time 20 http://refused/;"
            f" {programs['goclient']} -resolve orders;"
            f" {programs['cudp']} mmsg $(getent ahostsv4 echo | head -n1 | cut -d' ' -f1) 7 2; exit 3"
        )
        r = c.run_laptop([*ktrace(c, "-q", "--log-json", log), "sh", "-c", script], timeout=90)
        assert r.returncode == 3, r
        lines = pathlib.Path(log).read_text().splitlines()
    events = [json.loads(line) for line in lines]
    for event in events:
        jsonschema.validate(event, SCHEMA, cls=jsonschema.Draft202012Validator)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "exit" and events[-1]["status"] == 3, kinds
    assert events[-1]["events"] == len(events) - 1
    assert {"dns", "connect", "udp", "close"} <= set(kinds), kinds
    connects = {(e["dest"], e["outcome"], e["name"]) for e in events if e["event"] == "connect"}
    assert ("[fd00:96::1:10]:8080", "ok", "hello.default.svc.cluster.local") in connects  # IPv6 first, as in a pod
    assert ("10.96.1.12:80", "ECONNREFUSED", "refused.default.svc.cluster.local") in connects
    nx = [e for e in events if e["event"] == "dns" and e["name"] == "orders.default.svc.cluster.local"]
    assert nx and all(e["outcome"] == "NXDOMAIN" for e in nx), nx
    udp = [e for e in events if e["event"] == "udp" and e["dest"] == "10.96.1.11:7"]
    assert udp and udp[0]["name"] == "echo.default.svc.cluster.local" and udp[0]["pid"], udp
    closes = {(e["proto"], e["dest"]): e for e in events if e["event"] == "close"}
    assert closes["udp", "10.96.1.11:7"]["datagrams_up"] == 2, closes
    assert closes["udp", "10.96.1.11:7"]["datagrams_down"] == 2, closes
    tcp = closes["tcp", "[fd00:96::1:10]:8080"]
    assert tcp["bytes_up"] > 0 and tcp["bytes_down"] > len(HELLO), tcp


def test_on_a_terminal_the_report_is_rich_and_stdout_stays_clean(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*c.netns_argv(c.laptop), *ktrace(c), "curl", "-sS", "--max-time", "20", "http://refused/"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            env={**os.environ, "COLUMNS": "200", "TERM": "xterm"},
        )
        os.close(terminal)
        terminal = -1
        out, _ = proc.communicate(timeout=60)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    text = shown.decode(errors="replace")
    assert proc.returncode == 7 and out == "", out
    assert "network summary" in text and "\x1b[" in text, text  # a rich table, with colour
    assert "│" in text or "┃" in text, text
    assert "refused by the cluster" in text


# -- filters ------------------------------------------------------------------------------

LAPTOP_SERVER = f"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({LAPTOP_V4!r}, {LAPTOP_PORT}))
s.listen(16)
print("READY", flush=True)
body = b"{LAPTOP_REPLY}\\n"
while True:
    conn, _ = s.accept()
    conn.recv(65536)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
    conn.close()
"""


@pytest.fixture
def laptop_service(ktrace_cluster: NamespaceCluster) -> Iterator[str]:
    """An HTTP server on the laptop's own address (the cluster cannot reach it): its URL."""
    proc = ktrace_cluster.popen_laptop([sys.executable, "-c", LAPTOP_SERVER])
    try:
        assert read_line(proc, 20) == "READY"
        yield f"http://{LAPTOP_V4}:{LAPTOP_PORT}/"
    finally:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.fixture
def laptop_dns(ktrace_cluster: NamespaceCluster) -> Iterator[str]:
    """This machine's resolver in the laptop namespace (127.0.0.1:53, what its resolv.conf names),
    knowing only LAPTOP_NAME; stopped after the test (other tests expect nothing to listen there)."""
    if not any(os.access(os.path.join(d, "dnsmasq"), os.X_OK) for d in ("/usr/sbin", "/usr/bin", "/sbin")):
        pytest.skip("dnsmasq is not installed")
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--port=53",
        "--user=root",
        "--pid-file=",
        "--log-facility=-",
        f"--address=/{LAPTOP_NAME}/{LAPTOP_V4}",
        "--log-queries",
    ]
    proc = ktrace_cluster.popen_laptop(argv)
    probe = ["dig", "+time=1", "+tries=1", "+short", "@127.0.0.1", LAPTOP_NAME]

    def answers() -> bool:
        # dig's retries are instant while nothing listens yet (a refusal, no timeout): ask again
        # until dnsmasq has bound its port; a dnsmasq that exited is a failure, with its reason.
        assert proc.poll() is None, f"dnsmasq exited {proc.returncode}: {proc.communicate(timeout=10)}"
        return ktrace_cluster.run_laptop(probe, timeout=10).stdout.strip() == LAPTOP_V4

    try:
        wait_until(answers, 30, f"dnsmasq in the laptop namespace to answer {LAPTOP_NAME}")
        yield LAPTOP_NAME
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_a_cidr_rule_keeps_a_destination_local(ktrace_cluster: NamespaceCluster, laptop_service: str) -> None:
    c = ktrace_cluster
    curl = ["curl", "-sS", "--max-time", "20", laptop_service]
    remote = c.run_laptop([*ktrace(c), *curl], timeout=60)
    assert remote.returncode != 0 and LAPTOP_REPLY not in remote.stdout, remote  # the cluster has no route there
    assert f"ktrace: connect {LAPTOP_V4}:{LAPTOP_PORT} -> " in remote.stderr and "[remote]" in remote.stderr
    local = c.run_laptop([*ktrace(c, "-v", "--local", "192.0.2.0/24"), *curl], timeout=60)
    assert local.returncode == 0 and local.stdout.strip() == LAPTOP_REPLY, local
    assert f"ktrace: connect {LAPTOP_V4}:{LAPTOP_PORT} -> ok [local, --local 192.0.2.0/24] pid " in local.stderr
    summary_row(local.stderr, f"{LAPTOP_V4}:{LAPTOP_PORT}", "tcp", "local")
    # A more specific --remote wins over the CIDR: back through the cluster.
    back = c.run_laptop([*ktrace(c, "--local", "192.0.2.0/24", "--remote", f"{LAPTOP_V4}:{LAPTOP_PORT}"), *curl], 60)
    assert back.returncode != 0 and "[remote, --remote 192.0.2.10:18080]" in back.stderr, back


def test_a_destination_kept_local_by_a_rule_gets_a_hint_when_it_fails(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    r = c.run_laptop(
        [*ktrace(c, "--local", "192.0.2.0/24"), "curl", "-sS", "--max-time", "20", f"http://{LAPTOP_V4}:9/"], 60
    )
    assert r.returncode == 7, r
    assert (
        f"ktrace: hint: {LAPTOP_V4}:9: stayed on this machine because of --local 192.0.2.0/24 (ECONNREFUSED); "
        "without that rule it would go through the cluster"
    ) in r.stderr, r.stderr


def test_a_name_rule_resolves_and_connects_locally(
    ktrace_cluster: NamespaceCluster, laptop_service: str, laptop_dns: str, programs: Programs
) -> None:
    c = ktrace_cluster
    url = f"http://{laptop_dns}:{LAPTOP_PORT}/"
    for client in (["curl", "-sS", "--max-time", "20", url], [programs["goclient"], "-n", "1", "-c", "1", url]):
        unruled = c.run_laptop([*ktrace(c), *client], timeout=60)
        assert unruled.returncode != 0 and LAPTOP_REPLY not in unruled.stdout, unruled  # the cluster's DNS
        assert f"dns lookup of {laptop_dns} failed" in unruled.stderr, unruled.stderr
        ruled = c.run_laptop([*ktrace(c, "-v", "--local", laptop_dns), *client], timeout=60)
        assert ruled.returncode == 0 and LAPTOP_REPLY in ruled.stdout, (client, ruled)
        assert f"ktrace: dns A {laptop_dns} -> {LAPTOP_V4} [local, --local {laptop_dns}]" in ruled.stderr
        assert (
            f"ktrace: connect {LAPTOP_V4}:{LAPTOP_PORT} ({laptop_dns}) -> ok [local, --local {laptop_dns}]"
            in ruled.stderr
        ), ruled.stderr
        # Cluster names are still the cluster's under the same rule.
        hello = c.run_laptop(
            [*ktrace(c, "--local", laptop_dns), "curl", "-sS", "--max-time", "20", "http://hello:8080/"], 60
        )
        assert hello.stdout.startswith(HELLO), hello


# -- configuration ------------------------------------------------------------------------


def test_config_precedence_flags_env_file_defaults(ktrace_cluster: NamespaceCluster, laptop_service: str) -> None:
    c = ktrace_cluster
    curl = ["curl", "-sS", "--max-time", "20", laptop_service]
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        pathlib.Path(tmp, "ktrace.toml").write_text(
            f'agent = "{c.agent_addr}"\ntoken-file = "{c.token_file}"\nlocal = ["192.0.2.0/24"]\noutput = "all"\n'
        )

        def in_dir(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            argv = ["sh", "-c", 'cd "$0" && exec "$@"', tmp, *args]
            return c.run_laptop(argv, timeout=60, env={**os.environ, **(env or {})})

        ktrace_bin = c.ktrace_argv()[0]
        run = [ktrace_bin, "run"]
        # The file alone: agent, token and rule from ktrace.toml, every event shown (output = all).
        by_file = in_dir(*run, "--", *curl)
        assert by_file.returncode == 0 and by_file.stdout.strip() == LAPTOP_REPLY, by_file
        assert "[local, local 192.0.2.0/24 (ktrace.toml)]" in by_file.stderr, by_file.stderr
        # The environment beats the file ...
        by_env = in_dir(*run, "--", *curl, env={"KTRACE_OUTPUT": "quiet", "KTRACE_LOCAL": "198.51.100.0/24"})
        assert by_env.returncode != 0 and report_lines(by_env.stderr) == [], by_env
        # ... and flags beat the environment.
        by_flag = in_dir(*run, "-v", "--local", "192.0.2.10", "--", *curl, env={"KTRACE_OUTPUT": "quiet"})
        assert by_flag.returncode == 0 and "[local, --local 192.0.2.10]" in by_flag.stderr, by_flag
        # -f names another file; without one the defaults apply (remote, failures only).
        other = pathlib.Path(tmp, "other.toml")
        other.write_text(f'agent = "{c.agent_addr}"\ntoken-file = "{c.token_file}"\n')
        defaults = in_dir(*run, "-f", str(other), "--", *curl)
        assert defaults.returncode != 0 and "[remote]" in defaults.stderr, defaults
        assert "[local" not in defaults.stderr
        # An unknown key is an error that names it.
        pathlib.Path(tmp, "ktrace.toml").write_text("conect-timeout = 5\n")
        bad = in_dir(*run, "--", "true")
        assert bad.returncode == 125, bad
        assert "unknown key 'conect-timeout' (did you mean 'connect-timeout'?)" in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
