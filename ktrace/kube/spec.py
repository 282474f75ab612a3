"""The agent's pod and ephemeral-container specs, as plain JSON-ready dicts (pure).

Both pass Pod Security "restricted": non-root (a fixed numeric UID, so the kubelet can check it
without the image's /etc/passwd), no privilege escalation, every capability dropped, the
runtime's default seccomp profile, a read-only root filesystem, no service-account token.
The agent is started with only the SHA-256 of the session token: whoever can read the spec
cannot use the agent.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ktrace import __version__

AGENT_CONTAINER = "ktrace-agent"
AGENT_UID = 65532  # the Dockerfile's USER; also set in the spec so any agent image runs non-root
# Where a release's image is expected; KTRACE_AGENT_IMAGE or --agent-image name another (docs/kubernetes.md).
DEFAULT_IMAGE = f"ktrace/agent:{__version__}"
DEFAULT_IDLE_EXIT = 60.0
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

# Every agent pod carries these (Kubernetes' recommended labels); `ktrace cleanup` selects on the first two.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SESSION = "app.kubernetes.io/instance"  # ktrace-<session id>
LABEL_VERSION = "app.kubernetes.io/version"
AGENT_SELECTOR = f"{LABEL_NAME}=ktrace-agent,{LABEL_MANAGED_BY}=ktrace"

# Small: the agent relays bytes, and one core is what a single gRPC connection can use.
RESOURCES = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"cpu": "1", "memory": "256Mi"},
}

# Loopback ports the agent may listen on: random per session, so several sessions can put their agent
# into the same target pod, and a clash with the target's own ports is unlikely.
PORT_RANGE = (20000, 59999)

_QUALIFIED_NAME = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class SpecError(ValueError):
    """A bad --agent-* option: the message names the option and the value."""


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_id() -> str:
    """Random, lower-case hex: usable in pod names, container names and label values."""
    return secrets.token_hex(4)


def pick_port() -> int:
    low, high = PORT_RANGE
    return low + secrets.randbelow(high - low + 1)


def _key(text: str, option: str) -> str:
    if len(text.rpartition("/")[2]) > 63 or not _QUALIFIED_NAME.fullmatch(text):
        raise SpecError(f"{option}: {text!r} is not a valid label key")
    return text


def parse_key_value(text: str, option: str, *, label_value: bool = True) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--agent-label``/``--agent-node-selector`` (label syntax) or ``--agent-annotation``."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SpecError(f"{option}: expected KEY=VALUE, got {text!r}")
    _key(key, option)
    if label_value and (len(value) > 63 or not _LABEL_VALUE.fullmatch(value)):
        raise SpecError(f"{option}: {value!r} is not a valid label value")
    return key, value


def parse_toleration(text: str) -> dict[str, Any]:
    """kubectl's taint syntax, tolerated: ``KEY[=VALUE][:EFFECT]``; ``KEY`` alone tolerates any value and
    effect of that key; ``*`` tolerates every taint."""
    option = "--agent-toleration"
    if text == "*":
        return {"operator": "Exists"}
    spec, _, effect = text.partition(":")
    if effect and effect not in _TAINT_EFFECTS:
        raise SpecError(f"{option}: effect {effect!r} is not one of {', '.join(_TAINT_EFFECTS)}")
    key, sep, value = spec.partition("=")
    _key(key, option)
    toleration: dict[str, Any] = {"key": key}
    if sep:
        if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            raise SpecError(f"{option}: {value!r} is not a valid taint value")
        toleration.update(operator="Equal", value=value)
    else:
        toleration["operator"] = "Exists"
    if effect:
        toleration["effect"] = effect
    return toleration


@dataclass(frozen=True)
class AgentOptions:
    """What the user may choose about the agent (``--agent-*``)."""

    image: str = DEFAULT_IMAGE
    pull_policy: str | None = None  # None: Kubernetes' default for the tag
    pull_secrets: Sequence[str] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    idle_exit: float = DEFAULT_IDLE_EXIT
    # No connect timeout of the agent's own: the user's --connect-timeout travels with each
    # connection (TcpOpen.timeout_ms); the agent's default serves when the user set none.

    def __post_init__(self) -> None:
        if self.pull_policy is not None and self.pull_policy not in PULL_POLICIES:
            raise SpecError(f"--agent-pull-policy: {self.pull_policy!r} is not one of {', '.join(PULL_POLICIES)}")
        if not self.image or any(c.isspace() for c in self.image):
            raise SpecError(f"--agent-image: {self.image!r} is not an image reference")
        if self.idle_exit <= 0:
            raise SpecError("--agent-idle-exit must be positive")

    def pod_only_options(self) -> list[str]:
        """Options that shape a pod of ktrace's own, not an ephemeral container in someone else's pod."""
        names = []
        if self.pull_secrets:
            names.append("--agent-pull-secret")
        if self.node_selector:
            names.append("--agent-node-selector")
        if self.tolerations:
            names.append("--agent-toleration")
        if self.labels:
            names.append("--agent-label")
        if self.annotations:
            names.append("--agent-annotation")
        return names


def agent_args(port: int, token_hash: str, options: AgentOptions) -> list[str]:
    """The agent's command line (the image's entrypoint is the agent)."""
    return ["--listen", f"127.0.0.1:{port}", "--token-sha256", token_hash, "--idle-exit", f"{options.idle_exit:g}"]


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": AGENT_UID,
        "runAsGroup": AGENT_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container(name: str, port: int, token_hash: str, options: AgentOptions) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": options.image,
        "args": agent_args(port, token_hash, options),
        "securityContext": _container_security(),
        # A crashing agent's last log lines land in its status: ktrace reports them without pods/log rights.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.pull_policy is not None:
        container["imagePullPolicy"] = options.pull_policy
    return container


def agent_pod(
    name: str, namespace: str, session: str, port: int, token_hash: str, options: AgentOptions
) -> dict[str, Any]:
    """The targetless agent's pod."""
    container = _container(AGENT_CONTAINER, port, token_hash, options)
    container["resources"] = RESOURCES
    # ktrace's own labels win: cleanup depends on them.
    labels = {
        **options.labels,
        LABEL_NAME: "ktrace-agent",
        LABEL_MANAGED_BY: "ktrace",
        LABEL_SESSION: f"ktrace-{session}",
        LABEL_VERSION: __version__,
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 2,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": AGENT_UID,
            "runAsGroup": AGENT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    if options.pull_secrets:
        spec["imagePullSecrets"] = [{"name": secret} for secret in options.pull_secrets]
    if options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        spec["tolerations"] = [dict(t) for t in options.tolerations]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            **({"annotations": dict(options.annotations)} if options.annotations else {}),
        },
        "spec": spec,
    }


