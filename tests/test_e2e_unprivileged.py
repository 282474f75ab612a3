"""End-to-end: ktrace and its agent need no root.

Everything else in the suite runs as root, which hides permission mistakes (reading a traced
process's /proc entries, taking its sockets with pidfd_getfd, writing the resolver view, raising
limits). Here the agent and `ktrace run` both run as uid/gid 65534 (nobody), with no
capability that touches ptrace, signals or the network.

This machine keeps Python and the venv under /root (mode 0700), so the unprivileged processes
get one ambient capability, CAP_DAC_READ_SEARCH: it lets them read and search files they do not
own, nothing else (ptrace access checks look at CAP_SYS_PTRACE, and the traced programs get the
same capability set as ktrace, so the kernel's "tracer has every capability of the tracee" rule
is met as it is for any user).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fixture_programs import Programs
from nscluster import HELLO_V4, HELLO_V6, NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

NOBODY = 65534
HELLO = "hello from cluster, you are "


def unprivileged(argv: list[str]) -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all,+dac_read_search",
        "--ambient-caps=-all,+dac_read_search",
        "--bounding-set=-all,+dac_read_search",
        *argv,
    ]


@dataclass
class UnprivilegedAgent:
    directory: str

    @property
    def addr(self) -> str:
        return "unix:" + os.path.join(self.directory, "agent.sock")

    @property
    def token_file(self) -> str:
        return os.path.join(self.directory, "token")

    def ktrace(self, *cmd: str) -> list[str]:
        return unprivileged([_tool("ktrace"), "run", "--agent", self.addr, "--token-file", self.token_file, "--", *cmd])


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture
def agent(ktrace_cluster: NamespaceCluster) -> Iterator[UnprivilegedAgent]:
    """An agent of nobody's in the cluster namespace, on a socket in a directory only nobody can write."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing: scripts/setup installs it")
    directory = tempfile.mkdtemp(prefix="ktrace-nobody-")
    os.chmod(directory, 0o700)
    os.chown(directory, NOBODY, NOBODY)
    token = os.path.join(directory, "token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(16) + "\n")
    os.chown(token, NOBODY, NOBODY)
    found = UnprivilegedAgent(directory)
    log = open(os.path.join(directory, "agent.log"), "wb")  # noqa: SIM115
    with log:
        proc = subprocess.Popen(
            [
                *ktrace_cluster.netns_argv(ktrace_cluster.cluster),
                *unprivileged([_tool("ktrace-agent"), "--listen", found.addr, "--token-file", token]),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(found.addr.removeprefix("unix:")):
            assert proc.poll() is None, f"agent exited with {proc.returncode}: {_read(directory)}"
            assert time.monotonic() < deadline, f"agent did not create its socket: {_read(directory)}"
            time.sleep(0.02)  # polling a file system condition, bounded by the deadline
        yield found
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _read(directory: str) -> str:
    with open(os.path.join(directory, "agent.log"), errors="replace") as f:
        return f.read()[-2000:]


IDENTITY = "import os; print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())"


def test_unprivileged_user_runs_a_static_go_binary_and_curl_through_an_unprivileged_agent(
    ktrace_cluster: NamespaceCluster, agent: UnprivilegedAgent, programs: Programs
) -> None:
    """nobody traces a static Go client (its own resolver, short name), curl (glibc's resolver,
    TCP), a UDP exchange, and a process tree; each behaves as in the cluster."""
    c = ktrace_cluster
    who = c.run_laptop(agent.ktrace(sys.executable, "-c", IDENTITY), timeout=60)
    assert who.returncode == 0, who
    assert who.stdout.split() == [str(NOBODY), str(NOBODY), str(NOBODY), "[]"], who

    go = c.run_laptop(agent.ktrace(programs["goclient"], "-n", "3", f"http://hello:{c.hello_port}/"), timeout=60)
    assert go.returncode == 0, go
    assert HELLO in go.stdout, go

    tree = c.run_laptop(
        agent.ktrace("sh", "-c", f"curl -sS --max-time 30 http://hello:{c.hello_port}/ && getent hosts hello"),
        timeout=60,
    )
    assert tree.returncode == 0, tree
    assert tree.stdout.startswith(HELLO), tree
    assert tree.stdout.splitlines()[-1].split()[0] in (HELLO_V4, HELLO_V6), tree

    udp = c.run_laptop(agent.ktrace(programs["cudp"], "connected", c.echo_v4, "7", "2"), timeout=60)
    assert udp.returncode == 0, udp
    assert f"reply {c.echo_v4}:7" in udp.stdout, udp

    without = c.run_laptop(
        unprivileged(["curl", "-sS", "--max-time", "5", f"http://hello:{c.hello_port}/"]), timeout=60
    )
    assert without.returncode != 0, without
