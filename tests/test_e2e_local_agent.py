"""End-to-end, `ktrace run --agent local`: it exits without gRPC's noise, and the temporary
directories of a ktrace killed with SIGKILL are found and removed, at the next start and by
`ktrace cleanup`; a running ktrace's are never touched.

Each test points TMPDIR at a directory of its own, so it sees only its own ktrace processes.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest
from e2e_helpers import wait_exited, wait_until
from nscluster import NamespaceCluster, _tool

from ktrace.private_dirs import OWNER, SETTLE

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def _env(tmp: pathlib.Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp), "KUBECONFIG": str(tmp / "no-kubeconfig")}


def _ktrace_dirs(tmp: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in tmp.iterdir() if p.name.startswith("ktrace-"))


def _start(c: NamespaceCluster, tmp: pathlib.Path) -> subprocess.Popen[str]:
    """`ktrace run --agent local -- sleep 60`, once its resolver view and agent socket exist."""
    proc = c.popen_laptop([_tool("ktrace"), "run", "--agent", "local", "--", "sleep", "60"], env=_env(tmp))
    wait_until(lambda: len(_ktrace_dirs(tmp)) == 2, 30, "ktrace's two temporary directories")
    return proc


def _age(dirs: list[pathlib.Path]) -> None:
    """Make the lock files look older than SETTLE (a fresh one may not be locked yet)."""
    old = time.time() - SETTLE - 60
    for d in dirs:
        os.utime(d / OWNER, (old, old))


def _kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def test_killed_ktrace_dirs_are_removed_by_cleanup_not_a_running_ones(
    ktrace_cluster: NamespaceCluster, tmp_path: pathlib.Path
) -> None:
    c = ktrace_cluster
    killed = _start(c, tmp_path)
    left = _ktrace_dirs(tmp_path)
    assert sorted(d.name.split("-")[1] for d in left) == ["agent", "view"]
    assert (next(d for d in left if "agent" in d.name) / "agent.sock").is_socket()
    _kill9(killed)
    assert _ktrace_dirs(tmp_path) == left  # what SIGKILL leaves behind
    running = _start_another(c, tmp_path, left)
    try:
        _age(_ktrace_dirs(tmp_path))
        r = c.run_laptop([_tool("ktrace"), "cleanup"], timeout=60, env=_env(tmp_path))
        for d in left:
            assert f"removed {d} (left by a ktrace that was killed)" in r.stdout, r
        assert [d for d in _ktrace_dirs(tmp_path) if d in left] == []
        assert len(_ktrace_dirs(tmp_path)) == 2  # the running ktrace's
    finally:
        running.terminate()
        running.communicate(timeout=30)
    assert _ktrace_dirs(tmp_path) == []


def _start_another(c: NamespaceCluster, tmp: pathlib.Path, existing: list[pathlib.Path]) -> subprocess.Popen[str]:
    proc = c.popen_laptop([_tool("ktrace"), "run", "--agent", "local", "--", "sleep", "60"], env=_env(tmp))
    wait_until(lambda: len(_ktrace_dirs(tmp)) == len(existing) + 2, 30, "the second ktrace's directories")
    return proc


def test_the_next_start_removes_a_killed_ktraces_dirs(ktrace_cluster: NamespaceCluster, tmp_path: pathlib.Path) -> None:
    c = ktrace_cluster
    killed = _start(c, tmp_path)
    pid = killed.pid
    _kill9(killed)
    wait_exited(pid, 30)
    _age(_ktrace_dirs(tmp_path))
    r = c.run_laptop([_tool("ktrace"), "run", "--agent", "local", "--", "true"], timeout=60, env=_env(tmp_path))
    assert r.returncode == 0, r
    assert _ktrace_dirs(tmp_path) == []


def test_exit_prints_nothing_even_when_runs_overlap(ktrace_cluster: NamespaceCluster, tmp_path: pathlib.Path) -> None:
    """The in-process agent stops with the tasks of its cancelled streams still unwinding; grpc
    printed a CancelledError traceback for each left when the loop ended (1-3 runs in 10, more
    with other runs competing for the CPU)."""
    c = ktrace_cluster
    argv = [_tool("ktrace"), "run", "--agent", "local", "--", "true"]
    for _ in range(4):
        runs = [c.popen_laptop(argv, env=_env(tmp_path)) for _ in range(3)]
        for proc in runs:
            out, err = proc.communicate(timeout=60)
            assert (proc.returncode, out, err) == (0, "", ""), err