@dataclass(frozen=True)
class TargetFiles:
    """What the agent needs to serve the target container's files (``mounts.FilePlan``)."""

    volume_mounts: Sequence[Mapping[str, Any]] = ()
    env: Sequence[Mapping[str, str]] = ()
    run_as_user: int | None = None
    run_as_group: int | None = None
    process_namespace: str | None = None  # the container whose root the agent reads (/proc/1/root)


def agent_ephemeral_container(
    name: str,
    port: int,
    token_hash: str,
    options: AgentOptions,
    target_container: str | None,
    files: TargetFiles | None = None,
) -> dict[str, Any]:
    """The agent as an ephemeral container of a target pod (no resources: the API forbids them there).

    With ``files``: the target's volumes mounted read-only, the list of what to serve, and the
    target's user and group (non-root), so the agent reads what the target's process reads."""
    container = _container(name, port, token_hash, options)
    files = files or TargetFiles()
    joined = target_container or files.process_namespace
    if joined is not None:
        container["targetContainerName"] = joined
    if files.volume_mounts:
        container["volumeMounts"] = [dict(m) for m in files.volume_mounts]
    if files.env:
        container["env"] = [dict(e) for e in files.env]
    if files.run_as_user:
        container["securityContext"]["runAsUser"] = files.run_as_user
        if files.run_as_group is not None:
            container["securityContext"]["runAsGroup"] = files.run_as_group
        else:
            # The target's group is the image's choice, unknown here: leave it to the agent image too.
            del container["securityContext"]["runAsGroup"]
    return container


def ephemeral_patch(container: Mapping[str, Any]) -> dict[str, Any]:
    """Strategic-merge patch of ``pods/NAME/ephemeralcontainers``: ephemeral containers merge by name,
    so this adds one and leaves the others."""
    return {"spec": {"ephemeralContainers": [dict(container)]}}
