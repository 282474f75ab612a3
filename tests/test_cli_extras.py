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
    assert set(complete(["ktrace", "run", "--lo"])) == {"--local", "--local-path", "--log-json"}
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


# --- exit statuses: 125 for every failure of ktrace's own, 0 for --help/--version ---------------------------

AGENT = str(BIN / "ktrace-agent")
KUBECTL_KTRACE = str(BIN / "kubectl-ktrace")
RAN = ["sh", "-c", "echo ran"]  # must never run when ktrace fails first


NO_COMMAND = "no command given (one of run, doctor, cleanup, image, completion, agent)"
RUN_USAGE = "ktrace: no command given (hint: usage: ktrace run [options] -- CMD [ARG...])"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ([KTRACE], f"ktrace: {NO_COMMAND} (hint: see 'ktrace --help')"),
        ([KTRACE, "--nonsense"], "ktrace: unrecognized arguments: --nonsense (hint: see 'ktrace --help')"),
        ([KTRACE, "nonsense"], "ktrace: argument COMMAND: invalid choice: 'nonsense'"),
        ([KTRACE, "run", "--x", "--", *RAN], "ktrace: unrecognized arguments: --x (hint: see 'ktrace run --help')"),
        ([KTRACE, "run"], RUN_USAGE),
        ([KTRACE, "run", "--agent", "local"], RUN_USAGE),
        ([KTRACE, "run", "--hosts", "pod", "--", *RAN], "ktrace: argument --hosts: invalid choice: 'pod'"),
        ([KTRACE, "run", "--connect-timeout", "0", "--", *RAN], "ktrace: argument --connect-timeout: must be positive"),
        ([KTRACE, "run", "--local", "10.0.0.1/8", "--", *RAN], "ktrace: bad rule for --local: '10.0.0.1/8' has host"),
        ([KTRACE, "run", "--agent", "local", "--target", "pod/x", "--", *RAN], "ktrace: --target needs --agent kube"),
        ([KTRACE, "run", "--target", "svc/x", "--", *RAN], "ktrace: --target 'svc/x'"),
        ([KTRACE, "completion"], "ktrace: the following arguments are required: shell (hint: see 'ktrace completion"),
        ([KTRACE, "completion", "powershell"], "ktrace: argument shell: invalid choice: 'powershell'"),
        ([KTRACE, "cleanup", "--bogus"], "ktrace: unrecognized arguments: --bogus (hint: see 'ktrace cleanup --help')"),
        ([KTRACE, "image"], "ktrace: the following arguments are required: ACTION (hint: see 'ktrace image --help')"),
        ([KTRACE, "image", "build", "--load", "k3s"], "ktrace: argument --load: invalid choice: 'k3s'"),
        ([KTRACE, "image", "build", "--platform", "linux/mips"], "ktrace: --platform 'linux/mips': not one of "),
        ([KUBECTL_KTRACE, "run", "--x", "--", *RAN], "ktrace: unrecognized arguments: --x (hint: see 'kubectl"),
        ([KUBECTL_KTRACE], f"ktrace: {NO_COMMAND} (hint: see 'kubectl ktrace --help')"),
        ([KTRACE, "agent"], "ktrace agent: error: the following arguments are required: --listen (hint"),
        ([KTRACE, "agent", "--listen", "0.0.0.0:0"], "ktrace agent: error: refusing to listen on non-loopback address"),
        ([KTRACE, "agent", "--listen", "unix:/x.sock", "--bogus"], "ktrace agent: error: unrecognized arguments"),
        ([AGENT, "--bogus"], "ktrace-agent: error: the following arguments are required: --listen (hint: see"),
        ([AGENT, "--listen", "unix:/x.sock", "--idle-exit", "soon"], "ktrace-agent: error: argument --idle-exit"),
    ],
)  # fmt: skip
def test_own_failures_exit_125_with_one_line(argv: list[str], line: str, tmp_path: pathlib.Path) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False, cwd=tmp_path)
    assert r.returncode == 125, r
    assert "ran" not in r.stdout and r.stdout == "", r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("toml", "env", "line"),
    [
        ("conect-timeout = 5\n", {}, "unknown key 'conect-timeout' (did you mean 'connect-timeout'?)"),
        ("hosts = 'pod'\n", {}, "hosts must be one of local, cluster, not 'pod'"),
        ("agent = \n", {}, "not valid TOML"),
        ("", {"KTRACE_CONNECT_TIMEOUT": "soon"}, "KTRACE_CONNECT_TIMEOUT must be a positive number, not 'soon'"),
        ("", {"KTRACE_AGENT_PULL_POLICY": "Sometimes"}, "KTRACE_AGENT_PULL_POLICY"),
    ],
)
def test_configuration_errors_exit_125(tmp_path: pathlib.Path, toml: str, env: dict[str, str], line: str) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(toml)
    environ = {**os.environ, **env}
    for argv in (
        [KTRACE, "run", "-f", str(config), "--agent", "local", "--", *RAN],
        [KTRACE, "doctor", "-f", str(config)],
    ):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False, cwd=tmp_path, env=environ)
        assert r.returncode == 125, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and line in lines[0] and lines[0].startswith("ktrace: "), r.stderr
        assert "ran" not in r.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [KTRACE, "--help"],
        [KTRACE, "-h"],
        [KTRACE, "run", "--help"],
        [KTRACE, "image", "build", "--help"],
        [KTRACE, "cleanup", "--help"],
        [KTRACE, "agent", "--help"],
        [KTRACE, "agent", "--version"],
        [KUBECTL_KTRACE, "--help"],
        [KUBECTL_KTRACE, "--version"],
        [AGENT, "--help"],
        [AGENT, "--version"],
    ],
)
def test_help_and_version_exit_0(argv: list[str]) -> None:
    r = run(*argv)
    assert r.returncode == 0 and r.stdout and r.stderr == "", r
