"""``--target`` parsing and a Deployment's pod choice (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from ktrace.kube.target import Target, TargetError, check_target_pod, label_selector, parse_target, pick_pod


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pod/web-0", Target("pod", "web-0")),
        ("po/web-0", Target("pod", "web-0")),
        ("pods/a.b", Target("pod", "a.b")),
        ("pod/web-0/container/app", Target("pod", "web-0", "app")),
        ("deploy/api", Target("deployment", "api")),
        ("deployment/api", Target("deployment", "api")),
        ("deployments/api/container/side", Target("deployment", "api", "side")),
    ],
)
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "web",
        "pod/",
        "svc/web",
        "pod/Web",
        "pod/a/b",
        "pod/a/container/",
        "pod/a/cont/x",
        "pod/a/container/A_b",
        "pod//",
    ],
)
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(TargetError, match="--target"):
        parse_target(text)


def test_target_str_round_trips() -> None:
    for text in ("pod/a", "pod/a/container/b", "deploy/x", "deploy/x/container/y"):
        assert str(parse_target(text)) == text


def test_label_selector() -> None:
    assert label_selector({"matchLabels": {"b": "2", "a": "1"}}) == "a=1,b=2"
    assert (
        label_selector(
            {
                "matchLabels": {"app": "x"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["web", "api"]},
                    {"key": "canary", "operator": "NotIn", "values": ["yes"]},
                    {"key": "ready", "operator": "Exists"},
                    {"key": "legacy", "operator": "DoesNotExist"},
                ],
            }
        )
        == "app=x,tier in (web,api),canary notin (yes),ready,!legacy"
    )
    with pytest.raises(TargetError, match="empty selector"):
        label_selector({})


def pod(
    name: str,
    phase: str = "Running",
    ready: bool = True,
    created: str = "2026-01-01T00:00:00Z",
    deleting: bool = False,
    containers: tuple[str, ...] = ("app",),
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": c} for c in containers]},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_pick_pod() -> None:
    assert pick_pod([]) is None
    assert pick_pod([pod("a", phase="Pending"), pod("b", deleting=True)]) is None
    chosen = pick_pod(
        [
            pod("young-ready", created="2026-01-03T00:00:00Z"),
            pod("old-unready", ready=False, created="2026-01-01T00:00:00Z"),
            pod("old-ready", created="2026-01-02T00:00:00Z"),
            pod("oldest-deleting", created="2025-01-01T00:00:00Z", deleting=True),
        ]
    )
    assert chosen is not None and chosen["metadata"]["name"] == "old-ready"


def test_check_target_pod() -> None:
    check_target_pod(pod("a"), Target("pod", "a"))
    check_target_pod(pod("a", containers=("app", "side")), Target("pod", "a", "side"))
    with pytest.raises(TargetError, match=r"no container 'nope'.*app, side"):
        check_target_pod(pod("a", containers=("app", "side")), Target("pod", "a", "nope"))
    with pytest.raises(TargetError, match="Pending, not Running"):
        check_target_pod(pod("a", phase="Pending"), Target("pod", "a"))
    with pytest.raises(TargetError, match="being deleted"):
        check_target_pod(pod("a", deleting=True), Target("pod", "a"))
