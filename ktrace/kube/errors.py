"""Kubernetes API failures as one line with a hint (pure).

Every request ktrace makes is described by an ``ApiCall`` (verb, resource, namespace, name), so
an RBAC denial can say exactly which right is missing, whatever the API server's wording.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ktrace.errors import KtraceError

RBAC_DOC = "docs/rbac.yaml"


@dataclass(frozen=True)
class ApiCall:
    verb: str  # RBAC verb: get, list, watch, create, patch, delete
    resource: str  # "pods", "pods/portforward", "deployments.apps", ...
    namespace: str | None = None
    name: str | None = None

    def what(self) -> str:
        target = f"{self.resource} {self.name}" if self.name else self.resource
        where = f" in namespace {self.namespace}" if self.namespace else " cluster-wide"
        return f"{self.verb} {target}{where}"


class KubeApiError(Exception):
    """A failed API request: the HTTP status (0 when the server was not reached) and the body."""

    def __init__(self, call: ApiCall, status: int, body: str, reason: str = "") -> None:
        super().__init__(f"{call.what()}: HTTP {status} {reason}: {body[:200]}")
        self.call = call
        self.status = status
        self.body = body
        self.reason = reason

    @property
    def message(self) -> str:
        """The API server's own message (from its Status object), or the raw body."""
        return status_message(self.body) or self.reason or f"HTTP {self.status}"


def status_message(body: str) -> str:
    try:
        decoded = json.loads(body)
    except (ValueError, TypeError):
        return body.strip()[:300]
    if isinstance(decoded, dict):
        return str(decoded.get("message") or "")
    return ""


def kubeconfig_error(message: str, files: str, context: str | None, contexts: list[str] | None) -> KtraceError:
    """A kubeconfig the Kubernetes client refused, as one line. ``files``: the ':'-joined paths
    it read; ``contexts``: the contexts it has, when they could be listed.

    The client names places in the file as the path and the keys joined with '/'
    ("Expected object with name prod in /home/me/.kube/config/contexts list"), which reads as
    a path that does not exist: the file and the place in it are said apart here.
    """
    if context is not None and contexts is not None and context not in contexts:
        listed = ", ".join(contexts) if contexts else "none"
        return KtraceError(
            f"kubeconfig {files}: no context named {context} (its contexts: {listed})",
            "check --context; `kubectl config get-contexts` lists them, without --context the current one is used",
        )
    text = message.removeprefix("Invalid kube-config file. ")
    for path in sorted({files, *files.split(":")}, key=len, reverse=True):
        text = text.replace(f"{path}/", "")
    return KtraceError(f"kubeconfig {files}: {text}", "check --context and the kubeconfig")


_USER = re.compile(r'User "([^"]*)"')


def explain(error: KubeApiError, *, context: str = "") -> KtraceError:
    call = error.call
    message = error.message
    in_context = f" (context {context})" if context else ""
    if error.status == 0:
        return KtraceError(
            f"cannot reach the Kubernetes API server{in_context}: {message}",
            "check --context / KUBECONFIG, and that the cluster is reachable from here (VPN?)",
        )
    if error.status == 401:
        return KtraceError(
            f"the API server rejected the credentials of the current context{in_context}: {message}",
            "log in again or refresh the kubeconfig's credentials (kubectl get pods shows the same)",
        )
    if error.status == 403:
        if "violates PodSecurity" in message:
            return KtraceError(
                f"Pod Security admission rejected the agent{in_context}: {message}",
                "the agent meets the 'restricted' level; a namespace label or admission config is stricter "
                "than Kubernetes' levels: ask the cluster admins",
            )
        if "admission webhook" in message:
            return KtraceError(
                f"an admission webhook rejected the agent{in_context}: {message}",
                "a policy engine (Kyverno, Gatekeeper, ...) forbids it: ask for an exception, or use --agent-* "
                "options to meet the policy",
            )
        user = _USER.search(message)
        who = f" as user {user.group(1)}" if user else ""
        hint = f"ask for the Role in {RBAC_DOC} in this namespace"
        if call.resource == "pods/ephemeralcontainers":
            hint = (
                f"--target needs patch on pods/ephemeralcontainers ({RBAC_DOC}); without --target ktrace starts a pod"
            )
        elif call.resource == "pods/portforward":
            hint = f"the tunnel needs get and create on pods/portforward ({RBAC_DOC})"
        return KtraceError(f"forbidden: cannot {call.what()}{who}{in_context}", hint)
    if error.status == 404:
        if call.resource == "pods/ephemeralcontainers":
            return KtraceError(
                f"cannot add an ephemeral container to pod {call.name}: {message}",
                "the cluster does not serve ephemeral containers (Kubernetes >= 1.25 does); run without --target",
            )
        if "namespaces" in message and "not found" in message:
            return KtraceError(f"namespace {call.namespace} does not exist{in_context}", "check -n/--namespace")
        return KtraceError(f"not found: {message}", "check the name and -n/--namespace")
    if error.status == 422:
        return KtraceError(f"the API server rejected {call.what()}: {message}", "check the --agent-* options")
    if error.status == 409:
        return KtraceError(f"conflict: {message}", "run ktrace again")
    return KtraceError(
        f"API request failed: {call.what()}: HTTP {error.status}: {message}",
        "rerun with --debug; the API server may be overloaded or restarting",
    )
