"""scripts/bench: the environment the figures run in.

The tests' namespace cluster (tests/nscluster.py: agent on a Unix socket in the cluster netns,
programs in the laptop netns), plus what only the benchmark needs:

* ``cbenchsrv`` (tests/programs/cbenchsrv.c) on ``BENCH_ADDR`` in the cluster: a threaded C
  server for echo, upload and download, so the server is never what is measured.
* For the peers (proxychains-ng with a SOCKS server): a veth pair between the two namespaces
  carrying only ``PEER_NET`` (no other route on either side, no forwarding), and two SOCKS
  servers listening on the cluster end of it: microsocks (a thread per connection) and dante
  (Debian's ``dante-server``, processes that each serve many connections with select). proxychains-ng
  on the laptop side reaches a SOCKS server over the veth, which dials from inside the cluster,
  like the agent. Nothing leaves these namespaces.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from e2e_helpers import read_line
from fixture_programs import Programs
from nscluster import AGENT_POD_IP, NamespaceCluster, ip


def unwind_on_termination() -> None:
    """From now on SIGTERM and SIGHUP unwind as Ctrl-C does, so a benchmark stopped by a job's or a
    terminal's end still tears down what it started (its ``finally`` blocks run); Python's default
    for these signals exits without running any."""

    def unwind(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, unwind)


BENCH_ADDR = "10.96.1.13"
BENCH_PORT = 9100
PEER_LAPTOP = "10.97.0.1"
PEER_CLUSTER = "10.97.0.2"
PEER_PREFIX = 30
SOCKS_PORT = 1080  # microsocks
DANTE_PORT = 1081
MICROSOCKS = "proxychains-ng + microsocks"
DANTE = "proxychains-ng + dante"


class BenchError(RuntimeError):
    """Something the benchmark needs is missing or did not start."""


def load() -> float:
    return os.getloadavg()[0]


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def agent_of(ktrace: str | None) -> str:
    """Make the cluster start the agent of the ktrace being measured: with ``--ktrace PATH`` and no
    ``$KTRACE_AGENT_BIN``, the ``ktrace-agent`` beside PATH (a ktrace talks to the agent of its own
    version: another protocol version is refused at the handshake). Returns what runs, for the report."""
    if ktrace and "KTRACE_AGENT_BIN" not in os.environ:
        beside = pathlib.Path(ktrace).with_name("ktrace-agent")
        if beside.exists():
            os.environ["KTRACE_AGENT_BIN"] = str(beside)
    return os.environ.get("KTRACE_AGENT_BIN", "ktrace-agent (installed)")


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    try:
        import grpc

        grpc_version = grpc.__version__
    except ImportError:
        grpc_version = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc_version,
        "load_before": load_text(),
    }


@dataclass
class BenchEnv:
    cluster: NamespaceCluster
    programs: Programs
    ktrace: str
    peers: dict[str, str] = field(default_factory=dict)  # name -> its proxychains.conf
    peer_errors: dict[str, str] = field(default_factory=dict)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    # -- set-up ------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def up(cls, programs: Programs, ktrace: str) -> Iterator[BenchEnv]:
        cluster = NamespaceCluster.up()
        env = cls(cluster, programs, ktrace)
        try:
            if cluster.agent_error:
                raise BenchError(f"the agent is not running: {cluster.agent_error}")
            env._start_server()
            try:
                env._peer_link()
            except BenchError as exc:
                env.peer_errors = {MICROSOCKS: str(exc), DANTE: str(exc)}
            else:
                for name, start in ((MICROSOCKS, env._start_microsocks), (DANTE, env._start_dante)):
                    try:
                        start()
                    except BenchError as exc:
                        env.peer_errors[name] = str(exc)
            yield env
        finally:
            for proc in env._procs:
                with contextlib.suppress(OSError):
                    proc.kill()
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    proc.wait(5)
            cluster.teardown()  # deletes both namespaces, the veth pair with them

    def _start_server(self) -> None:
        ip("-n", self.cluster.cluster, "addr", "add", f"{BENCH_ADDR}/32", "dev", "lo")
        proc = subprocess.Popen(
            [*self.cluster.netns_argv(self.cluster.cluster), self.programs["cbenchsrv"], BENCH_ADDR, str(BENCH_PORT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        self._procs.append(proc)
        self.cluster.pids.append(proc.pid)
        line = read_line(proc, 10)
        if line != "READY":
            raise BenchError(f"cbenchsrv said {line!r}")

    def _peer_link(self) -> None:
        if shutil.which("proxychains4") is None:
            raise BenchError("proxychains4 is not installed (scripts/setup installs it)")
        laptop_if, cluster_if = f"ktb{self.cluster.run_id}l", f"ktb{self.cluster.run_id}c"
        ip(
            "-n",
            self.cluster.laptop,
            "link",
            "add",
            laptop_if,
            "type",
            "veth",
            "peer",
            "name",
            cluster_if,
            "netns",
            self.cluster.cluster,
        )
        ip("-n", self.cluster.laptop, "addr", "add", f"{PEER_LAPTOP}/{PEER_PREFIX}", "dev", laptop_if)
        ip("-n", self.cluster.cluster, "addr", "add", f"{PEER_CLUSTER}/{PEER_PREFIX}", "dev", cluster_if)
        ip("-n", self.cluster.laptop, "link", "set", laptop_if, "up")
        ip("-n", self.cluster.cluster, "link", "set", cluster_if, "up")

    def _start_microsocks(self) -> None:
        if shutil.which("microsocks") is None:
            raise BenchError("microsocks is not installed (scripts/setup installs it)")
        self._start_socks(MICROSOCKS, ["microsocks", "-i", PEER_CLUSTER, "-p", str(SOCKS_PORT)], SOCKS_PORT)

    def _start_dante(self) -> None:
        danted = shutil.which("danted") or ("/usr/sbin/danted" if os.path.exists("/usr/sbin/danted") else None)
        if danted is None:
            raise BenchError("danted is not installed (scripts/setup installs dante-server)")
        conf = os.path.join(self.cluster.tmpdir, "danted.conf")
        pathlib.Path(conf).write_text(
            "logoutput: stderr\n"
            f"internal: {PEER_CLUSTER} port = {DANTE_PORT}\n"
            f"external: {AGENT_POD_IP}\n"  # the cluster side's own address, the agent's source too
            "clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n"
            "client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\nsocks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
        )
        pid_file = os.path.join(self.cluster.tmpdir, "danted.pid")
        self._start_socks(DANTE, [danted, "-f", conf, "-p", pid_file], DANTE_PORT)

    def _start_socks(self, name: str, argv: list[str], port: int) -> None:
        proc = subprocess.Popen(
            [*self.cluster.netns_argv(self.cluster.cluster), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs.append(proc)
        self.cluster.pids.append(proc.pid)
        deadline = time.monotonic() + 10
        while not self._listening(PEER_CLUSTER, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{argv[0]} did not start listening")
            time.sleep(0.02)  # polling a kernel state with a deadline
        conf = os.path.join(self.cluster.tmpdir, f"proxychains-{port}.conf")
        pathlib.Path(conf).write_text(
            "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
            f"[ProxyList]\nsocks5 {PEER_CLUSTER} {port}\n"
        )
        self.peers[name] = conf

    def _listening(self, addr: str, port: int) -> bool:
        out = self.cluster.run_cluster(["ss", "-Hltn", f"src {addr}:{port}"], timeout=10)
        return bool(out.stdout.strip())

    # -- running -----------------------------------------------------------------------
    def ktrace_argv(self, *cmd: str, options: Sequence[str] = ()) -> list[str]:
        c = self.cluster
        return [self.ktrace, "run", "--agent", c.agent_addr, "--token-file", c.token_file, *options, "--", *cmd]

    def peer_argv(self, name: str, *cmd: str) -> list[str]:
        conf = self.peers.get(name)
        if conf is None:
            raise BenchError(self.peer_errors.get(name, f"no peer {name}"))
        return ["proxychains4", "-q", "-f", conf, *cmd]

    def run(self, where: str, argv: Sequence[str], timeout: float = 300) -> str:
        """Run in ``where`` ("laptop" or "cluster"); its stdout, or BenchError with what it said."""
        ns = self.cluster.laptop if where == "laptop" else self.cluster.cluster
        proc = self.cluster.run_in(ns, argv, timeout=timeout)
        if proc.returncode != 0:
            raise BenchError(
                f"{' '.join(argv[:4])}... exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-300:]}"
            )
        return proc.stdout

    def agent_pid(self) -> int | None:
        # NamespaceCluster starts the services first, then the agent (ip netns exec execs it).
        return self.cluster.pids[1] if len(self.cluster.pids) > 1 else None


def status_kib(pid: int, key: str) -> int | None:
    """``VmHWM``/``VmRSS`` of ``pid`` in KiB, None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(pid: int) -> None:
    """Reset ``pid``'s ``VmHWM`` to its current RSS (proc(5), clear_refs "5"); best effort."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
