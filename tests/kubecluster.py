"""The real Kubernetes test cluster (``scripts/cluster``), seen from the tests.

``KubeCluster.ensure()`` reuses a running cluster or starts one (and then owns it: ``teardown`` stops only
a cluster this session started). ``unavailable_reason()`` says why the cluster cannot run here: the tests
skip with that reason rather than fail, so engineers without the built binaries are not blocked.

Everything the tests run against the cluster goes through ``kubectl`` with an explicit kubeconfig and a
timeout; waiting is done by ``kubectl wait``/``rollout status`` or polling with a deadline, never by sleeping.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "cluster"
OCI_IMAGE = REPO / "kube" / "ociimage.py"
CTR = ["ctr", "--address", "/run/ktrace-kube/containerd.sock", "-n", "k8s.io"]  # scripts/cluster's containerd
KUBE_BUILD = REPO / "scripts" / "kube-build"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
    "coredns",
)
HOST_TOOLS = ("ip", "apt-get")  # scripts/cluster up installs the rest from Debian when missing
TEST_NS = "ktrace-test"
UP_TIMEOUT = 600.0
AGENT_IMAGE = "ktrace.local/agent:dev"
DNS_IP = "10.96.0.10"  # the cluster DNS Service (scripts/cluster)
AGENT_SELECTOR = "app.kubernetes.io/name=ktrace-agent,app.kubernetes.io/managed-by=ktrace"


class KubeClusterError(RuntimeError):
    """``scripts/cluster`` failed; the message carries its output."""


def bin_dir() -> pathlib.Path:
    out = subprocess.run([str(KUBE_BUILD), "--print-bindir"], capture_output=True, text=True, check=True)
    return pathlib.Path(out.stdout.strip())


def unavailable_reason() -> str | None:
    """Why the cluster cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the Kubernetes test cluster needs root"
    missing_tools = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing_tools:
        return f"host tools missing ({', '.join(missing_tools)}): needs iproute2 and Debian's apt"
    bindir = bin_dir()
    missing = [b for b in BINARIES if not (bindir / b).is_file()]
    if missing:
        return (
            f"Kubernetes binaries not built ({', '.join(missing)} missing in {bindir}): "
            "run scripts/kube-build (20-40 minutes cold)"
        )
    return None


