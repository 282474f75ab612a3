"""``--target``: which pod the agent joins as an ephemeral container (pure).

``pod/NAME``, ``pod/NAME/container/C``, ``deploy/NAME`` (``deploy/NAME/container/C``), with
kubectl's spellings of the kinds (``po``, ``pods``; ``deployment``, ``deployments``). For a
Deployment, one of its running pods is picked the way ``kubectl exec deploy/NAME`` would:
ready before not ready, then the longest running.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_KINDS = {
    "pod": "pod",
    "pods": "pod",
    "po": "pod",
    "deploy": "deployment",
    "deployment": "deployment",
    "deployments": "deployment",
}
# RFC 1123 subdomain (pod and deployment names) and label (container names).
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class TargetError(ValueError):
    """A ``--target`` that does not parse, or names nothing usable."""


@dataclass(frozen=True)
class Target:
    kind: str  # "pod" | "deployment"
    name: str
    container: str | None = None

    def __str__(self) -> str:
        text = f"{'pod' if self.kind == 'pod' else 'deploy'}/{self.name}"
        return f"{text}/container/{self.container}" if self.container else text


def parse_target(text: str) -> Target:
    usage = "expected pod/NAME, pod/NAME/container/CONTAINER or deploy/NAME"
    parts = text.split("/")
    if len(parts) not in (2, 4) or parts[0] not in _KINDS:
        raise TargetError(f"--target {text!r}: {usage}")
    name = parts[1]
    if len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        raise TargetError(f"--target {text!r}: {name!r} is not a valid {_KINDS[parts[0]]} name")
    container = None
    if len(parts) == 4:
        if parts[2] not in ("container", "containers", "c"):
            raise TargetError(f"--target {text!r}: {usage}")
        container = parts[3]
        if len(container) > 63 or not _LABEL.fullmatch(container):
            raise TargetError(f"--target {text!r}: {container!r} is not a valid container name")
    return Target(_KINDS[parts[0]], name, container)


def label_selector(selector: Mapping[str, Any]) -> str:
    """A LabelSelector object as the query-string syntax (``a=b,c in (d,e),!f,g``)."""
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
        else:
            raise TargetError(f"unsupported label selector operator {op!r}")
    if not terms:
        # An empty selector matches every pod in the namespace: never what a Deployment means.
        raise TargetError("the deployment has an empty selector")
    return ",".join(terms)


def _is_ready(pod: Mapping[str, Any]) -> bool:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def pick_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A running pod not being deleted: ready first, then the oldest (the most settled)."""
    candidates = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running" and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    if not candidates:
        return None
    # RFC 3339 timestamps of one API server sort as strings.
    return min(candidates, key=lambda p: (not _is_ready(p), str(p["metadata"].get("creationTimestamp") or "")))


def check_target_pod(pod: Mapping[str, Any], target: Target) -> None:
    """The pod can take the agent: running, not being deleted, the named container exists."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = meta.get("name", target.name)
    if meta.get("deletionTimestamp"):
        raise TargetError(f"pod {name} is being deleted")
    if status.get("phase") != "Running":
        raise TargetError(f"pod {name} is {status.get('phase', 'not running')}, not Running")
    if target.container is not None:
        names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        if target.container not in names:
            raise TargetError(
                f"pod {name} has no container {target.container!r} (it has: {', '.join(map(str, names))})"
            )
