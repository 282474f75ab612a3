"""`ktrace --version`, shell completion and the kubectl plugin entry point, as installed."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from ktrace import __version__

BIN = pathlib.Path(sys.executable).parent
KTRACE = str(BIN / "ktrace")

pytestmark = pytest.mark.timeout(60)


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False, env=env)


def test_version() -> None:
    r = run(KTRACE, "--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"ktrace {__version__}")


def complete(words: list[str]) -> list[str]:
    """What bash completes for ``words`` (the last one being typed), with ktrace's script loaded."""
    script = run(KTRACE, "completion", "bash")
    assert script.returncode == 0, script
    line = " ".join(words)
    probe = (
        f'{script.stdout}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE="{line}"; '
        f"COMP_POINT=${{#COMP_LINE}}; _shtab_ktrace; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    r = run("bash", "-c", probe)
    assert r.returncode == 0, r
    return r.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_completes_commands_and_options() -> None:
    assert complete(["ktrace", "ru"]) == ["run"]
    assert set(complete(["ktrace", ""])) >= {"run", "doctor", "completion", "agent"}
    assert set(complete(["ktrace", "run", "--lo"])) == {"--local", "--log-json"}
    assert complete(["ktrace", "run", "--hosts", "cl"]) == ["cluster"]


def test_zsh_and_fish_scripts() -> None:
    zsh = run(KTRACE, "completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef ktrace"), zsh.stdout[:200]
    assert "--local" in zsh.stdout and "--log-json" in zsh.stdout
    if shutil.which("zsh"):
        assert run("zsh", "-n", "-c", zsh.stdout).returncode == 0
    fish = run(KTRACE, "completion", "fish")
    assert fish.returncode == 0 and "complete -c ktrace" in fish.stdout


def test_kubectl_plugin_entry_point() -> None:
    plugin = BIN / "kubectl-ktrace"
    assert plugin.is_file() and os.access(plugin, os.X_OK)
    r = run(str(plugin), "run", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: kubectl ktrace run [options] -- CMD [ARG...]"), r


def _kubectl() -> str | None:
    candidates = [shutil.which("kubectl")]
    try:
        from kubecluster import bin_dir

        candidates.append(str(bin_dir() / "kubectl"))
    except Exception:  # the kube build script may be missing or fail: then only PATH counts
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_kubectl_runs_the_plugin() -> None:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl binary (scripts/kube-build builds one)")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "KUBECONFIG": "/dev/null"}
    r = run(kubectl, "ktrace", "--version", env=env)
    assert (r.returncode, r.stdout.strip()) == (0, f"ktrace {__version__}"), r
    listed = run(kubectl, "plugin", "list", env=env)
    assert str(BIN / "kubectl-ktrace") in listed.stdout, listed
