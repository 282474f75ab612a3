"""Fixtures for the ``kube`` tests: the real single-node cluster of scripts/cluster."""

from __future__ import annotations

import atexit
import sys
from collections.abc import Iterator

import pytest
from kubecluster import KubeCluster, KubeClusterError, unavailable_reason


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """The Kubernetes test cluster: reused if running, else started once and stopped at the session's end."""
    reason = unavailable_reason()
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
