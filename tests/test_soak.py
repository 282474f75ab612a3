"""scripts/soak --quick keeps working: every phase runs and is measured, the table and JSON are well
formed. Memory figures themselves are never checked here (docs/performance.md has the full run)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

SOAK = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


@pytest.mark.netns
@pytest.mark.bench
@pytest.mark.timeout(300)
def test_quick_soak_measures_every_phase(ns_cluster: object, tmp_path: pathlib.Path) -> None:
    # ns_cluster: skips where namespaces are unavailable; the soak makes its own cluster.
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["mode"] == "quick"
    soak = report["soak"]
    assert soak["exit_status"] == 0 and soak["cycles"] > 0, soak
    for process in ("ktrace", "agent"):
        figures = soak[process]
        assert all(figures[key] is not None for key in figures), (process, figures)
        assert len(soak["samples"][process]) >= 3, process
    bursts = report["bursts"]
    assert bursts["client_status"] == 0, bursts["client_stderr_tail"]
    assert len(bursts["agent_after_mb"]) == len(bursts["agent_settled_mb"]) == bursts["bursts"] == 2
    assert all(n > 0 for n in bursts["rejected"]), bursts
    table = (tmp_path / "soak.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table if line.startswith("| ") and "MB |" not in line] == [
        "ktrace",
        "agent",
    ]
