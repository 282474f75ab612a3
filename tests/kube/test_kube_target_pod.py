"""``ktrace run --target`` as the target pod: its environment, its files, its service account (issue 17).

An operator-like Deployment: env from a ConfigMap and a Secret (valueFrom and envFrom), the downward API,
a ConfigMap volume, and a service account whose Role may list ConfigMaps in the namespace and nothing else.
The same static client-go binary runs inside the pod (``kubectl exec``) and on the "laptop" under ktrace,
as the restricted user, without a kubeconfig; its output must be the same.

The last three tests (the program as in the pod, kubectl's in-cluster configuration, an edited
ConfigMap read again) need the tracer to redirect the program's opens of the target's paths to
ktrace's copies (``PathMap`` in ``ktrace/remotefs/pathmap.py``); the others check everything up to
that point: the environment, the copies on disk, their updates and their removal.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_helpers import read_line, wait_until
from fixture_programs import Programs
from kubecluster import TEST_NS, KubeCluster
from test_kube_agent import ephemeral_agents, explained, finish, ktrace_bin, popen, send

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

NAME = "ktrace-operator"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PASSWORD = "pw-7f3a9c-never-in-logs"
CONFIG_V1 = "mode: one\nreplicas: 1\n"
CONFIG_V2 = "mode: two\nreplicas: 2\n"
ENV_NAMES = [
    "APP_MODE",  # configMapKeyRef
    "DB_PASSWORD",  # secretKeyRef
    "CFG_LEVEL",  # envFrom a ConfigMap, with a prefix
    "DB_USER",  # envFrom a Secret
    "POD_NAME",  # fieldRef
    "POD_IP",
    "GREETING",  # $(VAR) expansion
    "MEMORY_MI",  # resourceFieldRef
    "HOSTNAME",  # set by the runtime
    "KUBERNETES_SERVICE_HOST",  # the kubernetes Service
    "KUBERNETES_SERVICE_PORT",
    "HELLO_SERVICE_HOST",  # a service link
    "KUBECONFIG",  # the laptop's is not passed on
]


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    kube_cluster.build_agent_image()
    return kube_cluster


@pytest.fixture(scope="module")
def image(cluster: KubeCluster, programs: Programs) -> str:
    binary = pathlib.Path(programs["incluster"])
    tag = binary.parent.name.rpartition("-")[2][:12]  # the build's content key
    return cluster.import_image(f"ktrace.local/incluster:{tag}", {"/incluster": binary}, ["/incluster"])


def objects(image: str) -> list[dict[str, Any]]:
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    meta = {"namespace": TEST_NS}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{NAME}-config", **meta},
            "data": {"APP_MODE": "fast", "LEVEL": "3", "config.yaml": CONFIG_V1},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"{NAME}-secret", **meta},
            "data": {
                "password": base64.b64encode(PASSWORD.encode()).decode(),
                "DB_USER": base64.b64encode(b"operator").decode(),
            },
        },
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": NAME, **meta},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": NAME, **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": TEST_NS}],
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": NAME, **meta},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": NAME}},
                "template": {
                    "metadata": {"labels": {"app": NAME}},
                    "spec": {
                        "serviceAccountName": NAME,
                        "terminationGracePeriodSeconds": 1,
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65534,
                            "runAsGroup": 65534,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "volumes": [{"name": "config", "configMap": {"name": f"{NAME}-config"}}],
                        "containers": [
                            {
                                "name": "operator",
                                "image": image,
                                "imagePullPolicy": "Never",
                                "args": ["-serve"],
                                "securityContext": restricted,
                                # Room for ktrace's agents too: ephemeral containers share the pod's limit.
                                "resources": {"limits": {"memory": "256Mi", "cpu": "500m"}},
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}],
                                "envFrom": [
                                    {"configMapRef": {"name": f"{NAME}-config"}, "prefix": "CFG_"},
                                    {"secretRef": {"name": f"{NAME}-secret"}},
                                ],
                                "env": [
                                    {
                                        "name": "APP_MODE",
                                        "valueFrom": {"configMapKeyRef": {"name": f"{NAME}-config", "key": "APP_MODE"}},
                                    },
                                    {
                                        "name": "DB_PASSWORD",
                                        "valueFrom": {"secretKeyRef": {"name": f"{NAME}-secret", "key": "password"}},
                                    },
                                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                    {"name": "GREETING", "value": "hello $(POD_NAME) in $(APP_MODE) mode"},
                                    {
                                        "name": "MEMORY_MI",
                                        "valueFrom": {
                                            "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}
                                        },
                                    },
                                ],
                            }
                        ],
                    },
                },
            },
        },
    ]


@pytest.fixture(scope="module")
def operator(cluster: KubeCluster, image: str) -> Iterator[dict[str, Any]]:
    """The Deployment's running pod."""
    items = objects(image)
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    try:
        cluster.kubectl("-n", TEST_NS, "rollout", "status", f"deploy/{NAME}", "--timeout=120s", timeout=130)
        pods = json.loads(cluster.kubectl("-n", TEST_NS, "get", "pods", "-l", f"app={NAME}", "-o", "json").stdout)
        running = [
            p
            for p in pods["items"]
            if p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
        ]
        assert len(running) == 1, [p["metadata"]["name"] for p in pods["items"]]
        yield running[0]
    finally:
        for item in reversed(items):
            cluster.kubectl(
                "-n",
                TEST_NS,
                "delete",
                item["kind"].lower(),
                item["metadata"]["name"],
                "--ignore-not-found",
                "--wait=false",
                check=False,
            )


