"""End-to-end: what a program sees when the path to the agent breaks and comes back.

Each test runs an agent of its own in the cluster namespace (the session's agent serves the
other tests), kills it mid-run and, for the reconnect case, starts a new one on the same socket.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from e2e_helpers import blocked_in, descendants, read_line, wait_until
from nscluster import NamespaceCluster, _tool

from ktrace.tracer import syscalls

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

DRIVER = r"""
import socket, sys
conns = []
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "connect":
        s = socket.socket()
        try:
            s.connect((cmd[1], int(cmd[2])))
            conns.append(s)
            print("connected", flush=True)
        except OSError as e:
            print("error", __import__("errno").errorcode[e.errno], flush=True)
    elif cmd[0] == "echo":
        s = conns[-1]
        try:
            s.sendall(b"ping\n")
            data = s.recv(100)
            print("echo", data.decode().strip() if data else "EOF", flush=True)
        except OSError as e:
            print("error", __import__("errno").errorcode[e.errno], flush=True)
"""


class PrivateAgent:
    def __init__(self, c: NamespaceCluster, directory: str) -> None:
        self.c = c
        self.socket = os.path.join(directory, "agent.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.proc = subprocess.Popen(
            [
                *self.c.netns_argv(self.c.cluster),
                _tool("ktrace-agent"),
                "--listen",
                f"unix:{self.socket}",
                "--token-file",
                self.c.token_file,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: os.path.exists(self.socket), 20, "the agent's socket")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def agent(ktrace_cluster: NamespaceCluster) -> Iterator[PrivateAgent]:
    with tempfile.TemporaryDirectory(prefix="ktrace-agent-loss-") as directory:
        os.chmod(directory, 0o755)
        a = PrivateAgent(ktrace_cluster, directory)
        a.start()
        try:
            yield a
        finally:
            a.kill()


def _ktrace(c: NamespaceCluster, agent: PrivateAgent, *extra: str, quiet: bool = True) -> subprocess.Popen[str]:
    argv = [
        _tool("ktrace"),
        "run",
        *(["-q"] if quiet else []),
        "--agent",
        f"unix:{agent.socket}",
        "--token-file",
        c.token_file,
        *extra,
        "--",
        sys.executable,
        "-c",
        DRIVER,
    ]
    return c.popen_laptop(argv, stdin=subprocess.PIPE)


def _send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """End the driver (EOF on its stdin) and collect its output; kill it if it hangs."""
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_agent_gone_resets_open_connections_and_a_new_one_waits_for_it(
    ktrace_cluster: NamespaceCluster, agent: PrivateAgent
) -> None:
    c = ktrace_cluster
    proc = _ktrace(c, agent)
    try:
        _send(proc, f"connect {c.echo_v4} {c.echo_port}")
        assert read_line(proc, 30) == "connected"
        _send(proc, "echo")
        assert read_line(proc, 30) == "echo ping"
        agent.kill()
        # The connection open through the dead agent is reset at once, not left hanging.
        _send(proc, "echo")
        assert read_line(proc, 30) in ("error ECONNRESET", "echo EOF")
        # A new connect while the agent is down waits for it, in the kernel's connect() as it
        # would for a slow network (not at a ktrace stop, where signals could not reach it) ...
        _send(proc, f"connect {c.echo_v4} {c.echo_port}")
        connect = syscalls.number("connect")

        def program_in_connect() -> bool:
            return any(blocked_in(pid) == connect for pid in descendants(proc.pid))

        wait_until(program_in_connect, 20, "the program waiting in its connect()")
        # ... and completes once an agent answers on that socket again.
        agent.start()
        assert read_line(proc, 30) == "connected"
        _send(proc, "echo")
        assert read_line(proc, 30) == "echo ping"
    finally:
        _, err = _finish(proc)
    assert proc.returncode == 0, err


def test_agent_that_stays_away_fails_new_connects_with_etimedout(
    ktrace_cluster: NamespaceCluster, agent: PrivateAgent
) -> None:
    c = ktrace_cluster
    proc = _ktrace(c, agent, "--connect-timeout", "2")
    try:
        _send(proc, f"connect {c.echo_v4} {c.echo_port}")
        assert read_line(proc, 30) == "connected"
        agent.kill()
        _send(proc, f"connect {c.echo_v4} {c.echo_port}")
        assert read_line(proc, 30) == "error ETIMEDOUT"
    finally:
        _, err = _finish(proc)
    assert proc.returncode == 0, err


def test_agent_gone_for_good_is_named_as_the_cause(ktrace_cluster: NamespaceCluster, agent: PrivateAgent) -> None:
    """Live, in the hint and in the summary: the agent could not be reached, not a NetworkPolicy."""
    c = ktrace_cluster
    proc = _ktrace(c, agent, "--connect-timeout", "2", quiet=False)
    try:
        _send(proc, f"connect {c.echo_v4} {c.echo_port}")
        assert read_line(proc, 30) == "connected"
        agent.kill()
        _send(proc, f"connect {c.hello_v4} {c.hello_port}")
        assert read_line(proc, 30) == "error ETIMEDOUT"
    finally:
        _, err = _finish(proc)
    assert proc.returncode == 0, err
    lost = f"ktrace: lost the agent (unix:{agent.socket}): cannot connect to it"
    assert lost in err, err
    assert (
        f"ktrace: connect {c.hello_v4}:{c.hello_port} -> ETIMEDOUT (agent unreachable: the cluster never saw it)"
    ) in err
    assert f"ktrace: hint: the agent (unix:{agent.socket}) stopped answering at " in err, err
    assert (
        f"ktrace: hint: {c.hello_v4}:{c.hello_port}: ktrace could not reach the agent, so the cluster never saw"
    ) in err
    assert "ETIMEDOUT (agent unreachable)" in err  # the summary's row
    assert "NetworkPolicy" not in err, err
