"""Which of the target's files the agent serves, and its container for that (pure; ktrace/kube/mounts.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ktrace.kube import spec
from ktrace.kube.mounts import FILES_ENV, MountError, Served, plan
from ktrace.kube.spec import AgentOptions, TargetFiles

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def target_pod(**container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web-1", "namespace": "shop"},
        "spec": {
            "securityContext": {"runAsUser": 1000, "runAsNonRoot": True, "fsGroup": 2000},
            "volumes": [
                {"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
                {"name": "config", "configMap": {"name": "web-config"}},
                {"name": "tls", "secret": {"secretName": "web-tls"}},
                {"name": "info", "downwardAPI": {"items": []}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            ],
            "containers": [
                {
                    "name": "app",
                    "volumeMounts": [
                        {"name": "kube-api-access-x", "mountPath": SA, "readOnly": True},
                        {"name": "config", "mountPath": "/etc/web/"},
                        {"name": "tls", "mountPath": "/etc/web/tls"},
                        {"name": "config", "mountPath": "/etc/web.yaml", "subPath": "web.yaml"},
                        {"name": "info", "mountPath": "/etc/info"},
                        {"name": "scratch", "mountPath": "/tmp"},
                        {"name": "data", "mountPath": "/data"},
                        {"name": "config", "mountPath": "/etc/pods/x", "subPathExpr": "$(POD_NAME)/cfg"},
                    ],
                    **container,
                }
            ],
        },
    }


def test_configuration_volumes_are_served_from_the_agents_mounts() -> None:
    files = plan(target_pod(), "app", env={"POD_NAME": "web-1"})
    assert files.served == (
        Served("/etc/info", "/ktrace/v/3"),
        Served("/etc/pods/x", "/ktrace/v/1", "web-1/cfg", follow=True),
        Served("/etc/web", "/ktrace/v/1"),
        Served("/etc/web.yaml", "/ktrace/v/1", "web.yaml", follow=True),
        Served("/etc/web/tls", "/ktrace/v/2"),
        Served(SA, "/ktrace/v/0"),
    )
    # One read-only mount per volume; emptyDir and PVC volumes are not mirrored by default.
    assert files.volume_mounts == (
        {"name": "kube-api-access-x", "mountPath": "/ktrace/v/0", "readOnly": True},
        {"name": "config", "mountPath": "/ktrace/v/1", "readOnly": True},
        {"name": "tls", "mountPath": "/ktrace/v/2", "readOnly": True},
        {"name": "info", "mountPath": "/ktrace/v/3", "readOnly": True},
    )
    assert not files.needs_process_namespace
    assert (files.run_as_user, files.run_as_group) == (1000, None)
    (env,) = files.env()
    assert env["name"] == FILES_ENV
    assert {"path": SA, "base": "/ktrace/v/0", "sub": "", "follow": False} in json.loads(env["value"])


def test_remote_and_local_paths() -> None:
    files = plan(
        target_pod(securityContext={"runAsUser": 1001, "runAsGroup": 1001}),
        "app",
        remote_paths=["/data/reports/", "/etc/ssl/certs", "/etc/web/tls"],
        local_paths=["/etc/web", "/etc/ssl/certs/private"],
    )
    served = {s.path: s for s in files.served}
    where = {m["name"]: m["mountPath"] for m in files.volume_mounts}
    assert "/etc/web" not in served  # kept local by --local-path
    assert served["/etc/web/tls"] == Served("/etc/web/tls", where["tls"], mount=False)  # a --remote-path inside it
    assert served["/data/reports"] == Served("/data/reports", where["data"], "reports", mount=False)  # a PVC
    # Outside every volume: the target's own root, through its process namespace.
    assert served["/etc/ssl/certs"] == Served("/etc/ssl/certs", "/proc/1/root", "etc/ssl/certs", mount=False)
    assert files.needs_process_namespace
    assert (files.run_as_user, files.run_as_group) == (1001, 1001)
    rules = files.path_rules()
    assert rules.root_of(b"/etc/web/config.yaml") is None
    assert rules.root_of(b"/etc/web/tls/tls.key") == b"/etc/web/tls"
    assert rules.root_of(b"/etc/ssl/certs/private/key") is None
    assert rules.root_of(b"/etc/ssl/certs/ca.pem") == b"/etc/ssl/certs"


def test_a_root_target_keeps_the_agents_own_user() -> None:
    pod = target_pod(securityContext={"runAsUser": 0})
    assert plan(pod, "app").run_as_user is None


def test_relative_paths_are_refused() -> None:
    with pytest.raises(MountError):
        plan(target_pod(), "app", remote_paths=["etc/x"])


def test_the_agent_with_files_still_passes_restricted() -> None:
    files = plan(target_pod(), "app", remote_paths=["/etc/ssl"], env={"POD_NAME": "web-1"})
    container = spec.agent_ephemeral_container(
        "ktrace-agent-x",
        20000,
        "0" * 64,
        AgentOptions(),
        None,
        TargetFiles(files.volume_mounts, files.env(), files.run_as_user, files.run_as_group, "app"),
    )
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and "runAsGroup" not in sc
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert container["targetContainerName"] == "app"
    assert all(m["readOnly"] and "subPath" not in m and "subPathExpr" not in m for m in container["volumeMounts"])
    assert [e["name"] for e in container["env"]] == [FILES_ENV]
    # Without files, the agent is as before: its own user and group, no mounts.
    plain = spec.agent_ephemeral_container("ktrace-agent-x", 20000, "0" * 64, AgentOptions(), None)
    assert plain["securityContext"]["runAsUser"] == spec.AGENT_UID and "volumeMounts" not in plain
