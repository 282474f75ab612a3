"""The agent's pod and ephemeral-container specs (pure): Pod Security "restricted", no token, options."""

from __future__ import annotations

import hashlib
import json

import pytest

from ktrace import __version__
from ktrace.kube import spec
from ktrace.kube.spec import AgentOptions, SpecError

TOKEN = "s3cret-session-token"
HASH = spec.token_sha256(TOKEN)


def restricted_violations(pod_spec: dict[str, object], container: dict[str, object]) -> list[str]:
    """Pod Security "restricted" (v1.34) checks that a spec of ours could touch, written out from the standard."""
    found = []
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    assert isinstance(pod_sc, dict) and isinstance(sc, dict)
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append("allowPrivilegeEscalation != false")
    if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
        found.append("capabilities")
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        found.append("runAsNonRoot")
    if sc.get("runAsUser") == 0 or pod_sc.get("runAsUser") == 0:
        found.append("runAsUser=0")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        found.append("seccompProfile")
    if sc.get("privileged") or pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("volumes"):
        found.append("privileged/host/volumes")
    return found


def test_pod_is_restricted_and_minimal() -> None:
    pod = spec.agent_pod("ktrace-agent-abcd", "ns1", "abcd", 31000, HASH, AgentOptions(image="img:1"))
    pod_spec = pod["spec"]
    (container,) = pod_spec["containers"]
    assert restricted_violations(pod_spec, container) == []
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["restartPolicy"] == "Never"
    assert container["resources"]["limits"] and container["resources"]["requests"]
    assert container["args"] == ["--listen", "127.0.0.1:31000", "--token-sha256", HASH, "--idle-exit", "60"]
    assert "imagePullPolicy" not in container  # Kubernetes' default unless asked
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "ktrace-agent",
        "app.kubernetes.io/managed-by": "ktrace",
        "app.kubernetes.io/instance": "ktrace-abcd",
        "app.kubernetes.io/version": __version__,
    }


def test_token_never_in_spec() -> None:
    options = AgentOptions(labels={"team": "a"}, annotations={"note": "x"})
    pod = spec.agent_pod("p", "ns", "s", 30000, HASH, options)
    eph = spec.agent_ephemeral_container("c", 30000, HASH, options, "app")
    for text in (json.dumps(pod), json.dumps(eph)):
        assert TOKEN not in text
        assert HASH in text
    assert hashlib.sha256(TOKEN.encode()).hexdigest() == HASH


def test_options_reach_the_pod() -> None:
    options = AgentOptions(
        image="registry.example/ktrace/agent:9",
        pull_policy="Always",
        pull_secrets=("regcred", "other"),
        node_selector={"kubernetes.io/os": "linux"},
        tolerations=(spec.parse_toleration("dedicated=dev:NoSchedule"),),
        labels={"team": "payments", "app.kubernetes.io/managed-by": "someone-else"},
        annotations={"owner": "me@example.com"},
        idle_exit=12.5,
    )
    pod = spec.agent_pod("p", "ns", "s1", 30000, HASH, options)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "registry.example/ktrace/agent:9"
    assert container["imagePullPolicy"] == "Always"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "dev", "effect": "NoSchedule"}
    ]
    assert pod["metadata"]["labels"]["team"] == "payments"
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ktrace"  # cleanup depends on it
    assert pod["metadata"]["annotations"] == {"owner": "me@example.com"}
    # The user's --connect-timeout is sent with each connection, not given to the agent.
    assert container["args"] == ["--listen", "127.0.0.1:30000", "--token-sha256", HASH, "--idle-exit", "12.5"]


def test_ephemeral_container() -> None:
    eph = spec.agent_ephemeral_container("ktrace-agent-s1", 40000, HASH, AgentOptions(pull_policy="Never"), "web")
    assert eph["name"] == "ktrace-agent-s1"
    assert eph["targetContainerName"] == "web"
    assert eph["imagePullPolicy"] == "Never"
    assert "resources" not in eph  # the API rejects resources on ephemeral containers
    assert restricted_violations({}, eph) == []
    assert spec.ephemeral_patch(eph) == {"spec": {"ephemeralContainers": [eph]}}
    assert "targetContainerName" not in spec.agent_ephemeral_container("c", 40000, HASH, AgentOptions(), None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", {"operator": "Exists"}),
        ("gpu", {"key": "gpu", "operator": "Exists"}),
        ("gpu:NoExecute", {"key": "gpu", "operator": "Exists", "effect": "NoExecute"}),
        ("node.example.com/pool=dev", {"key": "node.example.com/pool", "operator": "Equal", "value": "dev"}),
    ],
)
def test_parse_toleration(text: str, expected: dict[str, str]) -> None:
    assert spec.parse_toleration(text) == expected


@pytest.mark.parametrize("text", ["", "=x", "a:Sometimes", "a=b c", "-bad", "a/b/c=1"])
def test_parse_toleration_rejects(text: str) -> None:
    with pytest.raises(SpecError, match="--agent-toleration"):
        spec.parse_toleration(text)


def test_parse_key_value() -> None:
    assert spec.parse_key_value("a.b/c=d", "--agent-label") == ("a.b/c", "d")
    assert spec.parse_key_value("k=", "--agent-label") == ("k", "")
    assert spec.parse_key_value("note=any text: ok", "--agent-annotation", label_value=False) == (
        "note",
        "any text: ok",
    )
    for bad in ("novalue", "k=has space", "=v", "k=" + "x" * 64):
        with pytest.raises(SpecError, match="--agent-label"):
            spec.parse_key_value(bad, "--agent-label")


def test_bad_options() -> None:
    with pytest.raises(SpecError, match="--agent-pull-policy"):
        AgentOptions(pull_policy="Sometimes")
    with pytest.raises(SpecError, match="--agent-image"):
        AgentOptions(image="two words")
    with pytest.raises(SpecError, match="--agent-idle-exit"):
        AgentOptions(idle_exit=0)
    assert AgentOptions(pull_secrets=("x",), labels={"a": "b"}).pod_only_options() == [
        "--agent-pull-secret",
        "--agent-label",
    ]


def test_ports_and_sessions_are_random_and_valid() -> None:
    ports = {spec.pick_port() for _ in range(200)}
    assert len(ports) > 150
    assert all(spec.PORT_RANGE[0] <= p <= spec.PORT_RANGE[1] for p in ports)
    session = spec.new_session_id()
    assert len(session) == 8 and session == session.lower() and session != spec.new_session_id()
