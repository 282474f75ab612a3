"""End-to-end: a program's keepalive notices a peer that vanished silently, under ktrace as without.

Each test makes a network namespace of its own (loopback only) with a server on an address of
its own there, and runs ``ckeepalive`` (keepalive idle 1 s, interval 1 s, 2 probes, set right
after connect() as Go sets its own) against it: without ktrace, and under ``ktrace run --agent
local`` (an agent in ktrace's process, dialling from this namespace) on both backends, along each
way a connection travels: the keyed desk line (any port), and a ``Connect`` stream through the
gRPC tunnel (port 53: DNS over TCP always stays in the tunnel, ktrace reads its answers). Once the
client is waiting in read() on the idle connection, iptables drops every packet to and from the
server: the peer is gone without a word, as a node that vanished or a partition. The kernel's
keepalive probes go unanswered and it gives up (ETIMEDOUT). Under ktrace the probes leave the
agent's socket (which the program's options reach: ktrace/tracer/options_follow.py), and once
they fail ktrace times the program's own socket out: its read fails with ETIMEDOUT as without
ktrace. A client that set no keepalive is not disturbed in the same time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest
from e2e_helpers import Deadline, read_line
from fixture_programs import Programs
from nscluster import _tool, unavailable_reason
from test_e2e_unprivileged import NOBODY, unprivileged

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SERVER_IP = "10.97.0.1"  # on the namespace's lo: not loopback, so ktrace sends it to the agent
DESK_PORT = 7070
TUNNEL_PORT = 53
KEEPALIVE = ("1", "1", "2")  # idle, interval, probes: ETIMEDOUT 3 s after the last answer
# Well past idle + interval * probes (3 s), the options' read after connect (1 s), the program's own
# time-out after the agent's (~2 s), a slow VM.
NOTICED_WITHIN = 20.0

SERVER = textwrap.dedent(
    """
    import socket, sys, threading

    def serve(conn):
        with conn:
            line = b""
            while not line.endswith(b"\\n"):
                data = conn.recv(256)
                if not data:
                    return
                line += data
            conn.sendall(line)
            while conn.recv(256):  # then idle until the client goes
                pass

    def accept(listener):
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    for port in map(int, sys.argv[2:]):
        listener = socket.create_server((sys.argv[1], port))
        threading.Thread(target=accept, args=(listener,), daemon=True).start()
    print("READY", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    """
)


class SilentPeer:
    """A namespace of the test's own, with the server, whose packets ``drop()`` makes vanish."""

    def __init__(self) -> None:
        self.ns = f"ktka{secrets.token_hex(3)}"
        self.tmp = tempfile.mkdtemp(prefix=f"{self.ns}-")
        self.server: subprocess.Popen[str] | None = None
        self.clients: list[subprocess.Popen[str]] = []

    def up(self) -> None:
        _run("ip", "netns", "add", self.ns)
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.ns, "addr", "add", f"{SERVER_IP}/32", "dev", "lo")
        self.server = subprocess.Popen(
            [*self._in_ns(), sys.executable, "-c", SERVER, SERVER_IP, str(DESK_PORT), str(TUNNEL_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert read_line(self.server, 20) == "READY"

    def drop(self) -> None:
        """From now on the server neither receives nor answers anything (no reset either)."""
        for port in (DESK_PORT, TUNNEL_PORT):
            for match in ("--dport", "--sport"):
                _run(*self._in_ns(), "iptables", "-A", "INPUT", "-p", "tcp", match, str(port), "-j", "DROP")

    def client(
        self, programs: Programs, port: int, *, keepalive: bool, backend: str | None, as_nobody: bool = False
    ) -> subprocess.Popen[str]:
        """``ckeepalive`` against the server, once it said ``ready``; under ktrace with ``backend``
        (run by uid 65534 with ``as_nobody``, as test_e2e_unprivileged.py runs it)."""
        argv = [programs["ckeepalive"], SERVER_IP, str(port), *(KEEPALIVE if keepalive else ())]
        env = {**os.environ, "TMPDIR": self.tmp, "KUBECONFIG": os.path.join(self.tmp, "no-kubeconfig")}
        if backend is not None:
            argv = [_tool("ktrace"), "run", "-q", "--agent", "local", "--backend", backend, "--", *argv]
        if as_nobody:
            os.chown(self.tmp, NOBODY, NOBODY)
            env["HOME"] = self.tmp
            argv = unprivileged(argv)
        proc = subprocess.Popen(
            [*self._in_ns(), *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.clients.append(proc)
        line = read_line(proc, 30)
        assert line == "ready", (line, proc.poll())
        return proc

    def down(self) -> None:
        for proc in self.clients:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        if self.server is not None:
            self.server.kill()
            self.server.communicate(timeout=30)
        subprocess.run(["ip", "netns", "delete", self.ns], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", self.tmp], check=False)

    def _in_ns(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"


@pytest.fixture
def peer() -> Iterator[SilentPeer]:
    reason = unavailable_reason()
    if reason is None and not os.path.exists("/usr/sbin/iptables"):
        reason = "iptables is missing (scripts/setup installs it)"
    if reason is not None:
        pytest.skip(reason)
    peer = SilentPeer()
    try:
        peer.up()
        yield peer
    finally:
        peer.down()


def _result(proc: subprocess.Popen[str], within: float) -> str:
    try:
        return read_line(proc, within)
    except Deadline:
        return "still waiting"


def test_without_ktrace_the_kernel_times_the_connection_out(peer: SilentPeer, programs: Programs) -> None:
    client = peer.client(programs, DESK_PORT, keepalive=True, backend=None)
    peer.drop()
    assert _result(client, NOTICED_WITHIN) == "read: ETIMEDOUT"


@pytest.mark.parametrize("port", [DESK_PORT, TUNNEL_PORT], ids=["desk", "tunnel"])
@pytest.mark.parametrize("backend", ["ptrace", "notify"])
def test_under_ktrace_the_agents_keepalive_times_the_program_out(
    peer: SilentPeer, programs: Programs, backend: str, port: int
) -> None:
    # Started first, so it has been idle at least as long as the other when that one is reset.
    quiet = peer.client(programs, port, keepalive=False, backend=backend)
    client = peer.client(programs, port, keepalive=True, backend=backend)
    peer.drop()
    # As in a pod: the program's own socket times out (ktrace/tracer/options_follow.py, time_out).
    assert _result(client, NOTICED_WITHIN) == "read: ETIMEDOUT"
    # Without keepalive nothing notices the silence: the read still waits.
    assert quiet.poll() is None
    assert _result(quiet, 0.1) == "still waiting"


@pytest.mark.parametrize("port", [DESK_PORT, TUNNEL_PORT], ids=["desk", "tunnel"])
def test_unprivileged_ktrace_times_the_program_out_too(peer: SilentPeer, programs: Programs, port: int) -> None:
    """ktrace needs no capability to time the program's socket out (a socket filter on its end would:
    Linux 6.x asks CAP_NET_ADMIN for one on a TCP socket, and the program would see a reset)."""
    client = peer.client(programs, port, keepalive=True, backend="ptrace", as_nobody=True)
    peer.drop()
    assert _result(client, NOTICED_WITHIN) == "read: ETIMEDOUT"
