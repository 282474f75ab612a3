"""API failures → one line with a hint (pure), and docs/rbac.yaml == the rights ktrace uses."""

from __future__ import annotations

import json
import pathlib

import yaml

from ktrace.kube.errors import ApiCall, KubeApiError, explain
from ktrace.kube.rights import RIGHTS

REPO = pathlib.Path(__file__).resolve().parents[1]


def status(message: str, reason: str, code: int) -> str:
    return json.dumps(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}
    )


def test_forbidden_names_verb_resource_namespace_and_user() -> None:
    body = status(
        'pods is forbidden: User "dev" cannot create resource "pods" in API group "" in the namespace "prod"',
        "Forbidden",
        403,
    )
    error = explain(KubeApiError(ApiCall("create", "pods", "prod"), 403, body), context="ctx")
    assert error.message == "forbidden: cannot create pods in namespace prod as user dev (context ctx)"
    assert error.hint is not None and "docs/rbac.yaml" in error.hint
    assert "\n" not in error.render()


def test_forbidden_ephemeral_and_portforward_hints() -> None:
    eph = explain(KubeApiError(ApiCall("patch", "pods/ephemeralcontainers", "ns", "web-0"), 403, "{}"))
    assert eph.message == "forbidden: cannot patch pods/ephemeralcontainers web-0 in namespace ns"
    assert eph.hint is not None and "without --target" in eph.hint
    # A refused WebSocket upgrade has no Status body: the call alone must say what was refused.
    pf = explain(KubeApiError(ApiCall("get", "pods/portforward", "ns", "a"), 403, "Invalid response status"))
    assert pf.message == "forbidden: cannot get pods/portforward a in namespace ns"
    assert pf.hint is not None and "get and create on pods/portforward" in pf.hint


def test_pod_security_and_webhook_rejections() -> None:
    body = status(
        'pods "x" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false',
        "Forbidden",
        403,
    )
    error = explain(KubeApiError(ApiCall("create", "pods", "ns"), 403, body))
    assert error.message.startswith('Pod Security admission rejected the agent: pods "x" is forbidden: violates')
    webhook = status('admission webhook "validate.kyverno.svc" denied the request: no ephemeral containers', "", 400)
    error = explain(KubeApiError(ApiCall("create", "pods", "ns"), 403, webhook))
    assert error.message.startswith("an admission webhook rejected the agent")


def test_unreachable_unauthorized_missing_invalid() -> None:
    down = explain(
        KubeApiError(ApiCall("create", "pods", "ns"), 0, "Cannot connect to host 10.0.0.1:6443"), context="c"
    )
    assert down.message == "cannot reach the Kubernetes API server (context c): Cannot connect to host 10.0.0.1:6443"
    unauthorized = explain(
        KubeApiError(ApiCall("create", "pods", "ns"), 401, status("Unauthorized", "Unauthorized", 401))
    )
    assert "rejected the credentials" in unauthorized.message
    missing_ns = explain(
        KubeApiError(ApiCall("create", "pods", "nope"), 404, status('namespaces "nope" not found', "NotFound", 404))
    )
    assert missing_ns.message == "namespace nope does not exist"
    invalid = explain(
        KubeApiError(
            ApiCall("create", "pods", "ns"),
            422,
            status('Pod "x" is invalid: spec.nodeSelector: Invalid value', "Invalid", 422),
        )
    )
    assert invalid.message.startswith('the API server rejected create pods in namespace ns: Pod "x" is invalid')
    other = explain(KubeApiError(ApiCall("list", "pods"), 503, "upstream connect error"))
    assert other.message == "API request failed: list pods cluster-wide: HTTP 503: upstream connect error"


def test_rbac_yaml_grants_exactly_the_rights_ktrace_uses() -> None:
    documents = list(yaml.safe_load_all((REPO / "docs" / "rbac.yaml").read_text()))
    roles = [d for d in documents if d["kind"] == "Role"]
    working = roles[0]["metadata"]["namespace"]  # the first Role is for the namespace ktrace works in
    granted = set()
    for role in roles:
        namespace = role["metadata"]["namespace"]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [""]:
                            granted.add((None if namespace == working else namespace, group, resource, verb, name))
    used = {
        (
            r.namespace,
            r.group,
            f"{r.resource}/{r.subresource}" if r.subresource else r.resource,
            r.verb,
            r.resource_name,
        )
        for r in RIGHTS
    }
    assert granted == used
    assert len(RIGHTS) == len(used)
    # Every Role is bound, to the same subjects.
    bindings = [d for d in documents if d["kind"] == "RoleBinding"]
    assert {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings} == {
        (r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles
    }