@pytest.fixture(autouse=True)
def config_v1(cluster: KubeCluster, operator: dict[str, Any]) -> None:
    """Every test starts with the first version of the ConfigMap's file."""
    set_config(cluster, CONFIG_V1)


def set_config(cluster: KubeCluster, text: str) -> None:
    patch = json.dumps({"data": {"config.yaml": text}})
    cluster.kubectl("-n", TEST_NS, "patch", "configmap", f"{NAME}-config", "--type", "merge", "-p", patch)


def in_pod(cluster: KubeCluster, *args: str, timeout: float = 60) -> str:
    out = cluster.kubectl("-n", TEST_NS, "exec", f"deploy/{NAME}", "-c", "operator", "--", *args, timeout=timeout)
    return out.stdout


def laptop(cluster: KubeCluster, tmp_path: pathlib.Path, **extra: str) -> list[str]:
    """The laptop's environment for ktrace: its kubeconfig for ktrace itself, a HOME without one, and a private
    runtime directory (where ktrace keeps the target's files)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return cluster.laptop_env(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(runtime), **extra)


# The file interception differs by backend (a rewritten path, or the call made by ktrace).
BACKENDS = ("ptrace", "notify")


def under_ktrace(cluster: KubeCluster, tmp_path: pathlib.Path, cmd: list[str], *args: str) -> list[str]:
    return [
        *laptop(cluster, tmp_path),
        ktrace_bin(),
        "run",
        "--target",
        f"deploy/{NAME}",
        "--agent-pull-policy",
        "Never",
        "--agent-idle-exit",
        "5",
        *args,
        "--",
        *cmd,
    ]


def no_secret_in(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert base64.b64encode(PASSWORD.encode()).decode() not in text


def test_the_program_gets_the_pods_environment(
    cluster: KubeCluster, operator: dict[str, Any], programs: Programs, tmp_path: pathlib.Path
) -> None:
    expected = in_pod(cluster, "/incluster", "-env", ",".join(ENV_NAMES))
    before = {c["name"] for c in ephemeral_agents(cluster, operator)}
    log = tmp_path / "events.json"
    proc = subprocess.run(
        under_ktrace(
            cluster, tmp_path, [programs["incluster"], "-env", ",".join(ENV_NAMES)], "--log-json", str(log), "--debug"
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected
    assert f'env DB_PASSWORD="{PASSWORD}"' in expected
    assert f'env HOSTNAME="{operator["metadata"]["name"]}"' in expected
    assert 'env MEMORY_MI="256"' in expected and "env KUBECONFIG unset" in expected
    no_secret_in(proc.stderr, log.read_text())
    # The agent runs as the target's user, non-root, in a pod that stays Pod Security "restricted".
    (agent,) = [c for c in ephemeral_agents(cluster, operator) if c["name"] not in before]
    assert agent["securityContext"]["runAsUser"] == 65534 and agent["securityContext"]["runAsNonRoot"] is True
    assert {m["mountPath"] for m in agent["volumeMounts"]} == {"/ktrace/v/0", "/ktrace/v/1"}
    assert all(m["readOnly"] for m in agent["volumeMounts"])


def test_env_flags(cluster: KubeCluster, operator: dict[str, Any], programs: Programs, tmp_path: pathlib.Path) -> None:
    names = "APP_MODE,DB_PASSWORD,HOSTNAME,KUBECONFIG"
    proc = subprocess.run(
        under_ktrace(
            cluster, tmp_path, [programs["incluster"], "-env", names], "--env-exclude", "DB_*", "--env-exclude", "HOST*"
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:3] == ['env APP_MODE="fast"', "env DB_PASSWORD unset", "env HOSTNAME unset"]
    proc = subprocess.run(
        under_ktrace(cluster, tmp_path, [programs["incluster"], "-env", names], "--no-env"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["env APP_MODE unset", "env DB_PASSWORD unset"]
    assert proc.stdout.splitlines()[3].startswith('env KUBECONFIG="')  # --no-env: the local environment as it is


def test_ktrace_env_prints_what_the_program_gets(cluster: KubeCluster, operator: dict[str, Any]) -> None:
    base = [*cluster.laptop_env(), ktrace_bin(), "env", "--target", f"deploy/{NAME}"]
    as_json = subprocess.run([*base, "--format", "json"], capture_output=True, text=True, timeout=60, check=False)
    assert as_json.returncode == 0, as_json.stderr
    values = json.loads(as_json.stdout)
    assert values["DB_PASSWORD"] == PASSWORD and values["CFG_LEVEL"] == "3" and values["DB_USER"] == "operator"
    assert values["GREETING"] == f"hello {operator['metadata']['name']} in fast mode"
    assert values["KUBERNETES_SERVICE_PORT"] == "443" and "PATH" not in values and "HOME" not in values
    dotenv = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
    assert dotenv.returncode == 0, dotenv.stderr
    assert f"DB_PASSWORD={PASSWORD}\n" in dotenv.stdout
    assert "# not passed on from this machine: KUBECONFIG\n" in dotenv.stdout
    no_secret_in(as_json.stderr, dotenv.stderr)


def mirror_dirs(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    base = tmp_path / "runtime" / "ktrace"
    return sorted(base.glob("files-*")) if base.exists() else []


def mirrored(directory: pathlib.Path, name: str) -> str | None:
    """The content of the first copy named ``name``, read as a program reads it, if any.

    The copy is a kubelet-style volume: ``name -> ..data/name``, ``..data -> ..<timestamp>``. A new
    version (an edited ConfigMap, a rotated token) is a new timestamped directory, an atomic swap of
    ``..data`` and the removal of the old directory, so only the visible names are walked (the old
    directory may vanish mid-walk) and a read that lands in a directory just removed is read again.
    """
    deadline = time.monotonic() + 30
    while True:
        try:
            return _read_visible(directory, name)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise


def _read_visible(directory: pathlib.Path, name: str) -> str | None:
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".."))
        if name in files:
            return pathlib.Path(root, name).read_text()
    return None


def test_the_targets_files_are_copied_kept_current_and_removed(
    cluster: KubeCluster, operator: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    token = in_pod(cluster, "/incluster", "-file", f"{SA_DIR}/token").split(": ", 1)[1]
    proc = popen(under_ktrace(cluster, tmp_path, ["sh", "-c", "echo up; read _"]))
    with explained(proc):
        assert read_line(proc, 90) == "up"
        (directory,) = mirror_dirs(tmp_path)
        assert (directory.stat().st_mode & 0o777) == 0o700
        assert json.dumps(mirrored(directory, "token")) == token.strip()
        assert mirrored(directory, "config.yaml") == CONFIG_V1
        # The volume's own structure: token -> ..data/token -> ..<timestamp>/token.
        account = next(root for root in directory.iterdir() if (root / "token").exists())
        assert os.readlink(account / "token") == "..data/token"
        set_config(cluster, CONFIG_V2)
        # The kubelet rewrites the volume at its next sync (syncFrequency 10 s here), then the agent's poll.
        wait_until(lambda: mirrored(directory, "config.yaml") == CONFIG_V2, 120, "the edited ConfigMap's copy")
        code, _out, err = finish(proc)
    assert code == 0, err
    assert not directory.exists()
    no_secret_in(err)


def test_the_copied_token_is_the_service_accounts_through_the_tunnel(
    cluster: KubeCluster, operator: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    """What rest.InClusterConfig() uses, taken by hand from ktrace's copies: KUBERNETES_SERVICE_HOST/PORT from
    the environment, the token and CA of the pod's service account; the API server (its Service address,
    reached through the agent) takes them as that account: ConfigMaps allowed, Secrets forbidden."""
    script = (
        'for root in "$XDG_RUNTIME_DIR"/ktrace/files-*/*; do [ -e "$root/token" ] && sa=$root; done; '
        "api=https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT; "
        "for what in configmaps secrets; do "
        'curl -sS -o /dev/null -w "$what %{http_code}\\n" --cacert "$sa/ca.crt" '
        '-H "Authorization: Bearer $(cat "$sa/token")" "$api/api/v1/namespaces/$(cat "$sa/namespace")/$what"; '
        "done"
    )
    proc = subprocess.run(
        under_ktrace(cluster, tmp_path, ["sh", "-c", script]), capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "configmaps 200\nsecrets 403\n", proc.stderr


def test_a_remote_path_outside_the_volumes(
    cluster: KubeCluster, operator: dict[str, Any], programs: Programs, tmp_path: pathlib.Path
) -> None:
    """--remote-path of the target's own filesystem (its binary, in its image): read by the agent through the
    target container's process namespace, as the target's user."""
    before = {c["name"] for c in ephemeral_agents(cluster, operator)}
    proc = popen(under_ktrace(cluster, tmp_path, ["sh", "-c", "echo up; read _"], "--remote-path", "/incluster"))
    with explained(proc):
        assert read_line(proc, 90) == "up"
        (directory,) = mirror_dirs(tmp_path)
        copies = [p for p in directory.iterdir() if p.is_file()]
        assert [p.read_bytes() == pathlib.Path(programs["incluster"]).read_bytes() for p in copies] == [True]
        (agent,) = [c for c in ephemeral_agents(cluster, operator) if c["name"] not in before]
        assert agent["targetContainerName"] == "operator"
        code, _out, err = finish(proc)
    assert code == 0, err


def test_after_kill_9_ktrace_cleanup_removes_the_copies(
    cluster: KubeCluster, operator: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    proc = popen(under_ktrace(cluster, tmp_path, ["sh", "-c", "echo up; read _"]))
    with explained(proc):
        assert read_line(proc, 90) == "up"
        (directory,) = mirror_dirs(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert directory.exists()
    cleanup = subprocess.run(
        [*laptop(cluster, tmp_path), ktrace_bin(), "cleanup"], capture_output=True, text=True, timeout=60, check=False
    )
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"removed the target files of a ktrace run that was killed: {directory}" in cleanup.stdout
    assert not directory.exists()


def test_sigterm_removes_the_copies(cluster: KubeCluster, operator: dict[str, Any], tmp_path: pathlib.Path) -> None:
    proc = popen(under_ktrace(cluster, tmp_path, ["sh", "-c", "echo up; exec sleep 600"]))
    with explained(proc):
        assert read_line(proc, 90) == "up"
        (directory,) = mirror_dirs(tmp_path)
        proc.send_signal(signal.SIGTERM)
        code, _out, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert not directory.exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_operator_runs_as_in_the_pod(
    cluster: KubeCluster, operator: dict[str, Any], programs: Programs, tmp_path: pathlib.Path, backend: str
) -> None:
    args = ["-env", ",".join(ENV_NAMES), "-file", "/etc/app/config.yaml", "-api"]
    expected = in_pod(cluster, "/incluster", *args)
    listed = next(line for line in expected.splitlines() if line.startswith("configmaps: ")).split()[1:]
    assert "kube-root-ca.crt" in listed and f"{NAME}-config" in listed, expected
    assert f'secrets: error secrets is forbidden: User "system:serviceaccount:{TEST_NS}:{NAME}"' in expected
    proc = subprocess.run(
        under_ktrace(cluster, tmp_path, [programs["incluster"], *args], "--backend", backend),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected
    no_secret_in(proc.stderr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kubectl_uses_the_in_cluster_config(
    cluster: KubeCluster, operator: dict[str, Any], tmp_path: pathlib.Path, backend: str
) -> None:
    kubectl = str(cluster.bindir / "kubectl")
    script = f"{kubectl} get configmaps -o name; echo rc=$?; {kubectl} get secrets 2>&1; echo rc=$?"
    proc = subprocess.run(
        under_ktrace(cluster, tmp_path, ["sh", "-c", script], "--backend", backend),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "configmap/kube-root-ca.crt" in lines and f"configmap/{NAME}-config" in lines
    assert "rc=0" in lines
    assert f'User "system:serviceaccount:{TEST_NS}:{NAME}" cannot list resource "secrets"' in proc.stdout
    assert lines[-1] == "rc=1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edited_configmap_is_seen_at_the_next_read(
    cluster: KubeCluster, operator: dict[str, Any], programs: Programs, tmp_path: pathlib.Path, backend: str
) -> None:
    argv = [programs["incluster"], "-read", "/etc/app/config.yaml"]
    proc = popen(under_ktrace(cluster, tmp_path, argv, "--backend", backend))
    with explained(proc):
        send(proc, "read")
        assert read_line(proc, 90) == f"content {json.dumps(CONFIG_V1)}"
        set_config(cluster, CONFIG_V2)

        def changed() -> bool:
            send(proc, "read")
            return read_line(proc, 30) == f"content {json.dumps(CONFIG_V2)}"

        wait_until(changed, 120, "the program to read the edited ConfigMap")
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0
