"""What a pod's status says about the agent in it (pure: a pod dict in, a verdict out).

The same function serves the wait for the agent to start (progress text for the spinner,
failures that will not fix themselves) and the watch while the program runs (the agent
crashed, exited, or its pod is being deleted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ktrace.errors import KtraceError

# Waiting reasons that do not resolve by waiting longer.
_IMAGE_FAILURES = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "ImageInspectError")
_CONTAINER_FAILURES = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreStartHookError")
_MESSAGE_TAIL = 300  # characters of an agent's last words shown on the one error line


@dataclass(frozen=True)
class AgentState:
    """``state``: "waiting", "running" or "ended" (failed to start, exited, or being deleted)."""

    state: str
    detail: str
    error: KtraceError | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"


def _container_status(pod: Mapping[str, Any], container: str, ephemeral: bool) -> Mapping[str, Any] | None:
    status = pod.get("status") or {}
    key = "ephemeralContainerStatuses" if ephemeral else "containerStatuses"
    for entry in status.get(key) or []:
        if entry.get("name") == container:
            return dict(entry)
    return None


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MESSAGE_TAIL else "..." + flat[-_MESSAGE_TAIL:]


def _terminated(where: str, image: str, info: Mapping[str, Any], ephemeral: bool = False) -> KtraceError:
    code = info.get("exitCode")
    reason = info.get("reason") or ""
    message = _one_line(info.get("message") or "")
    text = f"the agent in {where} exited with code {code}"
    if reason and reason not in ("Error", "Completed"):
        text += f" ({reason})"
    if message:
        text += f": {message}"
    if reason == "OOMKilled" and ephemeral:
        # Ephemeral containers cannot have resources: the agent lives within the target pod's memory limit.
        return KtraceError(
            text,
            "an ephemeral container shares the target pod's memory limit, which left too little for the agent "
            "(about 40 MB); give the pod more room, or leave out --target",
        )
    if reason == "OOMKilled":
        return KtraceError(text, "the agent ran out of memory; report it with the traffic that caused it")
    if "unrecognized arguments" in message or "No module named" in message or "executable file not found" in message:
        return KtraceError(
            text, f"{image} is not an agent image of this ktrace version; pass --agent-image with the matching tag"
        )
    if code == 0 and "idle, exiting" in message:
        return KtraceError(text, "the agent heard nothing from ktrace for its idle time (--agent-idle-exit)")
    return KtraceError(text, "the agent crashed: rerun with --debug and report the message above")


def agent_state(pod: Mapping[str, Any], container: str, *, ephemeral: bool = False) -> AgentState:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    where = f"pod {name}" if not ephemeral else f"ephemeral container {container} of pod {name}"
    image = ""
    for spec in (pod.get("spec") or {}).get("ephemeralContainers" if ephemeral else "containers") or []:
        if spec.get("name") == container:
            image = str(spec.get("image", ""))

    if meta.get("deletionTimestamp"):
        return AgentState(
            "ended",
            "being deleted",
            KtraceError(
                f"{'the agent pod' if not ephemeral else 'pod'} {name} is being deleted",
                "someone or something "
                "deleted it (kubectl delete, ktrace cleanup, an eviction, a rollout); run ktrace again",
            ),
        )

    cs = _container_status(pod, container, ephemeral)
    if cs is not None:
        state = cs.get("state") or {}
        if "running" in state:
            return AgentState("running", "running")
        if "terminated" in state:
            return AgentState("ended", "exited", _terminated(where, image, state["terminated"], ephemeral))
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason") or "Waiting"
        message = _one_line(waiting.get("message") or "")
        detail = reason + (f": {message}" if message else "")
        if reason in _IMAGE_FAILURES:
            return AgentState(
                "ended",
                reason,
                KtraceError(
                    f"cannot pull the agent image {image} for {where}: {detail}",
                    "check --agent-image and --agent-pull-policy; a private registry needs --agent-pull-secret",
                ),
            )
        if reason in _CONTAINER_FAILURES:
            return AgentState(
                "ended",
                reason,
                KtraceError(
                    f"cannot start the agent in {where}: {detail}",
                    "the image must be ktrace's agent image (Dockerfile), runnable as a non-root user",
                ),
            )
        if reason == "ContainerCreating":
            return AgentState("waiting", "starting the agent container (pulling the image if needed)")
        return AgentState("waiting", f"agent container {detail}")

    phase = status.get("phase") or "Pending"
    if phase in ("Failed", "Succeeded"):
        reason = status.get("reason") or phase
        message = _one_line(status.get("message") or "")
        return AgentState(
            "ended",
            phase,
            KtraceError(
                f"{where} ended before the agent ran: {reason}" + (f": {message}" if message else ""),
                "see kubectl describe for the pod's events",
            ),
        )
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            message = _one_line(condition.get("message") or condition.get("reason") or "")
            return AgentState("waiting", f"unschedulable: {message}" if message else "not scheduled yet")
    if not status.get("conditions"):
        return AgentState("waiting", "waiting to be scheduled")
    return AgentState("waiting", "starting the agent container")


def timeout_error(where: str, seconds: float, last: AgentState | None) -> KtraceError:
    """The agent did not run within ``--agent-timeout``; the last state says why, as well as it can."""
    detail = last.detail if last is not None else "no status yet"
    if detail.startswith("unschedulable"):
        hint = "no node takes the agent pod: check --agent-node-selector / --agent-toleration and cluster capacity"
    elif "pulling" in detail or "ContainerCreating" in detail:
        hint = "pulling the agent image may take longer the first time: raise --agent-timeout"
    else:
        hint = "raise --agent-timeout, or look at the pod's events with kubectl describe"
    return KtraceError(f"{where} did not start within {seconds:g} s ({detail})", hint)
