"""The kube checks of ``ktrace doctor`` as its lines (pure): what is wrong in the message, what to
do in the fix, never one inside the other. tests/kube/test_kube_agent.py::test_doctor_checks runs
the checks against the real cluster."""

from __future__ import annotations

from ktrace.doctor import Status
from ktrace.kube.doctor import KubeCheck, review_check
from ktrace.kube.rights import RIGHTS

CREATE_PODS = next(r for r in RIGHTS if r.name == "create pods")
FIX = "kubectl apply -n team-a -f docs/rbac.yaml (as a namespace admin; bind the Role to your user)"


def test_a_missing_right_carries_its_fix_apart_from_the_message() -> None:
    check = review_check("kube right: create pods", CREATE_PODS, "team-a", True, {"allowed": False, "reason": "no"})
    assert not check.ok and check.required
    assert check.message == "not allowed in namespace team-a (no); needed to start the agent pod."
    assert check.fix == FIX
    result = check.result()
    assert (result.status, result.detail, result.fix) == (Status.FAIL, check.message, FIX)
    assert result.line().endswith(f"needed to start the agent pod. (fix: {FIX})")


def test_a_missing_right_only_some_features_need_is_a_warning_with_its_fix() -> None:
    status = {"allowed": False, "evaluationError": "webhook down"}
    check = review_check("kube right: x (for target)", CREATE_PODS, "team-a", False, status)
    assert check.message == "not allowed in namespace team-a (webhook down); needed to start the agent pod."
    assert (check.result().status, check.result().fix) == (Status.WARN, FIX)


def test_an_allowed_right_has_no_fix() -> None:
    check = review_check("kube right: create pods", CREATE_PODS, "team-a", True, {"allowed": True})
    assert check == KubeCheck("kube right: create pods", True, "allowed in namespace team-a: start the agent pod")
    assert check.result().status is Status.OK and check.result().fix is None


def test_a_message_that_says_fix_stays_whole() -> None:
    """The fix used to be parsed back out of the message at " Fix: ": a message of the API
    server's own that contains those words must reach the line unchanged."""
    check = KubeCheck("kube API server", False, "proxy says: Fix: nothing to see", fix=None)
    assert check.result().detail == "proxy says: Fix: nothing to see" and check.result().fix is None
