"""`ktrace doctor`: passes here, and says why when ptrace is denied (a real seccomp filter)."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterable

import pytest

from ktrace import config, doctor
from ktrace.doctor import CheckResult, ProcessFacts, Status

HERE = pathlib.Path(__file__).resolve().parent
KTRACE = str(pathlib.Path(sys.executable).parent / "ktrace")

pytestmark = pytest.mark.timeout(120)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    # No cluster here: with the local agent the Kubernetes checks skip (tests/kube checks them on a cluster).
    env = {**os.environ, "KTRACE_AGENT": "local"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=90, check=False, stdin=subprocess.DEVNULL, env=env
    )


def test_doctor_passes_here() -> None:
    r = run(KTRACE, "doctor")
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    names = [line.split()[1] for line in lines]
    assert names[:8] == ["kernel", "yama", "seccomp", "ptrace", "vm_readv", "pidfd", "notify", "backend"], lines
    assert all(line.startswith("ok ") for line in lines[:8]), lines
    assert lines[8:] == ["skip  kube       the agent is local, not in a cluster"], lines


def test_doctor_explains_ptrace_denied_by_a_seccomp_profile() -> None:
    r = run(sys.executable, str(HERE / "deny_ptrace.py"), KTRACE, "doctor")
    assert r.returncode == 1, r
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, r.stdout
    line = failed[0]
    assert line.startswith("FAIL  ptrace     PTRACE_SEIZE failed (EPERM): ktrace runs under 1 seccomp filter(s)")
    assert "a container's seccomp profile" in line and "(fix: run the container with a seccomp profile" in line
    assert "seccomp=unconfined" in line
    assert "1 check(s) failed" in r.stderr
    # The other checks still ran and passed: the filter denies ptrace only, and the notify
    # backend, which needs no ptrace, works.
    assert any(x.startswith("ok    seccomp") for x in r.stdout.splitlines()), r.stdout
    assert any(x.startswith("ok    notify") for x in r.stdout.splitlines()), r.stdout


def test_under_the_same_profile_the_notify_backend_runs() -> None:
    r = run(
        sys.executable,
        str(HERE / "deny_ptrace.py"),
        KTRACE,
        "run",
        "--backend",
        "notify",
        "--agent",
        "local",
        "--",
        "true",
    )
    assert r.returncode == 0, r


def test_ktrace_run_under_the_same_profile_fails_with_one_line_and_a_hint() -> None:
    r = run(sys.executable, str(HERE / "deny_ptrace.py"), KTRACE, "run", "--agent", "local", "--", "true")
    assert r.returncode == 125, r
    assert r.stderr.strip().splitlines() == [
        "ktrace: cannot trace the program: ptrace failed: Operation not permitted (hint: ptrace may be denied "
        "here (container seccomp profile, Yama ptrace_scope): --backend notify needs no ptrace; run `ktrace doctor`)"
    ], r.stderr


STATUS = "Name:\tx\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t3\nCapEff:\t0000000000080000\n"


def test_process_facts() -> None:
    facts = ProcessFacts.parse(STATUS, "2\n")
    assert facts == ProcessFacts(2, 3, True, True, 2)
    assert ProcessFacts.parse("CapEff:\t0\n", None) == ProcessFacts()


@pytest.mark.parametrize(
    ("facts", "words"),
    [
        (ProcessFacts(yama_scope=3), "disabled on this machine until reboot"),
        (ProcessFacts(yama_scope=2), "only processes with CAP_SYS_PTRACE"),
        (ProcessFacts(yama_scope=2, cap_sys_ptrace=True, seccomp_mode=2, seccomp_filters=1), "seccomp filter"),
        (ProcessFacts(yama_scope=1), "AppArmor/SELinux"),
    ],
)
def test_explanations(facts: ProcessFacts, words: str) -> None:
    detail, fix = doctor.explain_ptrace_denied(facts, errno.EPERM)
    assert words in detail and fix


def test_kernel_version() -> None:
    assert doctor.kernel_version("6.18.44-fc-v595") == (6, 18)
    assert doctor.kernel_version("5.4.0-150-generic") == (5, 4) < doctor.MIN_KERNEL
    assert doctor.kernel_version("garbage") is None


def test_a_broken_check_is_reported_and_the_others_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(settings: config.Settings) -> Iterable[CheckResult]:
        raise RuntimeError("boom")

    def fine(settings: config.Settings) -> Iterable[CheckResult]:
        return [CheckResult("fine", Status.OK, "all good")]

    monkeypatch.setattr(doctor, "CHECKS", [broken, fine])
    monkeypatch.setattr(doctor, "PLUGIN_CHECKS", ["ktrace.no_such_module:checks"])
    results = doctor.run_checks(config.Settings({}, None))
    assert [(r.name, r.status) for r in results] == [("broken", Status.FAIL), ("fine", Status.OK)]
    assert "RuntimeError: boom" in results[0].detail
    assert results[0].line().startswith("FAIL  broken")


def test_doctor_with_a_bad_config_file_is_one_line(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ktrace.toml").write_text("agnet = 'x'\n")
    r = subprocess.run([KTRACE, "doctor"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 125 and "unknown key 'agnet' (did you mean 'agent'?)" in r.stderr, r
    assert os.linesep.join(r.stderr.strip().splitlines()) == r.stderr.strip()
