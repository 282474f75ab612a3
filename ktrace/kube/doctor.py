"""Checks of the Kubernetes side for ``ktrace doctor``: the context, the API server, and every RBAC
right ktrace uses (SelfSubjectAccessReview, so nothing is created). One ``KubeCheck`` per check.

``check_kube(ClusterChoice())`` is synchronous and never raises for a cluster problem: each
problem is a failed check whose message says what is wrong, and its ``fix`` (where there is one)
what to do. ``checks(settings)`` is what ``ktrace doctor`` calls (``PLUGIN_CHECKS``): the same,
as its ``CheckResult`` lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ktrace import config
from ktrace.errors import KtraceError

from .errors import ApiCall, KubeApiError, explain
from .options import ClusterChoice, cluster_choice
from .rights import RIGHTS, Right

if TYPE_CHECKING:
    from ktrace.doctor import CheckResult

    from .api import KubeApi

RBAC_FIX = "kubectl apply -n {ns} -f docs/rbac.yaml (as a namespace admin; bind the Role to your user)"


@dataclass(frozen=True)
class KubeCheck:
    name: str
    ok: bool
    message: str
    required: bool = True  # False: only some features need it (e.g. --target); report a failure as a warning
    fix: str | None = None  # what to do about a failure

    def result(self) -> CheckResult:
        """As a ``ktrace doctor`` line."""
        from ktrace.doctor import CheckResult, Status

        status = Status.OK if self.ok else Status.FAIL if self.required else Status.WARN
        return CheckResult(self.name, status, self.message, self.fix)


def checks(settings: config.Settings) -> Iterable[CheckResult]:
    """``ktrace doctor``'s Kubernetes lines: FAIL for what ``ktrace run`` needs, warn for what only some
    features need (--target, cleanup), skip when the agent is not in a cluster."""
    from ktrace.doctor import CheckResult, Status

    agent = settings.get("agent") or "kube"
    if agent != "kube":
        return [CheckResult("kube", Status.SKIP, f"the agent is {agent}, not in a cluster")]
    return [check.result() for check in check_kube(cluster_choice(settings))]


def check_kube(cluster: ClusterChoice) -> list[KubeCheck]:
    return asyncio.run(check_kube_async(cluster))


async def check_kube_async(cluster: ClusterChoice) -> list[KubeCheck]:
    from .api import KubeApi

    try:
        api = await KubeApi.load(cluster.kubeconfig, cluster.context, cluster.namespace)
    except KtraceError as exc:
        return [KubeCheck("kube context", False, _line(exc))]
    try:
        checks = [
            KubeCheck(
                "kube context",
                True,
                f"context {api.context or '(none)'}, user {api.user or '(none)'}, namespace {api.namespace}, "
                f"server {api.server}",
            )
        ]
        try:
            version = await api.request(ApiCall("get", "version"), "GET", "/version", timeout=10.0)
        except KubeApiError as exc:
            checks.append(KubeCheck("kube API server", False, _line(explain(exc, context=api.context))))
            return checks
        checks.append(KubeCheck("kube API server", True, f"reachable, Kubernetes {version.get('gitVersion', '?')}"))
        server = server_version(version)
        checks += await asyncio.gather(*(_check_right(api, right, server) for right in RIGHTS))
        return checks
    finally:
        await api.close()


def _line(error: KtraceError) -> str:
    return error.render().removeprefix("ktrace: ")


def server_version(version: dict[str, object]) -> tuple[int, int] | None:
    """(major, minor) from the /version answer ("1", "34+" on some providers)."""
    try:
        return int(str(version.get("major"))), int(str(version.get("minor")).rstrip("+"))
    except ValueError:
        return None


async def _check_right(api: KubeApi, right: Right, server: tuple[int, int] | None) -> KubeCheck:
    ns = right.namespace or api.namespace
    attributes = {"namespace": ns, "verb": right.verb, "group": right.group, "resource": right.resource}
    if right.subresource:
        attributes["subresource"] = right.subresource
    if right.resource_name:
        attributes["name"] = right.resource_name
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    required = right.needed_for == "run"
    name = f"kube right: {right.name}" + ("" if required else f" (for {right.needed_for})")
    if right.since is not None and server is not None and server < right.since:
        required = False
        name += f" (for Kubernetes >= {right.since[0]}.{right.since[1]})"
    try:
        review = await api.request(
            ApiCall("create", "selfsubjectaccessreviews.authorization.k8s.io"),
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            body=body,
            timeout=10.0,
        )
    except KubeApiError as exc:
        return KubeCheck(name, False, _line(explain(exc, context=api.context)), required)
    return review_check(name, right, ns, required, review.get("status") or {})


def review_check(name: str, right: Right, ns: str, required: bool, status: dict[str, object]) -> KubeCheck:
    """The check of ``right`` from a SelfSubjectAccessReview's ``status``."""
    if status.get("allowed"):
        return KubeCheck(name, True, f"allowed in namespace {ns}: {right.why}", required)
    reason = status.get("reason") or status.get("evaluationError") or ""
    return KubeCheck(
        name,
        False,
        f"not allowed in namespace {ns}" + (f" ({reason})" if reason else "") + f"; needed to {right.why}.",
        required,
        RBAC_FIX.format(ns=ns),
    )
