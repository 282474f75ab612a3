"""A test "cluster" and "laptop" made of two network namespaces.

* ``ktc<id>-cluster``: loopback only, with the service addresses on ``lo``, the services of
  tests/servers/cluster_services.py, a blackhole route and the ktrace agent. Like a pod it has an
  address of its own per family (``AGENT_POD_IP``/``AGENT_POD_IP_V6``) and a default route whose
  source that is (to ``lo``: whatever is not local there is dropped, as the blackhole is).
* ``ktc<id>-laptop``: loopback only, no routes, and a resolv.conf that names 127.0.0.1 (where
  nothing listens), so nothing run there can reach this machine's resolver or network. Like a real
  laptop it has an address of its own (``LAPTOP_V4``/``LAPTOP_V6``, documentation prefixes, on
  ``lo`` without a prefix route): glibc's getaddrinfo with AI_ADDRCONFIG finds nothing on a host
  whose only addresses are loopback ones. It still routes nowhere.

The two are joined only by the agent's Unix socket in a temporary directory (the
filesystem is shared). Nothing here sends a packet outside loopback and these namespaces.

The kernel of these machines has no ``dummy`` link type, so the blackhole /24 is routed to
``lo`` of the cluster: the SYN loops back, is not local and forwarding is off, so it is
dropped without an answer and a connect there times out.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

HERE = pathlib.Path(__file__).resolve().parent
SERVICES = HERE / "servers" / "cluster_services.py"
NETNS_ETC = pathlib.Path("/etc/netns")

DNS_V4 = "10.96.0.10"
HELLO_V4 = "10.96.1.10"
ECHO_V4 = "10.96.1.11"
REFUSED_V4 = "10.96.1.12"
BLACKHOLE_V4 = "10.96.2.1"
BLACKHOLE_NET = "10.96.2.0/24"
HELLO_V6 = "fd00:96::1:10"
ECHO_V6 = "fd00:96::1:11"
HELLO_PORT = 8080
ECHO_PORT = 7
BULK_PORT = 9000

# What a pod's resolv.conf looks like; the agent inside the cluster namespace sees it.
CLUSTER_RESOLV = (
    f"nameserver {DNS_V4}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
)
LAPTOP_RESOLV = "nameserver 127.0.0.1\n"
LAPTOP_V4 = "192.0.2.10"
LAPTOP_V6 = "2001:db8::10"
# The agent's /etc/hosts, like a pod's (the kubelet writes the pod's own name there). Only a
# program run with `ktrace run --hosts cluster` sees it.
AGENT_POD_NAME = "ktrace-agent-pod"
AGENT_POD_IP = "10.96.9.9"
AGENT_POD_IP_V6 = "fd00:96::9:9"
CLUSTER_ETC_HOSTS = f"127.0.0.1 localhost\n::1 localhost\n{AGENT_POD_IP} {AGENT_POD_NAME}\n"
LARGE_ANSWER = 120  # A records of big.default.svc.cluster.local: too many for one UDP answer (TC)

# The cluster's DNS records, as a hosts file served by dnsmasq (authoritative for cluster.local).
CLUSTER_HOSTS = [
    ("10.96.0.1", "kubernetes.default.svc.cluster.local"),
    (DNS_V4, "kube-dns.kube-system.svc.cluster.local"),
    (HELLO_V4, "hello.default.svc.cluster.local"),
    (HELLO_V6, "hello.default.svc.cluster.local"),
    (HELLO_V6, "hello6.default.svc.cluster.local"),
    (ECHO_V4, "echo.default.svc.cluster.local"),
    (ECHO_V6, "echo.default.svc.cluster.local"),
    (ECHO_V4, "echo.other-ns.svc.cluster.local"),
    (HELLO_V4, "hello.other-ns.svc.cluster.local"),
    (HELLO_V4, "orders.other-ns.svc.cluster.local"),  # only in other-ns: a short name `orders` fails
    (REFUSED_V4, "refused.default.svc.cluster.local"),
    (BLACKHOLE_V4, "blackhole.default.svc.cluster.local"),
    *((f"10.96.3.{i}", "big.default.svc.cluster.local") for i in range(1, LARGE_ANSWER + 1)),
]


def dnsmasq_conf(hosts_file: str, log_file: str) -> str:
    """dnsmasq answering only from ``hosts_file``; never forwards anything (no upstream)."""
    return "\n".join(
        [
            "no-resolv",
            "no-hosts",
            "no-poll",
            "keep-in-foreground",
            "bind-interfaces",
            "user=root",
            f"listen-address={DNS_V4}",
            "port=53",
            "local=/cluster.local/",
            "domain-needed",
            "bogus-priv",
            f"addn-hosts={hosts_file}",
            # As CoreDNS's kubernetes plugin (5 s by default); dnsmasq's own default, 0, would
            # make every answer uncacheable (ktrace's DNS cache, tests/test_e2e_dns_cache.py).
            "local-ttl=5",
            f"log-facility={log_file}",
            "log-queries",
            "pid-file=",
            "",
        ]
    )


class ClusterError(RuntimeError):
    """The namespace cluster could not be set up."""


def unavailable_reason() -> str | None:
    """Why the namespace cluster cannot run here, or None if it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the namespace cluster needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """One line from proc's stdout, waiting at most until ``deadline`` (monotonic)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise ClusterError("timed out waiting for a line from the cluster services")
            data = os.read(fd, 4096)
            if not data:
                raise ClusterError(f"cluster services exited ({proc.wait()}) before READY")
            buf += data
    return buf.split(b"\n", 1)[0].decode()


def _agent_main_available() -> bool:
    try:
        return importlib.util.find_spec("ktrace_agent.main") is not None
    except ImportError:
        return False


def _tool(name: str) -> str:
    """$KTRACE_BIN / $KTRACE_AGENT_BIN, else the console script installed next to this Python,
    else ``name`` on PATH."""
    override = os.environ.get({"ktrace": "KTRACE_BIN", "ktrace-agent": "KTRACE_AGENT_BIN"}.get(name, ""))
    if override:
        return override
    beside = pathlib.Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


@dataclass
class NamespaceCluster:
    """The two namespaces, their processes and files. Create with :meth:`up`."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    tmpdir: str = ""
    agent_error: str | None = None
    dns_error: str | None = None
    pids: list[int] = field(default_factory=list)
    # The interception backend `ktrace run` uses in the laptop namespace (KTRACE_BACKEND): the
    # ktrace_cluster fixture runs every end-to-end test once per backend.
    backend: str | None = None

    # --- names and addresses -------------------------------------------------------------
    @property
    def cluster(self) -> str:
        return f"ktc{self.run_id}-cluster"

    @property
    def laptop(self) -> str:
        return f"ktc{self.run_id}-laptop"

    @property
    def agent_socket(self) -> str:
        return os.path.join(self.tmpdir, "agent.sock")

    @property
    def agent_addr(self) -> str:
        return "unix:" + self.agent_socket

    @property
    def token_file(self) -> str:
        return os.path.join(self.tmpdir, "token")

    hello_v4 = HELLO_V4
    hello_v6 = HELLO_V6
    echo_v4 = ECHO_V4
    echo_v6 = ECHO_V6
    refused_v4 = REFUSED_V4
    blackhole_v4 = BLACKHOLE_V4
    pod_ip = AGENT_POD_IP
    pod_ip_v6 = AGENT_POD_IP_V6
    dns_v4 = DNS_V4
    hello_port = HELLO_PORT
    echo_port = ECHO_PORT
    bulk_port = BULK_PORT

    @property
    def hello_url(self) -> str:
        return f"http://{HELLO_V4}:{HELLO_PORT}/"

    @property
    def hello_url_v6(self) -> str:
        return f"http://[{HELLO_V6}]:{HELLO_PORT}/"

    # --- life cycle ----------------------------------------------------------------------
    @classmethod
    def up(cls, start_agent: bool = True, deadline_s: float = 20.0) -> NamespaceCluster:
        """Create both namespaces and start services (and the agent). Tears down on failure."""
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        self = cls()
        try:
            self._setup(start_agent, time.monotonic() + deadline_s)
        except BaseException:
            self.teardown()
            raise
        return self

    def _setup(self, start_agent: bool, deadline: float) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix=f"ktc{self.run_id}-")
        os.chmod(self.tmpdir, 0o755)
        for ns, resolv in ((self.cluster, CLUSTER_RESOLV), (self.laptop, LAPTOP_RESOLV)):
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "resolv.conf").write_text(resolv)
            if ns == self.cluster:  # `ip netns exec` bind-mounts these files over /etc/...
                (NETNS_ETC / ns / "hosts").write_text(CLUSTER_ETC_HOSTS)
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.laptop, "addr", "add", f"{LAPTOP_V4}/32", "dev", "lo", "noprefixroute")
        ip("-n", self.laptop, "addr", "add", f"{LAPTOP_V6}/128", "dev", "lo", "nodad", "noprefixroute")
        for addr in (AGENT_POD_IP, DNS_V4, HELLO_V4, ECHO_V4, REFUSED_V4):
            ip("-n", self.cluster, "addr", "add", f"{addr}/32", "dev", "lo")
        for addr in (AGENT_POD_IP_V6, HELLO_V6, ECHO_V6):
            ip("-n", self.cluster, "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        ip("-n", self.cluster, "route", "add", BLACKHOLE_NET, "dev", "lo", "src", AGENT_POD_IP)
        ip("-n", self.cluster, "route", "add", "default", "dev", "lo", "src", AGENT_POD_IP)
        ip("-n", self.cluster, "-6", "route", "add", "default", "dev", "lo", "src", AGENT_POD_IP_V6)
        self._start_services(deadline)
        if start_agent:
            self._start_agent(deadline)

    def _start_services(self, deadline: float) -> None:
        dns: list[str] = []
        if shutil.which("dnsmasq"):
            hosts = os.path.join(self.tmpdir, "cluster-hosts")
            conf = os.path.join(self.tmpdir, "dnsmasq.conf")
            pathlib.Path(hosts).write_text("".join(f"{a} {n}\n" for a, n in CLUSTER_HOSTS))
            pathlib.Path(conf).write_text(dnsmasq_conf(hosts, os.path.join(self.tmpdir, "dnsmasq.log")))
            dns = ["--dnsmasq-conf", conf, "--dns", DNS_V4]
        else:
            self.dns_error = "dnsmasq is not installed (scripts/test installs dnsmasq-base)"
        log = open(os.path.join(self.tmpdir, "services.log"), "wb")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                [
                    *self.netns_argv(self.cluster),
                    sys.executable,
                    str(SERVICES),
                    "--hello",
                    HELLO_V4,
                    "--hello",
                    HELLO_V6,
                    "--echo",
                    ECHO_V4,
                    "--echo",
                    ECHO_V6,
                    "--hello-port",
                    str(HELLO_PORT),
                    "--echo-port",
                    str(ECHO_PORT),
                    "--bulk-port",
                    str(BULK_PORT),
                    *dns,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self.pids.append(proc.pid)
        line = _read_line(proc, deadline)
        if not line.startswith("READY "):
            raise ClusterError(f"unexpected line from the cluster services: {line!r}")
        assert proc.stdout is not None
        proc.stdout.close()

    def _start_agent(self, deadline: float) -> None:
        if not _agent_main_available():
            self.agent_error = "ktrace_agent.main is not installed yet"
            return
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        log = open(os.path.join(self.tmpdir, "agent.log"), "wb")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                [
                    *self.netns_argv(self.cluster),
                    _tool("ktrace-agent"),
                    "--listen",
                    self.agent_addr,
                    "--token-file",
                    self.token_file,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids.append(proc.pid)
        while not os.path.exists(self.agent_socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.agent_error = (
                    (
                        f"agent exited with {proc.returncode}"
                        if proc.returncode is not None
                        else "agent did not create its socket in time"
                    )
                    + ": "
                    + self.agent_log()[-2000:]
                )
                return
            time.sleep(0.02)  # polling a file system condition, bounded by the deadline

    def agent_log(self) -> str:
        with contextlib.suppress(OSError):
            return pathlib.Path(self.tmpdir, "agent.log").read_text(errors="replace")
        return ""

    def teardown(self) -> None:
        """Kill every process in both namespaces, delete them and their files. Idempotent."""
        for ns in (self.laptop, self.cluster):
            self._kill_all(ns)
        for pid in self.pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
        self.pids.clear()
        for ns in (self.laptop, self.cluster):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    @staticmethod
    def _kill_all(ns: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
            pids = [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)  # waiting for the kernel to reap them; bounded by the deadline

    # --- state file (scripts/netns-cluster) ----------------------------------------------
    def save(self, path: str) -> None:
        pathlib.Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str) -> NamespaceCluster:
        return cls(**json.loads(pathlib.Path(path).read_text()))

    # --- running programs ----------------------------------------------------------------
    @staticmethod
    def netns_argv(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def ktrace_argv(self, *cmd: str, connect_timeout: float | None = None) -> list[str]:
        """``ktrace run`` against this cluster's agent, for running on the laptop side."""
        extra = ["--connect-timeout", str(connect_timeout)] if connect_timeout is not None else []
        return [_tool("ktrace"), "run", "--agent", self.agent_addr, "--token-file", self.token_file, *extra, "--", *cmd]

    def run_in(
        self,
        ns: str,
        argv: Sequence[str],
        timeout: float,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.netns_argv(ns), *argv],
            timeout=timeout,
            env=self.laptop_env(env) if ns == self.laptop else None if env is None else dict(env),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )

    def laptop_env(self, env: Mapping[str, str] | None = None) -> dict[str, str] | None:
        """The environment of commands on the laptop side: ``env`` (default: ours), with the
        backend under test."""
        if self.backend is None:
            return None if env is None else dict(env)
        return {**(os.environ if env is None else env), "KTRACE_BACKEND": self.backend}

    def run_laptop(
        self, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the laptop namespace, capturing text output. Raises TimeoutExpired."""
        return self.run_in(self.laptop, argv, timeout, env, input)

    def run_cluster(
        self, argv: Sequence[str], timeout: float, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` directly in the cluster namespace (to check the environment itself)."""
        return self.run_in(self.cluster, argv, timeout, None, input)

    def popen_laptop(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, stdin: int | None = subprocess.DEVNULL
    ) -> subprocess.Popen[str]:
        """Start ``argv`` in the laptop namespace with text pipes for stdout and stderr.

        ``ip netns exec`` execs the command, so the returned pid is the program's (or ktrace's).
        """
        return subprocess.Popen(
            [*self.netns_argv(self.laptop), *argv],
            env=self.laptop_env(env),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
