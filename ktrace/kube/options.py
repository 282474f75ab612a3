"""The Kubernetes settings of ``ktrace run`` / ``ktrace cleanup`` / ``ktrace doctor`` (pure; cheap to import).

Importing this module registers the keys with ``ktrace.config``, so each can be a flag, a ``KTRACE_*``
variable (``KTRACE_AGENT_IMAGE``, ``KTRACE_NAMESPACE``, ...) or a ``ktrace.toml`` key. kubectl's own
``KUBECONFIG`` is honoured as kubectl does, below ``--kubeconfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ktrace import config
from ktrace.config import Key, positive_number, text, text_list
from ktrace.errors import KtraceError

from .envlayer import EnvChoice
from .spec import (
    DEFAULT_IDLE_EXIT,
    DEFAULT_IMAGE,
    PULL_POLICIES,
    AgentOptions,
    SpecError,
    parse_key_value,
    parse_toleration,
)
from .target import Target, TargetError, parse_target

DEFAULT_AGENT_TIMEOUT = 60.0


def boolean(value: Any) -> bool:
    """A TOML boolean, or an environment variable's 1/0, true/false, yes/no."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


PORT_FORWARDS = ("auto", "spdy", "websocket")


def port_forward(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in PORT_FORWARDS:
        return value.strip().lower()
    raise ValueError(f"must be one of {', '.join(PORT_FORWARDS)}")


def pull_policy(value: Any) -> str:
    for policy in PULL_POLICIES:
        if isinstance(value, str) and value.strip().lower() == policy.lower():
            return policy
    raise ValueError(f"must be one of {', '.join(PULL_POLICIES)}")


config.register(
    Key("kubeconfig", text, "the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"),
    Key("context", text, "the kubeconfig context (default: its current-context)"),
    Key("namespace", text, "the namespace (default: the context's)"),
    Key("target", text, "pod/NAME[/container/C] or deploy/NAME: the agent joins that pod"),
    Key("agent-image", text, f"the agent image (default {DEFAULT_IMAGE})"),
    Key("agent-pull-policy", pull_policy, "imagePullPolicy of the agent"),
    Key("agent-pull-secret", text_list, "imagePullSecrets of the agent pod"),
    Key("agent-node-selector", text_list, "nodeSelector of the agent pod, KEY=VALUE"),
    Key("agent-toleration", text_list, "taints the agent pod tolerates, KEY[=VALUE][:EFFECT]"),
    Key("agent-label", text_list, "labels of the agent pod, KEY=VALUE"),
    Key("agent-annotation", text_list, "annotations of the agent pod, KEY=VALUE"),
    Key("agent-timeout", positive_number, f"seconds the agent may take to start (default {DEFAULT_AGENT_TIMEOUT:g})"),
    Key(
        "agent-idle-exit", positive_number, f"seconds the agent lives on without ktrace (default {DEFAULT_IDLE_EXIT:g})"
    ),
    Key("port-forward", port_forward, "the tunnel's port-forward: auto (SPDY, else WebSocket), spdy, websocket"),
    Key("env-include", text_list, "--target: variables (globs) taken from the pod even if they describe the machine"),
    Key("env-exclude", text_list, "--target: variables (globs) that keep their local value"),
    Key("no-env", boolean, "--target: the program gets the local environment only"),
    Key("remote-path", text_list, "--target: more paths of the target container's filesystem the program sees"),
    Key("local-path", text_list, "--target: paths that stay local even inside the target's volumes"),
)


@dataclass(frozen=True)
class ClusterChoice:
    """kubectl's ``--kubeconfig``, ``--context``, ``-n/--namespace`` (None: the kubeconfig's choice)."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class KubeOptions:
    cluster: ClusterChoice = field(default_factory=ClusterChoice)
    target: Target | None = None
    agent: AgentOptions = field(default_factory=AgentOptions)
    timeout: float = DEFAULT_AGENT_TIMEOUT  # --agent-timeout: how long the agent may take to start
    env: EnvChoice = field(default_factory=EnvChoice)  # --no-env, --env-include, --env-exclude
    remote_paths: tuple[str, ...] = ()  # --remote-path
    local_paths: tuple[str, ...] = ()  # --local-path
    port_forward: str = "auto"  # --port-forward


def cluster_choice(settings: config.Settings) -> ClusterChoice:
    return ClusterChoice(settings.get("kubeconfig"), settings.get("context"), settings.get("namespace"))


def kube_options(settings: config.Settings) -> KubeOptions | None:
    """The ``--agent kube`` options (None for another agent), checked: a bad one is a usage error."""
    agent = settings.get("agent") or "kube"
    if agent != "kube":
        if settings.get("target"):
            raise KtraceError(f"--target needs --agent kube (the agent is {agent})")
        return None
    try:
        options = AgentOptions(
            image=settings.get("agent-image") or DEFAULT_IMAGE,
            pull_policy=settings.get("agent-pull-policy"),
            pull_secrets=tuple(settings.get("agent-pull-secret", ())),
            node_selector=dict(
                parse_key_value(t, "--agent-node-selector") for t in settings.get("agent-node-selector", ())
            ),
            tolerations=tuple(parse_toleration(t) for t in settings.get("agent-toleration", ())),
            labels=dict(parse_key_value(t, "--agent-label") for t in settings.get("agent-label", ())),
            annotations=dict(
                parse_key_value(t, "--agent-annotation", label_value=False)
                for t in settings.get("agent-annotation", ())
            ),
            idle_exit=settings.get("agent-idle-exit", DEFAULT_IDLE_EXIT),
        )
        target = parse_target(settings.get("target")) if settings.get("target") else None
        remote_paths = _paths(settings, "remote-path")
        local_paths = _paths(settings, "local-path")
    except (SpecError, TargetError) as exc:
        raise KtraceError(str(exc)) from None
    return KubeOptions(
        cluster=cluster_choice(settings),
        target=target,
        agent=options,
        timeout=settings.get("agent-timeout", DEFAULT_AGENT_TIMEOUT),
        env=env_choice(settings),
        remote_paths=remote_paths,
        local_paths=local_paths,
        port_forward=settings.get("port-forward", "auto"),
    )


def env_choice(settings: config.Settings) -> EnvChoice:
    return EnvChoice(
        use_pod=not settings.get("no-env", False),
        include=tuple(settings.get("env-include", ())),
        exclude=tuple(settings.get("env-exclude", ())),
    )


def _paths(settings: config.Settings, key: str) -> tuple[str, ...]:
    paths = tuple(settings.get(key, ()))
    for path in paths:
        if not path.startswith("/"):
            raise SpecError(f"--{key}: {path!r} is not an absolute path")
    return paths


def ignored_for_target(options: KubeOptions) -> list[str]:
    """Options that shape a pod of ktrace's own, given with --target (where they cannot apply)."""
    return options.agent.pod_only_options() if options.target is not None else []


def ignored_without_target(options: KubeOptions) -> list[str]:
    """Options about the target pod's environment and files, given without --target."""
    if options.target is not None:
        return []
    names = []
    if not options.env.use_pod:
        names.append("--no-env")
    if options.env.include:
        names.append("--env-include")
    if options.env.exclude:
        names.append("--env-exclude")
    if options.remote_paths:
        names.append("--remote-path")
    if options.local_paths:
        names.append("--local-path")
    return names
