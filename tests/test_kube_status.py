"""A pod's status → the agent's state, progress text and failures (pure)."""

from __future__ import annotations

from typing import Any

from ktrace.kube.status import AgentState, agent_state, timeout_error


def pod(status: dict[str, Any], *, deleting: bool = False, ephemeral: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "ktrace-agent-1", "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    key = "ephemeralContainers" if ephemeral else "containers"
    return {"metadata": meta, "spec": {key: [{"name": "ktrace-agent", "image": "img:1"}]}, "status": status}


def container(state: dict[str, Any], key: str = "containerStatuses") -> dict[str, Any]:
    return {"phase": "Pending", key: [{"name": "ktrace-agent", "state": state}]}


def test_waiting_then_running() -> None:
    assert agent_state(pod({}), "ktrace-agent") == AgentState("waiting", "waiting to be scheduled")
    state = agent_state(pod(container({"waiting": {"reason": "ContainerCreating"}})), "ktrace-agent")
    assert state.state == "waiting" and "starting" in state.detail
    assert agent_state(pod(container({"running": {"startedAt": "x"}})), "ktrace-agent").running


def test_unschedulable_is_progress_not_failure() -> None:
    status = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
            }
        ],
    }
    state = agent_state(pod(status), "ktrace-agent")
    assert state.state == "waiting"
    assert state.detail.startswith("unschedulable: 0/1 nodes are available")
    error = timeout_error("agent pod ns/x", 5, state)
    assert "did not start within 5 s (unschedulable: 0/1 nodes" in error.message
    assert error.hint is not None and "--agent-node-selector" in error.hint


def test_image_pull_failure_is_final() -> None:
    for reason in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"):
        state = agent_state(
            pod(container({"waiting": {"reason": reason, "message": "image not present with pull policy Never"}})),
            "ktrace-agent",
        )
        assert state.state == "ended"
        assert state.error is not None
        assert f"cannot pull the agent image img:1 for pod ns/ktrace-agent-1: {reason}" in state.error.message
        assert state.error.hint is not None and "--agent-image" in state.error.hint


def test_container_config_error_is_final() -> None:
    state = agent_state(
        pod(
            container(
                {
                    "waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": "container has runAsNonRoot and image will run as root",
                    }
                }
            )
        ),
        "ktrace-agent",
    )
    assert state.state == "ended" and state.error is not None
    assert "runAsNonRoot and image will run as root" in state.error.message


def test_crash_reports_last_words() -> None:
    words = "ktrace-agent: error: unrecognized arguments: --token-sha256 abc"
    state = agent_state(
        pod(container({"terminated": {"exitCode": 2, "reason": "Error", "message": "\n" + words + "\n"}})),
        "ktrace-agent",
    )
    assert state.state == "ended" and state.error is not None
    assert state.error.message == f"the agent in pod ns/ktrace-agent-1 exited with code 2: {words}"
    assert state.error.hint is not None and "not an agent image of this ktrace version" in state.error.hint
    oom = agent_state(pod(container({"terminated": {"exitCode": 137, "reason": "OOMKilled"}})), "ktrace-agent")
    assert oom.error is not None and "(OOMKilled)" in oom.error.message
    long = agent_state(pod(container({"terminated": {"exitCode": 1, "message": "x" * 5000}})), "ktrace-agent")
    assert long.error is not None and len(long.error.message) < 400


def test_deleted_pod() -> None:
    state = agent_state(pod(container({"running": {}}), deleting=True), "ktrace-agent")
    assert state.state == "ended" and state.error is not None
    assert "the agent pod ns/ktrace-agent-1 is being deleted" in state.error.message


def test_pod_failed_without_container_status() -> None:
    state = agent_state(pod({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}), "ktrace-agent")
    assert state.error is not None and "Evicted: low on memory" in state.error.message


def test_ephemeral_container_states() -> None:
    running = pod(container({"running": {}}, key="ephemeralContainerStatuses"), ephemeral=True)
    assert agent_state(running, "ktrace-agent", ephemeral=True).running
    # The same pod, read as a regular container, has no status for it.
    assert not agent_state(running, "ktrace-agent").running
    done = pod(
        container(
            {"terminated": {"exitCode": 0, "message": "ktrace-agent: idle, exiting"}}, key="ephemeralContainerStatuses"
        ),
        ephemeral=True,
    )
    state = agent_state(done, "ktrace-agent", ephemeral=True)
    assert state.error is not None
    assert "ephemeral container ktrace-agent of pod ns/ktrace-agent-1 exited with code 0" in state.error.message
    assert state.error.hint is not None and "--agent-idle-exit" in state.error.hint


def test_an_ephemeral_agent_killed_for_memory_names_the_pods_limit() -> None:
    killed = pod(
        container({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, key="ephemeralContainerStatuses"),
        ephemeral=True,
    )
    state = agent_state(killed, "ktrace-agent", ephemeral=True)
    assert state.error is not None and "(OOMKilled)" in state.error.message
    assert state.error.hint is not None and "shares the target pod's memory limit" in state.error.hint
