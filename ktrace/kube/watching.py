"""Following one pod through a watch that survives API server restarts, and waiting for the agent in it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ktrace.errors import KtraceError

from .api import KubeApi
from .errors import ApiCall, KubeApiError
from .status import AgentState, agent_state, timeout_error

log = logging.getLogger("ktrace.kube")

WATCH_SECONDS = 240  # the server ends a watch after this; it is resumed from the last resourceVersion


class Progress(Protocol):
    def update(self, text: str) -> None: ...


class PodGone(Exception):
    """The pod was deleted (404 or a DELETED event)."""


async def follow_pod(
    api: KubeApi, namespace: str, name: str, resource_version: str, *, patient: Callable[[], bool] = lambda: False
) -> AsyncIterator[dict[str, Any]]:
    """The pod's states as they change, from ``resource_version`` on; raises ``PodGone`` when it is deleted.

    Survives API server restarts: a failed watch is resumed (after a GET if the version expired). Other
    refusals (403: a missing right) end it, unless ``patient()``: once the agent runs, a refusal is more
    likely a restarting API server (it answers 403 until its RBAC cache is filled) than a right taken away,
    and losing the watch must not end the session.
    """
    path = f"/api/v1/namespaces/{namespace}/pods"
    watch_call = ApiCall("watch", "pods", namespace, name)
    get_call = ApiCall("get", "pods", namespace, name)
    version: str | None = resource_version
    delay = 0.2
    while True:
        try:
            if version is None:
                try:
                    pod = await api.request(get_call, "GET", f"{path}/{name}")
                except KubeApiError as exc:
                    if exc.status == 404:
                        raise PodGone from None
                    raise
                version = str(pod["metadata"]["resourceVersion"])
                yield pod
            query = [
                ("fieldSelector", f"metadata.name={name}"),
                ("resourceVersion", version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", str(WATCH_SECONDS)),
            ]
            async for event in api.watch(watch_call, path, query, read_timeout=WATCH_SECONDS + 30):
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:  # Gone: the version expired, start over from a GET
                        version = None
                        break
                    raise KubeApiError(watch_call, int(obj.get("code") or 500), str(obj.get("message")))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    raise PodGone
                yield obj
            delay = 0.2
        except KubeApiError as exc:
            if exc.status != 0 and exc.status < 500 and exc.status != 429 and not patient():
                raise
            log.debug("watch of pod %s failed (%s); resuming in %.1f s", name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def wait_running(
    pods: AsyncIterator[dict[str, Any]], where: str, container: str, ephemeral: bool, timeout: float, spinner: Progress
) -> None:
    last: AgentState | None = None
    try:
        async with asyncio.timeout(timeout):
            async for pod in pods:
                last = agent_state(pod, container, ephemeral=ephemeral)
                spinner.update(f"{where}: {last.detail}")
                if last.running:
                    return
                if last.state == "ended":
                    assert last.error is not None
                    raise last.error
    except TimeoutError:
        raise timeout_error(where, timeout, last) from None
    except PodGone:
        raise KtraceError(f"{where} was deleted while starting", "run ktrace again") from None
