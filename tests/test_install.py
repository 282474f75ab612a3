"""What a user installs: the sdist and the wheel, built as a release builds them, and the wheel installed
into a new venv and run from there.

The sdist is built from a copy of the tracked files (what a fresh clone has: no generated ktrace_proto/, no
egg-info), the wheel from that sdist (``python -m build``, in isolated build environments), and the wheel
is installed into a new venv: no editable install, no source tree on ``sys.path``. Every module of the
source tree must import from that venv, so a module left out of the wheel fails here; then the installed
commands run end to end in the namespace cluster.

Fast and offline once warm: the build and runtime requirements are downloaded once per requirement set
into a wheelhouse outside the repository (``~/.cache/ktrace/wheelhouse/<hash>``), and both the isolated
builds and the install use only that (``--no-index``). The install skips byte-compiling the dependencies
(the kubernetes client alone is thousands of files); what the tests import compiles as it is imported.
"""

from __future__ import annotations

import contextlib
import email.parser
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from fixture_programs import Programs
from nscluster import ClusterError, NamespaceCluster, unavailable_reason

pytestmark = pytest.mark.timeout(600)  # the first run downloads the wheelhouse; a warm one takes seconds

REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "ktrace" / "wheelhouse"
PACKAGES = {"ktrace": "ktrace", "ktrace_agent": "agent", "ktrace_version": "ktrace_version"}  # name -> source dir


