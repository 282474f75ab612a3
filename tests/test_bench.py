"""scripts/bench --quick keeps working: it measures every figure and writes a well-formed table
and JSON. The numbers themselves are never checked here (timing is not a pass/fail test)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"

sys.path.insert(0, str(REPO / "scripts"))
from bench_report import FIGURE_IDS  # noqa: E402


@pytest.mark.netns
@pytest.mark.bench
@pytest.mark.timeout(300)
def test_quick_bench_measures_every_figure(ns_cluster: object, tmp_path: pathlib.Path) -> None:
    # ns_cluster: skips where namespaces are unavailable; the bench makes its own cluster.
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["mode"] == "quick"
    for key in ("cpu", "cores", "kernel", "load_before", "load_after"):
        assert report["machine"].get(key), key
    figures = {fig["id"]: fig for fig in report["figures"]}
    # Every figure, once per backend, in the same run.
    assert set(figures) == {f"{fid}[{backend}]" for fid in FIGURE_IDS for backend in ("ptrace", "notify")}
    for fid, fig in figures.items():
        assert not fig["errors"], (fid, fig["errors"])
        assert fig["samples"] and fig["value"] is not None, fid
        assert fig["loads"], fid
        if fig["baseline_label"]:
            assert fig["baseline_samples"] and fig["baseline"] is not None, fid
        if fig["check"] != "none":
            assert fig["met"] in (True, False), fid
        for name, samples in fig["peers"].items():
            assert samples, (fid, name)
    assert figures["concurrent_1000[notify]"]["condition_ok"] is not None
    # The stop floors (C supervisors, tests/programs/stopfloor.c) are measured in the same run.
    for mode in ("trace", "trace-spin", "notif", "notif-spin"):
        assert f"floor_{mode}_us_per_open" in figures["open_loop[ptrace]"]["extra"], mode
    table = (tmp_path / "bench.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) == 2 * len(FIGURE_IDS)
    assert all(line.count("|") == 10 for line in rows), rows
