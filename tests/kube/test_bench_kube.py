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

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_sigterm_stops_its_port_forward(kube_cluster: KubeCluster) -> None:
    """Python's default for SIGTERM exits without running any ``finally``: the `kubectl port-forward` the
    bench compares ktrace with would be left running (as a CI job's or a terminal's end sends)."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "bench-kube"), "--only", "requests", "--runs", "1", "--requests", "1"],
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # Reaped by the bench (terminate, then wait): its /proc entry is gone.
    wait_until(lambda: not forward.exists(), timeout=10, what="kubectl port-forward to end")
