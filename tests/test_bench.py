"""scripts/bench --quick keeps working: it measures every figure and writes a well-formed table
and JSON. The numbers themselves are never checked here (timing is not a pass/fail test)."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import pytest
from e2e_helpers import read_line

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


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


@pytest.mark.netns
@pytest.mark.bench
@pytest.mark.timeout(300)
def test_a_terminated_bench_leaves_no_namespace_or_server(ns_cluster: object, tmp_path: pathlib.Path) -> None:
    before = namespaces()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--backends",
            "ptrace",
            "--out",
            str(tmp_path),
            "--only",
            "startup_true,throughput_up,throughput_down,concurrent_1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Its first figure done: its namespaces, servers and peers are all up.
        line = ""
        while "startup_true[ptrace]" not in line:
            line = read_line(proc, 240)
        ours = namespaces() - before
        assert ours, "the bench made no namespace"
        # Everything running in them: the bench's servers, the agent, the SOCKS peers.
        pids = set()
        for name in ours:
            listed = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=True
            )
            pids |= {int(pid) for pid in listed.stdout.split()}
        assert pids, "nothing runs in the bench's namespaces"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert not namespaces() & ours
    assert [pid for pid in pids if alive(pid)] == []


def alive(pid: int) -> bool:
    """Running: a zombie whose parent is gone has ended, it is only not reaped yet."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
