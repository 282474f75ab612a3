"""What ``--target`` gives the program besides the network: the target pod resolved once, its
container's environment (``podenv``, from the objects read here) and the plan of its files
(``mounts``). ``ktrace run`` does this before it forks the program (the environment is the
program's from its first instruction); ``ktrace env`` prints the result.

Reading the environment needs ``get`` on the ConfigMaps and Secrets the container names and
``list`` on Services (service links); ``get`` on ``services/kubernetes`` in ``default`` gives
``KUBERNETES_SERVICE_HOST``/``PORT``. A refused read of a Service or the node is a warning (the
variables it would give are left out); a refused ConfigMap or Secret is an error, as the
kubelet would not start the container without it either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ktrace.errors import KtraceError

from . import podenv
from .api import KubeApi
from .errors import ApiCall, KubeApiError, explain
from .mounts import FilePlan, MountError, plan
from .target import Target, TargetError, check_target_pod, label_selector, pick_pod

if TYPE_CHECKING:
    from .options import KubeOptions

log = logging.getLogger("ktrace.kube")


async def resolve_target(api: KubeApi, target: Target) -> dict[str, Any]:
    """The running pod ``target`` names (for a Deployment, the one ``kubectl exec`` would pick)."""
    ns = api.namespace
    try:
        if target.kind == "pod":
            pod = await api.request(
                ApiCall("get", "pods", ns, target.name), "GET", f"/api/v1/namespaces/{ns}/pods/{target.name}"
            )
        else:
            deployment = await api.request(
                ApiCall("get", "deployments.apps", ns, target.name),
                "GET",
                f"/apis/apps/v1/namespaces/{ns}/deployments/{target.name}",
            )
            selector = label_selector((deployment.get("spec") or {}).get("selector") or {})
            listing = await api.request(
                ApiCall("list", "pods", ns), "GET", f"/api/v1/namespaces/{ns}/pods", query=[("labelSelector", selector)]
            )
            chosen = pick_pod(listing.get("items") or [])
            if chosen is None:
                raise KtraceError(
                    f"deployment {target.name} in namespace {ns} has no running pod",
                    "wait for its rollout, or target a pod",
                )
            pod = dict(chosen)
        check_target_pod(pod, target)
    except TargetError as exc:
        raise KtraceError(f"--target {target}: {exc}", "target a running pod") from None
    except KubeApiError as exc:
        if exc.status == 404:
            raise KtraceError(
                f"{target.kind} {target.name} not found in namespace {ns}", "check --target and -n/--namespace"
            ) from None
        raise
    return pod


@dataclass(frozen=True)
class TargetView:
    pod: dict[str, Any]
    container: str  # the target container: --target's /container/C, else kubectl's default
    env: podenv.PodEnv | None  # None: not asked for (--no-env)
    files: FilePlan | None  # None: not asked for
    warnings: tuple[str, ...] = ()

    @property
    def pod_target(self) -> Target:
        """The resolved pod as a ``--target`` (a Deployment's pick stays the same for the whole run)."""
        return Target("pod", str(self.pod["metadata"]["name"]), self.container)


async def _optional(read: Callable[[], Any], what: str, warnings: list[str], context: str) -> Any:
    try:
        return await read()
    except KubeApiError as exc:
        if exc.status in (401, 403):
            warnings.append(f"{explain(exc, context=context).message}: {what}")
            return None
        raise


async def read_env(api: KubeApi, pod: dict[str, Any], container: str, warnings: list[str]) -> podenv.PodEnv:
    spec = podenv.find_container(pod, container)
    ns = str(pod["metadata"].get("namespace") or api.namespace)
    config_names, secret_names = podenv.referenced(spec)
    config_maps = await asyncio.gather(*(api.read("configmaps", name, ns) for name in sorted(config_names)))
    secrets = await asyncio.gather(*(api.read("secrets", name, ns) for name in sorted(secret_names)))
    services: list[dict[str, Any]] = []
    if (pod.get("spec") or {}).get("enableServiceLinks") is not False:
        listed = await _optional(
            lambda: api.list("services", ns), "the service-link variables are left out", warnings, api.context
        )
        services += listed or []
    if ns != podenv.MASTER_NAMESPACE:
        master = await _optional(
            lambda: api.read("services", "kubernetes", podenv.MASTER_NAMESPACE),
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are left out",
            warnings,
            api.context,
        )
        if master is not None:
            services.append(master)
    allocatable = None
    node = (pod.get("spec") or {}).get("nodeName")
    if podenv.needs_node(spec) and node:
        found = await _optional(lambda: api.read("nodes", str(node), None), "", [], api.context)
        allocatable = ((found or {}).get("status") or {}).get("allocatable") if found else None
    objects = podenv.Objects(
        config_maps={n: o for n, o in zip(sorted(config_names), config_maps, strict=True) if o is not None},
        secrets={n: o for n, o in zip(sorted(secret_names), secrets, strict=True) if o is not None},
        services=services,
        node_allocatable=allocatable,
    )
    try:
        return podenv.container_env(pod, container, objects)
    except podenv.EnvError as exc:
        raise KtraceError(
            f"the environment of container {container} of pod {ns}/{pod['metadata']['name']}: {exc}",
            "the kubelet could not make it either; check the pod's env and envFrom",
        ) from None


async def view_target(
    api: KubeApi,
    target: Target,
    *,
    env: bool = True,
    files: bool = True,
    remote_paths: Sequence[str] = (),
    local_paths: Sequence[str] = (),
) -> TargetView:
    pod = await resolve_target(api, target)
    try:
        container = target.container or podenv.default_container(pod)
    except podenv.EnvError as exc:
        raise KtraceError(f"--target {target}: {exc}") from None
    warnings: list[str] = []
    pod_env = await read_env(api, pod, container, warnings) if env else None
    file_plan = None
    if files:
        try:
            file_plan = plan(pod, container, remote_paths, local_paths, pod_env.values if pod_env else None)
        except MountError as exc:
            raise KtraceError(str(exc)) from None
    if pod_env is not None:
        warnings += pod_env.notes
    for line in warnings:
        log.debug("target view: %s", line)
    return TargetView(pod, container, pod_env, file_plan, tuple(warnings))


def read_target(options: KubeOptions, *, files: bool = True) -> TargetView:
    """The ``--target`` pod's view, read synchronously (``ktrace run`` before it forks the program:
    the event loop and its executor threads are gone again when this returns)."""
    assert options.target is not None
    return asyncio.run(_read_target(options, files))


async def _read_target(options: KubeOptions, files: bool) -> TargetView:
    assert options.target is not None
    api = await KubeApi.load(options.cluster.kubeconfig, options.cluster.context, options.cluster.namespace)
    try:
        return await view_target(
            api,
            options.target,
            env=options.env.use_pod,
            files=files,
            remote_paths=options.remote_paths,
            local_paths=options.local_paths,
        )
    except KubeApiError as exc:
        raise explain(exc, context=api.context) from None
    finally:
        await api.close()
