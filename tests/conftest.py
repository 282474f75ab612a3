"""Shared fixtures: the namespace cluster (``ns_cluster``), the Kubernetes test cluster (``kube_cluster``)
and the fixture programs (``programs``)."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import pytest
from fixture_programs import Programs, SkippingPrograms
from kubecluster import KubeCluster, KubeClusterError
from kubecluster import unavailable_reason as kube_unavailable_reason
from nscluster import ClusterError, NamespaceCluster, unavailable_reason


@pytest.fixture(scope="session")
def programs() -> Programs:
    """Builds fixture programs on first use (cached across runs); `programs["cconnect"]` is a path."""
    return SkippingPrograms()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def ns_cluster() -> Iterator[NamespaceCluster]:
    """The namespace cluster: set up once per session, always torn down at its end."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    # A SIGTERM (e.g. a CI time limit) becomes KeyboardInterrupt, so set-up and the finally
    # below still tear the namespaces down; atexit covers an interrupted session as well.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            cluster = NamespaceCluster.up()  # tears down what it made if it fails
        except ClusterError as exc:
            pytest.fail(f"the namespace cluster could not be set up: {exc}")
        atexit.register(cluster.teardown)  # teardown is idempotent
        try:
            yield cluster
        finally:
            cluster.teardown()
    finally:
        signal.signal(signal.SIGTERM, previous)


BACKENDS = ("ptrace", "notify")


@pytest.fixture(params=BACKENDS)
def ktrace_cluster(ns_cluster: NamespaceCluster, request: pytest.FixtureRequest) -> Iterator[NamespaceCluster]:
    """The namespace cluster, for tests that run ``ktrace run``: fails if its agent is not running.
    Every such test runs once per interception backend, with the same assertions."""
    if ns_cluster.agent_error:
        pytest.fail(f"the agent is not running in the namespace cluster: {ns_cluster.agent_error}")
    ns_cluster.backend = request.param
    try:
        yield ns_cluster
    finally:
        ns_cluster.backend = None


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """The Kubernetes test cluster: reused if running, else started once and stopped at the session's end."""
    if os.environ.get("KTRACE_SKIP_KUBE") == "1":
        pytest.skip("KTRACE_SKIP_KUBE=1")
    reason = kube_unavailable_reason()
    if reason and os.environ.get("CI") and os.environ.get("KTRACE_SKIP_KUBE") != "1":
        pytest.fail(f"CI must run the kube tests: {reason}")
    if reason:
        # Loud on purpose: a skipped kube suite is easy to miss in a green run.
        print(f"\n*** kube tests SKIPPED: {reason} ***", file=sys.stderr)
        pytest.skip(reason)
    try:
        cluster = KubeCluster.ensure()
    except KubeClusterError as exc:
        pytest.fail(f"the Kubernetes test cluster could not be started: {exc}")
    atexit.register(cluster.teardown)  # also on an interrupted session; teardown is idempotent
    try:
        yield cluster
    finally:
        cluster.teardown()
