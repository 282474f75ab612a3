"""A kubeconfig the Kubernetes client refuses is one line that names the file and the place in it
apart (`ktrace run` as a real process; it fails before any request, so no cluster is needed)."""

from __future__ import annotations

import pathlib
import subprocess

from nscluster import _tool

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: c1
  cluster: {server: "https://127.0.0.1:1"}
contexts:
- name: dev
  context: {cluster: CLUSTER, user: u1}
- name: prod
  context: {cluster: c1, user: u1}
users:
- name: u1
  user: {token: not-a-real-token}
current-context: prod
"""


def _run(kubeconfig: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("ktrace"), "run", "--kubeconfig", str(kubeconfig), *args, "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_unknown_context_lists_the_contexts(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "config"
    config.write_text(KUBECONFIG.replace("CLUSTER", "c1"))
    r = _run(config, "--context", "staging")
    assert r.returncode != 0
    assert r.stderr.splitlines() == [
        f"ktrace: kubeconfig {config}: no context named staging (its contexts: dev, prod) (hint: check --context; "
        "`kubectl config get-contexts` lists them, without --context the current one is used)"
    ]


def test_a_missing_entry_is_named_apart_from_the_file(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "config"
    config.write_text(KUBECONFIG.replace("CLUSTER", "nowhere"))
    r = _run(config, "--context", "dev")
    assert r.returncode != 0
    assert r.stderr.splitlines() == [
        f"ktrace: kubeconfig {config}: Expected object with name nowhere in clusters list "
        "(hint: check --context and the kubeconfig)"
    ]
