"""scripts/bench-kube on the real cluster: stopping it stops what it started."""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys

import pytest
from e2e_helpers import read_line, wait_until
from kubecluster import KubeCluster
from test_kube_agent import agent_pods

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_sigterm_stops_its_port_forward_and_its_ktrace(kube_cluster: KubeCluster) -> None:
    """Python's default for SIGTERM exits without running any ``finally``: the `kubectl port-forward` the
    bench compares ktrace with would be left running, and a `ktrace run` it was timing killed, its agent
    pod left until the agent's idle exit (as a CI job's or a terminal's end sends)."""
    kube_cluster.build_agent_image()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "bench-kube"),
            "--only",
            "requests",
            "--runs",
            "1",
            "--requests",
            "300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ""
        while not line.startswith("kubectl port-forward (pid"):
            line = read_line(proc, 180)
        match = re.search(r"pid (\d+)", line)
        assert match, line
        forward = pathlib.Path(f"/proc/{match.group(1)}")
        assert "port-forward" in (forward / "cmdline").read_bytes().decode(errors="replace")
        # Stopped while a `ktrace run` it times has its agent pod (starting, or up).
        wait_until(
            lambda: any("deletionTimestamp" not in p["metadata"] for p in agent_pods(kube_cluster)),
            timeout=120,
            what="an agent pod of the bench's ktrace",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # Reaped by the bench (terminate, then wait): its /proc entry is gone.
    wait_until(lambda: not forward.exists(), timeout=10, what="kubectl port-forward to end")
    # The ktrace it was timing got a SIGTERM too and deleted its agent pod (killed, it could not).
    wait_until(lambda: not agent_pods(kube_cluster), timeout=30, what="the agent pod to be deleted")
