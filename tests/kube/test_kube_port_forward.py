"""The tunnel's two port-forward protocols on the real cluster: SPDY/3.1 (the default) and the WebSocket.

SPDY is a ``POST`` (RBAC ``create`` on pods/portforward), the WebSocket a ``GET`` (``get``; ``create``
too from Kubernetes 1.35). With ``--port-forward auto`` (the default) a refused SPDY upgrade
makes the session use the WebSocket; ``spdy`` and ``websocket`` (also ``KTRACE_PORT_FORWARD``) use only
the one named. A service
account's bearer token (rather than the restricted user's client certificate) checks that the
upgrade carries the kubeconfig's credentials.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubecluster import TEST_NS, KubeCluster
from test_kube_agent import HELLO, ktrace, no_agent_pod_left

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]
__all__ = ["no_agent_pod_left"]  # autouse: no agent pod may remain after a test

REPO = pathlib.Path(__file__).resolve().parents[2]
SPDY_LINE = "over SPDY/3.1"
WEBSOCKET_LINE = "over a WebSocket"


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    kube_cluster.build_agent_image()
    return kube_cluster


def rbac_rules(*, may_create_port_forward: bool) -> list[dict[str, Any]]:
    """docs/rbac.yaml's Role, with or without ``create`` on pods/portforward."""
    role = next(doc for doc in yaml.safe_load_all((REPO / "docs" / "rbac.yaml").read_text()) if doc["kind"] == "Role")
    rules: list[dict[str, Any]] = role["rules"]
    for rule in rules:
        if rule["resources"] == ["pods/portforward"] and not may_create_port_forward:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    return rules


@contextlib.contextmanager
def token_kubeconfig(
    cluster: KubeCluster, tmp_path: pathlib.Path, name: str, rules: list[dict[str, Any]]
) -> Iterator[str]:
    """A kubeconfig for a new service account with ``rules`` in the test namespace, by bearer token."""
    meta = {"name": name, "namespace": TEST_NS}
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": TEST_NS}],
        },
    ]
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    cluster.kubectl("apply", "-f", "-", stdin=listed)
    try:
        token = cluster.kubectl("create", "token", name, "-n", TEST_NS, "--duration", "1h").stdout.strip()
        restricted = yaml.safe_load(cluster.ktrace_kubeconfig.read_text())
        context = {"cluster": restricted["clusters"][0]["name"], "user": name, "namespace": TEST_NS}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": restricted["clusters"],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": context}],
            "current-context": name,
        }
        path = tmp_path / f"{name}.kubeconfig"
        path.write_text(json.dumps(config))
        yield str(path)
    finally:
        cluster.kubectl("delete", "-f", "-", "--wait=false", stdin=listed, check=False)


def curl_hello(cluster: KubeCluster, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = ktrace(cluster, "--debug", *args, cmd=["curl", "-sS", "--max-time", "30", HELLO], env=env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)


def test_the_default_is_spdy(cluster: KubeCluster) -> None:
    proc = curl_hello(cluster, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("hello from hello-"), proc.stdout
    assert SPDY_LINE in proc.stderr
    assert WEBSOCKET_LINE not in proc.stderr


def test_the_websocket_when_asked(cluster: KubeCluster) -> None:
    proc = curl_hello(cluster, {}, "--port-forward", "websocket")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("hello from hello-"), proc.stdout
    assert WEBSOCKET_LINE in proc.stderr
    assert SPDY_LINE not in proc.stderr


def test_spdy_with_a_bearer_token(cluster: KubeCluster, tmp_path: pathlib.Path) -> None:
    with token_kubeconfig(cluster, tmp_path, "ktrace-pf-token", rbac_rules(may_create_port_forward=True)) as config:
        proc = curl_hello(cluster, {"KUBECONFIG": config, "KTRACE_PORT_FORWARD": "spdy"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("hello from hello-"), proc.stdout
    assert SPDY_LINE in proc.stderr


def test_without_create_auto_falls_back_and_spdy_alone_says_why(cluster: KubeCluster, tmp_path: pathlib.Path) -> None:
    with token_kubeconfig(cluster, tmp_path, "ktrace-pf-get", rbac_rules(may_create_port_forward=False)) as config:
        auto = curl_hello(cluster, {"KUBECONFIG": config})
        spdy_only = subprocess.run(
            ktrace(cluster, cmd=["true"], env={"KUBECONFIG": config, "KTRACE_PORT_FORWARD": "spdy"}),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert auto.stdout.startswith("hello from hello-"), auto.stdout
    assert "SPDY refused" in auto.stderr
    assert WEBSOCKET_LINE in auto.stderr
    assert spdy_only.returncode == 125, spdy_only.stderr
    assert len(spdy_only.stderr.splitlines()) == 1, spdy_only.stderr
    assert re.search(r"cannot create pods/portforward .*\(hint: .*pods/portforward", spdy_only.stderr), spdy_only.stderr


def test_an_unknown_protocol_is_a_one_line_error(cluster: KubeCluster) -> None:
    proc = subprocess.run(
        ktrace(cluster, cmd=["true"], env={"KTRACE_PORT_FORWARD": "spdy2"}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr.strip() == (
        "ktrace: KTRACE_PORT_FORWARD must be one of auto, spdy, websocket, not 'spdy2' "
        "(hint: see docs/configuration.md)"
    )