def _run(
    argv: Sequence[str], timeout: float, cwd: pathlib.Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def source_modules() -> list[str]:
    """Every module of the three packages, from the source tree (what the wheel must hold)."""
    names: list[str] = []
    for package, directory in PACKAGES.items():
        for path in sorted((REPO / directory).rglob("*.py")):
            parts = path.relative_to(REPO / directory).with_suffix("").parts
            if parts[-1] == "__main__":
                continue  # runs the command when imported: `python -m` runs it instead
            names.append(".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts)))
    names.append("ktrace_proto")
    for proto in sorted((REPO / "protos").rglob("*.proto")):
        module = ".".join(proto.relative_to(REPO / "protos").with_suffix("").parts)
        names += [f"{module}_pb2", f"{module}_pb2_grpc"]
    return names


def fresh_copy(dest: pathlib.Path) -> None:
    """The files a clone of this working tree would have (tracked, and new files not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, cannot tell the tracked files: {listed.stderr.decode().strip()}")
    for name in listed.stdout.decode().split("\0"):
        src = REPO / name
        if name and os.path.lexists(src):  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)


def wheelhouse(requirements: Sequence[str]) -> pathlib.Path:
    """A directory holding wheels for ``requirements`` (and their dependencies) for this Python."""
    key_text = "\n".join([sys.version, sys.platform, *sorted(requirements)])
    house = CACHE / hashlib.sha256(key_text.encode()).hexdigest()[:16]
    if (house / ".complete").exists():
        return house
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".download-", dir=CACHE))
    try:
        argv = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(tmp), *requirements]
        _run(argv, timeout=480)
        (tmp / ".complete").write_text(key_text + "\n")
        with contextlib.suppress(OSError):  # another run made it meanwhile: theirs is as good
            tmp.rename(house)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return house


def runtime_requirements(wheel: pathlib.Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(z.read(name).decode())
    return [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]


def offline_pip_env(*houses: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=" ".join(map(str, houses)), PIP_NO_INPUT="1")
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@dataclass(frozen=True)
class Installed:
    sdist: pathlib.Path
    wheel: pathlib.Path
    venv: pathlib.Path
    work: pathlib.Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    @property
    def site_packages(self) -> pathlib.Path:
        return next((self.venv / "lib").glob("python3*/site-packages"))


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="ktrace-install-"))
    try:
        src, dist, venv = work / "src", work / "dist", work / "venv"
        fresh_copy(src)
        build_requires = tomllib.loads((src / "pyproject.toml").read_text())["build-system"]["requires"]
        builds = wheelhouse(build_requires)
        # No --sdist/--wheel: the sdist first, then the wheel from the unpacked sdist, as a release does.
        _run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], 300, env=offline_pip_env(builds))
        (sdist,) = dist.glob("*.tar.gz")
        (wheel,) = dist.glob("*.whl")
        runtime = wheelhouse(runtime_requirements(wheel))
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], 120)
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-compile"]
        _run([*pip, str(wheel)], 300, env=offline_pip_env(runtime))
        yield Installed(sdist=sdist, wheel=wheel, venv=venv, work=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# What the installed Python imports, and from where; -I: no working directory, no PYTHON* variables on sys.path.
IMPORT_ALL = """
import importlib, json, sys
files = {name: importlib.import_module(name).__file__ for name in json.loads(sys.argv[1])}
print(json.dumps({"files": files, "path": sys.path}))
"""


def test_every_module_imports_from_the_installed_wheel(installed: Installed) -> None:
    expected = source_modules()
    assert {"ktrace.kube.api", "ktrace_agent.server", "ktrace_proto.tunnel_v1_pb2_grpc"} <= set(expected)
    r = _run([installed.bin("python"), "-I", "-c", IMPORT_ALL, json.dumps(expected)], 120, cwd=installed.work)
    seen = json.loads(r.stdout)
    site = str(installed.site_packages)
    elsewhere = {name: f for name, f in seen["files"].items() if not f.startswith(site + os.sep)}
    assert not elsewhere, f"imported from outside the installed venv: {elsewhere}"
    assert not [p for p in seen["path"] if p.startswith(str(REPO))], seen["path"]
    assert not list(installed.site_packages.glob("__editable__*")), "an editable install in the new venv"
    for package in ("ktrace", "ktrace_agent", "ktrace_proto", "ktrace_version"):
        assert (installed.site_packages / package / "py.typed").is_file(), package
    assert list((installed.site_packages / "ktrace_proto").glob("*_pb2.pyi"))


def test_sdist_builds_the_generated_code_itself(installed: Installed) -> None:
    import tarfile

    with tarfile.open(installed.sdist) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert "protos/ktrace_proto/tunnel_v1.proto" in names
    assert "ktrace_version/__init__.py" in names and "setup.py" in names and "MANIFEST.in" in names
    assert not [n for n in names if n.startswith("ktrace_proto/")], "the sdist must build ktrace_proto, not ship it"
    with zipfile.ZipFile(installed.wheel) as wheel:
        assert "ktrace_proto/tunnel_v1_pb2_grpc.py" in wheel.namelist()


def test_installed_commands_report_the_version(installed: Installed) -> None:
    version = _run(
        [installed.bin("python"), "-I", "-c", "import ktrace_version; print(ktrace_version.__version__)"], 60
    )
    v = version.stdout.strip()
    assert installed.wheel.name.startswith(f"ktrace-{v}-")
    expected = {
        (installed.bin("ktrace"), "--version"): f"ktrace {v}",
        (installed.bin("kubectl-ktrace"), "--version"): f"ktrace {v}",
        (installed.bin("ktrace-agent"), "--version"): f"ktrace-agent {v}",
        (installed.bin("python"), "-I", "-m", "ktrace", "--version"): f"ktrace {v}",
        (installed.bin("python"), "-I", "-m", "ktrace_agent", "--version"): f"ktrace-agent {v}",
    }
    for argv, line in expected.items():
        assert _run(argv, 60, cwd=installed.work).stdout.strip() == line, argv


def _loaded_from(pid: int, site_packages: pathlib.Path) -> bool:
    """Whether the process mapped grpc's extension from ``site_packages`` (the agent's own imports)."""
    maps = pathlib.Path(f"/proc/{pid}/maps").read_text()
    return any("cygrpc" in line and str(site_packages) in line for line in maps.splitlines())


@pytest.mark.netns
def test_installed_ktrace_reaches_a_cluster_service_by_short_name(
    installed: Installed, programs: Programs, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    goclient = programs["goclient"]  # static Go: its own resolver, raw syscalls
    monkeypatch.setenv("KTRACE_AGENT_BIN", installed.bin("ktrace-agent"))  # the agent nscluster starts
    try:
        cluster = NamespaceCluster.up()
    except ClusterError as exc:
        pytest.fail(f"the namespace cluster could not be set up: {exc}")
    try:
        assert cluster.agent_error is None, cluster.agent_error
        agent_pid = cluster.pids[-1]
        assert installed.bin("ktrace-agent") in pathlib.Path(f"/proc/{agent_pid}/cmdline").read_text()
        assert _loaded_from(agent_pid, installed.site_packages), "the agent did not run from the installed venv"
        url = f"http://hello:{cluster.hello_port}/"  # a short name: the cluster's DNS and search list
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(installed.work)}  # nothing of the test's venv
        without = cluster.run_laptop([goclient, url], timeout=60, env=env)
        assert without.returncode != 0 and "hello from cluster" not in without.stdout, without
        argv = [installed.bin("ktrace"), "run", "--agent", cluster.agent_addr, "--token-file", cluster.token_file]
        traced = cluster.run_laptop([*argv, "--", goclient, url], timeout=60, env=env)
        assert traced.returncode == 0, traced
        assert traced.stdout.startswith("ok 1/1 hello from cluster, you are "), traced
    finally:
        cluster.teardown()


def test_agent_wheels_package_the_source_not_a_stale_build_dir(tmp_path: pathlib.Path) -> None:
    """scripts/agent-wheels makes the wheel the agent image installs. A build/ (or egg-info) left in the
    tree by an earlier build, or carried along when the tree was copied, must not leak old files into it."""
    src = tmp_path / "src"
    fresh_copy(src)
    stale = src / "build" / "lib" / "ktrace_agent"
    stale.mkdir(parents=True)
    (stale / "left_over_module.py").write_text("raise SystemExit('an old build')\n")
    _run(["bash", str(src / "scripts" / "agent-wheels"), "--python", sys.executable], timeout=300)
    (wheel,) = (src / "dist" / "agent").glob("ktrace-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "ktrace_agent/main.py" in names
    assert "ktrace_agent/left_over_module.py" not in names
    assert list(src.glob("build/lib/ktrace_agent/*.py")) == [stale / "left_over_module.py"], "the tree was built in"