def _env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@dataclass
class KubeCluster:
    admin_kubeconfig: pathlib.Path
    ktrace_kubeconfig: pathlib.Path
    bindir: pathlib.Path
    laptop_ns: str
    started: bool

    @classmethod
    def ensure(cls) -> KubeCluster:
        """Reuse a running cluster, or bring one up (then this object owns it)."""
        env = _env_lines(_run_script("env", timeout=30).stdout)
        status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True, timeout=60, check=False)
        started = status.returncode != 0
        if started:
            _run_script("up", timeout=UP_TIMEOUT)
        cluster = cls(
            admin_kubeconfig=pathlib.Path(env["KUBECONFIG_ADMIN"]),
            ktrace_kubeconfig=pathlib.Path(env["KUBECONFIG_KTRACE"]),
            bindir=pathlib.Path(env["KTRACE_KUBE_BIN"]),
            laptop_ns=env["KTRACE_LAPTOP_NS"],
            started=started,
        )
        # The restricted user's rights as this checkout's docs/rbac.yaml has them: a cluster started from
        # another checkout may have older ones (`up` applies the file only when it starts the cluster).
        cluster.kubectl("apply", "-f", str(REPO / "docs" / "rbac.yaml"))
        return cluster

    def teardown(self) -> None:
        """Stop the cluster if this session started it (``KTRACE_KUBE_KEEP=1`` keeps it running)."""
        if self.started and os.environ.get("KTRACE_KUBE_KEEP") != "1":
            self.started = False
            _run_script("down", timeout=120)

    def kubectl_argv(self, *args: str, user: str = "admin") -> list[str]:
        kubeconfig = self.admin_kubeconfig if user == "admin" else self.ktrace_kubeconfig
        return [str(self.bindir / "kubectl"), "--kubeconfig", str(kubeconfig), *args]

    def kubectl(
        self,
        *args: str,
        user: str = "admin",
        timeout: float = 60,
        stdin: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.kubectl_argv(*args, user=user),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubeClusterError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def build_agent_image(self) -> str:
        """The agent image from this checkout's Dockerfile, rebuilt and imported if agent/ changed."""
        _run_script("agent-image", timeout=600)
        return AGENT_IMAGE

    def import_image(self, name: str, files: Mapping[str, pathlib.Path], entrypoint: Sequence[str]) -> str:
        """An image of just ``files`` (path in the image -> local file, mode kept), imported into the cluster's
        containerd unless it has it already (tag it by content); made as scripts/cluster makes its images."""
        have = subprocess.run(
            [*CTR, "images", "ls", "-q"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
        if name in have:
            return name
        with tempfile.TemporaryDirectory(prefix="ktrace-image-") as work:
            layer = pathlib.Path(work) / "layer.tar"
            with tarfile.open(layer, "w") as tar:
                for inside, local in sorted(files.items()):
                    info = tar.gettarinfo(str(local), arcname=inside.lstrip("/"))
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0
                    with local.open("rb") as f:
                        tar.addfile(info, f)
            archive = pathlib.Path(work) / "image.tar"
            subprocess.run(
                [
                    sys.executable,
                    str(OCI_IMAGE),
                    str(archive),
                    name,
                    "--layer",
                    str(layer),
                    "--entrypoint",
                    json.dumps(list(entrypoint)),
                    "--user",
                    "65534",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            subprocess.run([*CTR, "images", "import", str(archive)], capture_output=True, timeout=300, check=True)
        return name

    def restart(self, component: str) -> None:
        """Kill one component (kube-apiserver, kubelet, ...) like a crash and start it again; return once the
        cluster serves as before."""
        proc = subprocess.run(
            [str(CLUSTER), "restart", component], capture_output=True, text=True, timeout=180, check=False
        )
        if proc.returncode != 0:
            raise KubeClusterError(f"scripts/cluster restart {component} failed:\n{proc.stderr[-4000:]}")
        self.wait_serving()

    def wait_serving(self, stable: float = 5.0, timeout: float = 60.0) -> None:
        """Until DNS and the hello Service have answered without a failure for ``stable`` seconds. A restarted
        kubelet may take the pods' readiness away for a moment, a second or two after it starts (until its first
        probes pass), and the Services lose their endpoints meanwhile; there is no event that says it is over."""
        deadline = time.monotonic() + timeout
        good_since: float | None = None
        while True:
            now = time.monotonic()
            if self._serves():
                good_since = good_since if good_since is not None else now
                if now - good_since >= stable:
                    return
            else:
                good_since = None
            if now > deadline:
                raise KubeClusterError(f"the cluster did not serve steadily within {timeout:g} s")
            time.sleep(0.2)

    def _serves(self) -> bool:
        """hello's name resolves through the cluster DNS and its Service answers. Asked from the node (root netns),
        whose routes to the pod and service networks lead only to the cluster's bridge."""
        dig = subprocess.run(
            ["dig", "+short", "+time=1", "+tries=1", f"@{DNS_IP}", f"hello.{TEST_NS}.svc.cluster.local"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        address = dig.stdout.strip()
        if dig.returncode != 0 or not address:
            return False
        curl = subprocess.run(
            ["curl", "-sS", "--max-time", "2", f"http://{address}:8080/"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return curl.returncode == 0 and curl.stdout.startswith("hello from")

    def laptop_env(self, **extra: str) -> list[str]:
        """``ip netns exec <laptop> env ...``: a command run as on a developer's laptop, as the restricted user."""
        env = {"KUBECONFIG": str(self.ktrace_kubeconfig), "KTRACE_AGENT_IMAGE": AGENT_IMAGE, **extra}
        return ["ip", "netns", "exec", self.laptop_ns, "env", *(f"{k}={v}" for k, v in env.items())]

    def in_laptop(
        self, argv: Sequence[str], timeout: float = 30, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a program in the "laptop" network namespace (only the API server is reachable)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.laptop_ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )


def _run_script(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(CLUSTER), command], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise KubeClusterError(f"scripts/cluster {command} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc
