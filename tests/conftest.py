"""Shared fixtures: the namespace cluster (``ns_cluster``) and the fixture programs (``programs``)."""

from __future__ import annotations

import atexit
from collections.abc import Iterator

import pytest
from fixture_programs import Programs, SkippingPrograms
from nscluster import ClusterError, NamespaceCluster, unavailable_reason


@pytest.fixture(scope="session")
def programs() -> Programs:
    """Builds fixture programs on first use (cached across runs); `programs["cconnect"]` is a path."""
    return SkippingPrograms()


@pytest.fixture(scope="session")
def ns_cluster() -> Iterator[NamespaceCluster]:
    """The namespace cluster: set up once per session, always torn down at its end."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        cluster = NamespaceCluster.up()
    except ClusterError as exc:
        pytest.fail(f"the namespace cluster could not be set up: {exc}")
    atexit.register(cluster.teardown)  # also on an interrupted session; teardown is idempotent
    try:
        yield cluster
    finally:
        cluster.teardown()


@pytest.fixture
def ktrace_cluster(ns_cluster: NamespaceCluster) -> NamespaceCluster:
    """The namespace cluster, for tests that run ``ktrace run``: fails if its agent is not running."""
    if ns_cluster.agent_error:
        pytest.fail(f"the agent is not running in the namespace cluster: {ns_cluster.agent_error}")
    return ns_cluster
