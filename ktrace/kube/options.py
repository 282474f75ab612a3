"""What ``ktrace run`` and ``ktrace cleanup`` take about the cluster (pure; cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec import AgentOptions
from .target import Target

DEFAULT_AGENT_TIMEOUT = 60.0


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
