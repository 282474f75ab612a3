"""One ``ktrace run`` session's agent in the cluster: start it, tunnel to it, watch it, remove it.

``kube_agent(options)`` is an async context manager. On entry it creates the agent pod (or adds
the agent as an ephemeral container to the ``--target`` pod), waits for it with a spinner and
``--agent-timeout``, and starts the port-forward bridge; it yields a ``KubeAgent``. On exit, on
error, and on SIGINT/SIGTERM/SIGHUP while starting, it deletes the pod it created. (An ephemeral
container cannot be removed from a pod: its agent exits after ``--agent-idle-exit`` without ktrace.)

While the program runs, a heartbeat keeps the agent from idling out and a watch on the pod turns
"the agent pod was deleted / the agent exited" into ``KubeAgent.lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio

from ktrace import __version__
from ktrace.errors import KtraceError
from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import AgentUnavailable

from . import spec
from .api import KubeApi, UpgradeUnavailable
from .errors import ApiCall, KubeApiError, explain
from .options import KubeOptions
from .podview import TargetView, resolve_target
from .portforward import PROTOCOL, ForwardSocket, OpenSocket, PortForwardBridge, Unreachable
from .portforward_transports import SPDY_UPGRADE, SpdyForward, WebSocketForward
from .status import agent_state
from .watching import PodGone, follow_pod, wait_running

log = logging.getLogger("ktrace.kube")

DELETE_TIMEOUT = 10.0


def report(line: str) -> None:
    print(f"ktrace: {line}", file=sys.stderr, flush=True)


def heartbeat_interval(idle_exit: float) -> float:
    """Often enough that two missed beats still leave the agent alive."""
    return min(10.0, max(0.2, idle_exit / 4))


def version_warning(agent_version: str) -> str | None:
    if agent_version == __version__:
        return None
    return (
        f"warning: the agent is ktrace-agent {agent_version or '(unknown)'}, this is ktrace {__version__} "
        f"(hint: --agent-image with tag {__version__})"
    )


class KubeAgent:
    """What ``ktrace run`` gets: where to dial, the token, and ``lost`` (set when the agent is gone for good)."""

    def __init__(self, api: KubeApi, where: str, bridge: PortForwardBridge, token: str, idle_exit: float) -> None:
        self.where = where
        self.address = bridge.address
        self.token = token
        self.lost: asyncio.Future[KtraceError] = asyncio.get_running_loop().create_future()
        self._api = api
        self._bridge = bridge
        self._idle_exit = idle_exit
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self, timeout: float = 10.0) -> AgentClient:
        """The handshake through the bridge; a refused port-forward fails at once with its reason."""
        handshake = asyncio.create_task(AgentClient.connect(self.address, self.token, timeout=timeout))
        refused = asyncio.create_task(self._bridge.refused.wait())
        try:
            await asyncio.wait({handshake, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if not handshake.done():
            handshake.cancel()
            with contextlib.suppress(BaseException):
                await handshake
            raise self._unreachable()
        try:
            client = handshake.result()
        except AgentUnavailable as exc:
            # No answer through the bridge: the bridge knows why. Any other refusal (token, protocol) is the agent's.
            cause = exc.__cause__
            silent = isinstance(cause, grpc.aio.AioRpcError) and cause.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            if silent and self._bridge.last_error:
                raise self._unreachable() from None
            raise KtraceError(str(exc)) from None
        warning = version_warning(client.info.version)
        if warning:
            report(warning)
        self._tasks.append(asyncio.create_task(self._heartbeat(client)))
        return client

    def _unreachable(self) -> KtraceError:
        final = self._bridge.final_error
        if final is not None and isinstance(final.__cause__, KubeApiError):
            return explain(final.__cause__, context=self._api.context)
        reason = self._bridge.last_error or "no answer"
        return KtraceError(
            f"cannot reach the agent in {self.where} through the port-forward: {reason}",
            "rerun with --debug to see every attempt",
        )

    async def _heartbeat(self, client: AgentClient) -> None:
        interval = heartbeat_interval(self._idle_exit)
        while True:
            await asyncio.sleep(interval)
            try:
                await client.ping(timeout=max(interval, 2.0))
            except Exception as exc:  # the bridge reports drops; a beat lost to one is expected
                log.debug("heartbeat failed: %s", exc)

    def watch(self, pods: AsyncIterator[dict[str, Any]], container: str, ephemeral: bool) -> None:
        self._tasks.append(asyncio.create_task(self._watch(pods, container, ephemeral)))

    async def _watch(self, pods: AsyncIterator[dict[str, Any]], container: str, ephemeral: bool) -> None:
        error: KtraceError
        try:
            async for pod in pods:
                state = agent_state(pod, container, ephemeral=ephemeral)
                if state.state == "ended":
                    assert state.error is not None
                    error = state.error
                    break
            else:
                return
        except PodGone:
            error = KtraceError(f"the agent's pod ({self.where}) was deleted", "run ktrace again")
        except KubeApiError as exc:
            error = explain(exc, context=self._api.context)
        if not self.lost.done():
            self.lost.set_result(error)

    async def namespaces(self) -> list[str]:
        """The cluster's namespaces, for the "same-named service elsewhere" hint; [] without the right to list them
        (docs/rbac.yaml does not ask for it)."""
        try:
            listing = await self._api.request(ApiCall("list", "namespaces"), "GET", "/api/v1/namespaces", timeout=5.0)
        except KubeApiError as exc:
            log.debug("cannot list namespaces: %s", exc)
            return []
        return [str(item["metadata"]["name"]) for item in listing.get("items") or []]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Spinner:
    """A rich status line on stderr while the agent starts, only when stderr is a terminal."""

    def __init__(self, text: str) -> None:
        self._status: Any = None
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            self._status = console.status(text)
            self._status.start()

    def update(self, text: str) -> None:
        log.debug("agent: %s", text)
        if self._status is not None:
            self._status.update(text)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


@contextlib.contextmanager
def _interrupted_by_signals(task: asyncio.Task[Any]) -> Iterator[list[int]]:
    """While starting the agent, SIGINT/SIGTERM/SIGHUP cancel ``task`` (``ktrace run`` has blocked them
    for the tracer's signalfd, so they are read from a signalfd of our own until the tracer starts)."""
    from ktrace.tracer import linux

    wanted: set[int] = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if not wanted <= set(signal.pthread_sigmask(signal.SIG_BLOCK, set())):
        yield []  # not blocked (not under `ktrace run`): Python's own handlers apply
        return
    loop = asyncio.get_running_loop()
    fd = linux.signalfd(wanted)
    received: list[int] = []

    def on_signal() -> None:
        for signo, _code, _pid in linux.read_signals(fd):
            if not received:
                task.cancel()
            received.append(signo)

    loop.add_reader(fd, on_signal)
    try:
        yield received
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _open_socket(api: KubeApi, namespace: str, pod: str, port: int, choice: str) -> OpenSocket:
    """Port-forwards to ``port`` of ``pod``: SPDY (kubectl's protocol, cheaper for the node) unless
    ``choice`` says otherwise; with ``auto``, the first SPDY upgrade the API server answers with
    anything but 101 (no ``create`` right, a proxy or server without SPDY) makes it WebSocket from
    then on, and the WebSocket's answer is the one reported."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
    query = [("ports", str(port))]
    use_spdy = choice != "websocket"

    async def spdy_socket() -> ForwardSocket:
        call = ApiCall("create", "pods/portforward", namespace, pod)
        reader, writer = await api.upgrade(call, path, query, SPDY_UPGRADE, timeout=10.0)
        forward = SpdyForward(reader, writer, port)
        forward.start()
        log.debug("port-forward to %s/%s:%d over SPDY/3.1", namespace, pod, port)
        return forward

    async def websocket() -> ForwardSocket:
        call = ApiCall("get", "pods/portforward", namespace, pod)
        ws = await api.websocket(call, path, query, PROTOCOL, timeout=10.0)
        log.debug("port-forward to %s/%s:%d over a WebSocket (%s)", namespace, pod, port, PROTOCOL)
        return WebSocketForward(ws, port)

    async def open_socket() -> ForwardSocket:
        nonlocal use_spdy
        try:
            if use_spdy:
                try:
                    return await spdy_socket()
                except KubeApiError as exc:
                    if choice == "spdy" or (exc.status == 0 and not isinstance(exc, UpgradeUnavailable)):
                        raise
                    log.debug("port-forward: SPDY refused (%s); using the WebSocket from now on", exc)
                    use_spdy = False
            return await websocket()
        except KubeApiError as exc:
            # 4xx: no rights, the pod is gone, ...: retrying cannot help. Restarts (no answer, 5xx) may pass.
            final = 400 <= exc.status < 500 and exc.status != 429
            raise Unreachable(explain(exc, context=api.context).message, final=final) from exc

    return open_socket


@contextlib.asynccontextmanager
async def kube_agent(options: KubeOptions, view: TargetView | None = None) -> AsyncIterator[KubeAgent]:
    """``view``: the target pod as ``ktrace run`` read it before starting the program (the pod, its
    container, the files to serve); without it the ``--target`` pod is looked up here."""
    api = await KubeApi.load(options.cluster.kubeconfig, options.cluster.context, options.cluster.namespace)
    try:
        async with _agent_in_cluster(api, options, view) as agent:
            yield agent
    except KubeApiError as exc:
        raise explain(exc, context=api.context) from None
    finally:
        await api.close()


@contextlib.asynccontextmanager
async def _agent_in_cluster(api: KubeApi, options: KubeOptions, view: TargetView | None) -> AsyncIterator[KubeAgent]:
    ns = api.namespace
    session = spec.new_session_id()
    port = spec.pick_port()
    token = secrets.token_urlsafe(32)
    token_hash = spec.token_sha256(token)
    created: str | None = None  # the pod to delete at the end
    agent: KubeAgent | None = None
    bridge: PortForwardBridge | None = None
    task = asyncio.current_task()
    assert task is not None
    spinner = _Spinner("starting the ktrace agent")
    try:
        with _interrupted_by_signals(task) as signals:
            try:
                if options.target is None:
                    name = f"ktrace-agent-{session}"
                    container = spec.AGENT_CONTAINER
                    ephemeral = False
                    where = f"agent pod {ns}/{name}"
                    spinner.update(f"creating {where}")
                    body = spec.agent_pod(name, ns, session, port, token_hash, options.agent)
                    created = name  # before the request: an interrupted create may still have happened
                    try:
                        pod = await api.request(
                            ApiCall("create", "pods", ns), "POST", f"/api/v1/namespaces/{ns}/pods", body=body
                        )
                    except KubeApiError as exc:
                        if exc.status != 0:
                            created = None  # the API server answered: nothing was created
                        raise
                else:
                    spinner.update(f"finding {options.target}")
                    target = view.pod if view is not None else await resolve_target(api, options.target)
                    name = str(target["metadata"]["name"])
                    container = f"ktrace-agent-{session}"
                    ephemeral = True
                    where = f"ephemeral container {container} in pod {ns}/{name}"
                    spinner.update(f"adding {where}")
                    patch = spec.ephemeral_patch(
                        spec.agent_ephemeral_container(
                            container, port, token_hash, options.agent, options.target.container, _files(view)
                        )
                    )
                    pod = await api.request(
                        ApiCall("patch", "pods/ephemeralcontainers", ns, name),
                        "PATCH",
                        f"/api/v1/namespaces/{ns}/pods/{name}/ephemeralcontainers",
                        body=patch,
                        content_type="application/strategic-merge-patch+json",
                    )
                started = False
                pods = follow_pod(api, ns, name, str(pod["metadata"]["resourceVersion"]), patient=lambda: started)
                await wait_running(pods, where, container, ephemeral, options.timeout, spinner)
                started = True
                bridge = PortForwardBridge(_open_socket(api, ns, name, port, options.port_forward), report=report)
                await bridge.start()
            except asyncio.CancelledError:
                if not signals:
                    raise
                task.uncancel()
                raise KtraceError(
                    f"interrupted ({signal.Signals(signals[0]).name}) while starting the agent",
                    exit_code=128 + signals[0],
                ) from None
        spinner.stop()
        agent = KubeAgent(api, where, bridge, token, options.agent.idle_exit)
        agent.watch(pods, container, ephemeral)
        yield agent
    finally:
        spinner.stop()
        if agent is not None:
            await agent.stop()
        if bridge is not None:
            await bridge.close()
        if created is not None:
            await _delete_pod(api, ns, created)


def _files(view: TargetView | None) -> spec.TargetFiles | None:
    if view is None or view.files is None or not view.files.served:
        return None
    plan = view.files
    return spec.TargetFiles(
        volume_mounts=plan.volume_mounts,
        env=plan.env(),
        run_as_user=plan.run_as_user,
        run_as_group=plan.run_as_group,
        process_namespace=view.container if plan.needs_process_namespace else None,
    )


async def _delete_pod(api: KubeApi, namespace: str, name: str) -> None:
    try:
        await api.delete_pod(namespace, name, timeout=DELETE_TIMEOUT)
    except KubeApiError as exc:
        report(
            f"warning: could not delete the agent pod {namespace}/{name}: {explain(exc).message} "
            f"(hint: it exits by itself when idle; `ktrace cleanup -n {namespace}` deletes it)"
        )
