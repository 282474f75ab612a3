"""``ktrace cleanup``: delete the agent pods ktrace left behind.

``ktrace run`` deletes its pod on every exit it lives through; after a ``kill -9`` the agent exits
by itself once idle (``--agent-idle-exit``) and its pod stays, finished, until this command.
Pods whose agent still runs are kept unless ``--include-running``: they may serve a live session
(of this user or another one sharing the namespace). Pods stuck before the agent ran (image pull
failures, unschedulable) never end by themselves and are deleted.

First, on this machine, the private directories of target files (``--target``) that a killed
ktrace left (``ktrace.remotefs.mirror.remove_leftovers``): they hold copies of Secrets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from . import spec
from .api import KubeApi
from .errors import ApiCall, KubeApiError, explain
from .options import ClusterChoice
from .status import agent_state


def agent_runs(pod: Mapping[str, Any]) -> bool:
    return agent_state(pod, spec.AGENT_CONTAINER).running


def cleanup(cluster: ClusterChoice, *, all_namespaces: bool, include_running: bool) -> int:
    from ktrace.remotefs.mirror import remove_leftovers

    for path in remove_leftovers():
        print(f"removed the target files of a ktrace run that was killed: {path}")
    return asyncio.run(_cleanup(cluster, all_namespaces, include_running))


async def _cleanup(cluster: ClusterChoice, all_namespaces: bool, include_running: bool) -> int:
    api = await KubeApi.load(cluster.kubeconfig, cluster.context, cluster.namespace)
    try:
        namespace = None if all_namespaces else api.namespace
        path = "/api/v1/pods" if namespace is None else f"/api/v1/namespaces/{namespace}/pods"
        listing = await api.request(
            ApiCall("list", "pods", namespace), "GET", path, query=[("labelSelector", spec.AGENT_SELECTOR)]
        )
        kept = 0
        deleted = 0
        for pod in listing.get("items") or []:
            meta = pod.get("metadata") or {}
            ns, name = str(meta.get("namespace")), str(meta.get("name"))
            if agent_runs(pod) and not include_running:
                kept += 1
                continue
            if meta.get("deletionTimestamp"):
                continue
            if not await api.delete_pod(ns, name):
                continue
            phase = (pod.get("status") or {}).get("phase", "?")
            print(f"deleted pod {ns}/{name} ({phase})")
            deleted += 1
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        if not deleted:
            print(f"no leftover agent pods in {where}")
        if kept:
            print(
                f"kept {kept} agent pod(s) whose agent still runs (a live session, or one that exits after its idle "
                "time); --include-running deletes them too"
            )
        return 0
    except KubeApiError as exc:
        raise explain(exc, context=api.context) from None
    finally:
        await api.close()
