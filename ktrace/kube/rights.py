"""The Kubernetes RBAC rights ktrace uses, each with the reason (pure).

docs/rbac.yaml grants exactly these (a test compares them); ``ktrace doctor`` checks them with
SelfSubjectAccessReviews. ``needed_for`` says which feature needs a right, so a user without
``--target`` can do without the ephemeral-container right.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Right:
    verb: str
    resource: str
    subresource: str = ""
    group: str = ""  # "" is the core API group
    needed_for: str = "run"  # "run", "target", "deploy target", "target env", "cleanup"
    why: str = ""
    since: tuple[int, int] | None = None  # (major, minor): needed only from this Kubernetes version on
    namespace: str | None = None  # None: the namespace ktrace works in
    resource_name: str = ""  # only this object (RBAC resourceNames)

    @property
    def name(self) -> str:
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        text = f"{self.verb} {resource}" + (f".{self.group}" if self.group else "")
        if self.resource_name:
            text += f" {self.resource_name}"
        return text + (f" in namespace {self.namespace}" if self.namespace else "")


RIGHTS: tuple[Right, ...] = (
    Right("create", "pods", why="start the agent pod"),
    Right("get", "pods", why="read the agent pod after a watch broke off; read the --target pod"),
    Right("watch", "pods", why="wait for the agent to start, notice when it stops"),
    Right("delete", "pods", why="delete the agent pod when the program ends"),
    Right("list", "pods", needed_for="deploy target, cleanup", why="find a Deployment's pods; ktrace cleanup"),
    # The tunnel is a SPDY port-forward (a POST: `create`) unless that is refused, then a WebSocket
    # one (a GET: `get`; from Kubernetes 1.35, feature AuthorizePodWebsocketUpgradeCreatePermission,
    # `create` as well). So before 1.35 `get` alone works, with the WebSocket's higher cost on the node.
    Right("get", "pods", "portforward", why="the tunnel to the agent (a WebSocket port-forward)"),
    Right(
        "create",
        "pods",
        "portforward",
        why="the tunnel to the agent (a SPDY port-forward; without it, before Kubernetes 1.35, a WebSocket one)",
        since=(1, 35),
    ),
    Right("patch", "pods", "ephemeralcontainers", needed_for="target", why="--target: add the agent to a pod"),
    Right("get", "deployments", group="apps", needed_for="deploy target", why="--target deploy/NAME"),
    # --target: the target container's environment, read as the kubelet reads it (ktrace/kube/podview.py).
    Right("get", "configmaps", needed_for="target env", why="--target: env and envFrom of the target's ConfigMaps"),
    Right("get", "secrets", needed_for="target env", why="--target: env and envFrom of the target's Secrets"),
    Right("list", "services", needed_for="target env", why="--target: the service-link variables"),
    Right(
        "get",
        "services",
        needed_for="target env",
        why="--target: KUBERNETES_SERVICE_HOST/PORT (the kubernetes Service)",
        namespace="default",
        resource_name="kubernetes",
    ),
)
