"""ktrace's own process settings (agent/wire/tuning.py): gRPC core settings applied only where measured,
never over the user's and never passed on to the traced program; malloc kept from page-faulting."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from fixture_programs import Programs
from ktrace_agent.wire import tuning
from nscluster import NamespaceCluster


def test_sets_experiments_on_a_measured_version() -> None:
    env: dict[str, str] = {}
    assert tuning.apply(env, "1.85.3") == {"GRPC_EXPERIMENTS": tuning.EXPERIMENTS_OFF}
    assert env == {"GRPC_EXPERIMENTS": tuning.EXPERIMENTS_OFF}


@pytest.mark.parametrize("version", ["1.99.0", "2.0.0", None])
def test_leaves_unmeasured_versions_alone(version: str | None) -> None:
    env: dict[str, str] = {}
    assert tuning.apply(env, version) == {}
    assert env == {}


def test_never_overrides_the_user() -> None:
    env = {"GRPC_EXPERIMENTS": "mine"}
    assert tuning.apply(env, "1.85.3") == {}
    assert env == {"GRPC_EXPERIMENTS": "mine"}


def test_reads_the_installed_version_without_importing_grpc() -> None:
    version = tuning.grpc_version()
    assert version is not None and version[0].isdigit()


def test_malloc_is_tuned_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tuning.tune_malloc()


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_gc_keeps_the_start_up_heap_out_of_collections() -> None:
    # In a child: the test process's own collector is left alone.
    code = (
        "import gc; from ktrace_agent.wire import tuning; import grpc; tuning.tune_gc(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count(), len(gc.get_objects()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    threshold, frozen, tracked = (int(x) for x in out.stdout.split())
    assert threshold == tuning.GC_THRESHOLD0
    # grpc and its dependencies are thousands of objects, all frozen; what the collector
    # still tracks is what the print itself made.
    assert frozen > 10_000
    assert tracked < 100


def test_the_program_gets_the_users_environment(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    r = c.run_laptop(c.ktrace_argv("env"), timeout=30, env={"PATH": "/usr/bin:/bin", "KEEP": "1"})
    assert r.returncode == 0, r.stderr
    lines = set(r.stdout.splitlines())
    assert "KEEP=1" in lines
    assert not any(line.startswith("GRPC_EXPERIMENTS=") for line in lines), r.stdout
    r = c.run_laptop(c.ktrace_argv("env"), timeout=30, env={"PATH": "/usr/bin:/bin", "GRPC_EXPERIMENTS": "mine"})
    assert "GRPC_EXPERIMENTS=mine" in r.stdout.splitlines(), r.stdout


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_ktrace_raises_its_own_descriptor_limit_not_the_programs(
    ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    """With a soft limit of 200, a program making 185 concurrent connections fits (it holds 185
    sockets); ktrace, holding one socket per connection plus its own ~25, would not without
    raising its limit. The program still sees the user's limit."""
    c = ktrace_cluster
    ktrace = " ".join(shlex.quote(a) for a in c.ktrace_argv())
    r = c.run_laptop(["sh", "-c", f"ulimit -Sn 200 && exec {ktrace} sh -c 'ulimit -Sn'"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "200"
    bench = programs["cnetbench"]
    cmd = f"ulimit -Sn 200 && exec {ktrace} {bench} concurrent {c.echo_v4} {c.echo_port} 185 1000"
    r = c.run_laptop(["sh", "-c", cmd], timeout=100)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok 185 of 185"), r.stdout
