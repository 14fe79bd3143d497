"""What can go wrong on a real cluster, decided purely: refused creates, OOM kills, permanent errors,
backoff, disruptions, pods stuck on lost nodes. docs/operator.md's table "what can go wrong" lists these."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ftoperator.config import OperatorConfig
from ftoperator.decide import CreateObject, DeletePod, RefusedCreate, decide

from .test_decide import condition, created, deleted, reasons, reconcile

QUOTA = ('pods "demo-sft-1" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1, '
         'used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4')


def refused_pass(spec, status, pods, *, run, config, at, refused, children=None):
    from .test_decide import owned_children
    from ftoperator.api import dump

    decision = decide(run=run, spec=spec, status=status, pods=pods,
                      children=owned_children(run, pods) if children is None else children, now=at, config=config,
                      refused=refused)
    return decision, dump(decision.status)


# ----------------------------------------------------------------------------- refused creates


def test_a_refused_create_on_the_first_pass_still_gives_the_run_a_full_status_event_and_deadline(
        spec, run, config, now):
    spec["activeDeadlineSeconds"] = 3600
    refusal = RefusedCreate("Pod", "demo-sft-1", 403, QUOTA)
    decision, status = refused_pass(spec, None, [], run=run, config=config, at=now(), refused=refusal, children=[])

    assert decision.actions == [], "the pass after a refusal creates nothing"
    assert [c["type"] for c in status["conditions"]] == [
        "Succeeded", "Running", "WaitingForResources", "Suspended", "Failed"]
    succeeded = condition(status, "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("Unknown", "FailedCreate")
    assert "refused to create Pod demo-sft-1 (HTTP 403): " + QUOTA in succeeded["message"]
    assert status["state"] == "Pending" and status["currentStage"] == "sft"
    assert status["startTime"] == status["activeSince"] == "2025-01-01T12:00:00Z", "the deadline clock runs"
    assert status["failedCreate"] == {"kind": "Pod", "name": "demo-sft-1", "code": 403, "message": QUOTA, "count": 1,
                                      "retryAfter": "2025-01-01T12:00:10Z"}
    assert status["stages"]["sft"]["attempts"] == 0, "no attempt is recorded for a pod that does not exist"
    assert reasons(decision) == ["FailedCreate"]
    assert decision.events[0].type == "Warning" and QUOTA in decision.events[0].message
    assert decision.requeue_after == 10


def test_creates_wait_for_the_backoff_then_a_success_clears_the_refusal(spec, run, config, now):
    _, status = refused_pass(spec, None, [], run=run, config=config, at=now(), children=[],
                             refused=RefusedCreate("Pod", "demo-sft-1", 403, QUOTA))
    waiting, status = reconcile(spec, status, [], run=run, config=config, at=now(5), children=[])
    assert waiting.actions == [] and waiting.events == []
    assert condition(status, "Succeeded")["reason"] == "FailedCreate"
    assert waiting.requeue_after == 5

    again, status = refused_pass(spec, status, [], run=run, config=config, at=now(10), children=[],
                                 refused=RefusedCreate("Pod", "demo-sft-1", 403, QUOTA))
    assert status["failedCreate"]["count"] == 2
    assert status["failedCreate"]["retryAfter"] == "2025-01-01T12:00:30Z", "the backoff doubles"

    ok, status = reconcile(spec, status, [], run=run, config=config, at=now(30), children=[])
    assert created(ok) == ["demo-sft-1"]
    assert "failedCreate" not in status
    assert condition(status, "Succeeded")["reason"] == "StageStarting"


def test_refused_creates_count_toward_a_limit_then_fail_the_run(spec, run, now):
    config = OperatorConfig(trainer_image="t", create_retry_limit=2)
    status = None
    for second in (0, 10, 30):
        decision, status = refused_pass(spec, status, [], run=run, config=config, at=now(second), children=[],
                                        refused=RefusedCreate("Pod", "demo-sft-1", 422, "spec.tolerations[0]: bad"))
    assert status["state"] == "Failed"
    failed = condition(status, "Failed")
    assert failed["reason"] == "FailedCreate"
    assert "refused 3 times in a row (--create-retry-limit 2)" in failed["message"]
    assert "spec.tolerations[0]: bad" in failed["message"]
    assert reasons(decision) == ["RunFailed"]


def test_a_refused_create_while_a_pod_runs_still_observes_the_pod(spec, run, config, now, pod):
    # The progress ConfigMap was deleted by someone and its re-create hits a ConfigMap quota.
    _, status = reconcile(spec, None, [], run=run, config=config, at=now(), children=[])
    running = [pod("sft", 1, "Running")]
    _, status = refused_pass(spec, status, running, run=run, config=config, at=now(1),
                             refused=RefusedCreate("ConfigMap", "demo-progress", 403, "exceeded quota: configmaps"))
    assert status["stages"]["sft"]["state"] == "Running"
    assert status["failedCreate"]["kind"] == "ConfigMap"


# ----------------------------------------------------------------------------- termination reasons


def test_oomkilled_says_so_with_the_limit_and_what_to_change_and_the_next_attempt_uses_new_memory(
        spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    oom = pod("sft", 1, "Failed", reason="OOMKilled", exit_code=137, message="[sft] progress 3/10 loss=2.1",
              memory_limit="64Gi")
    decision, status = reconcile(spec, status, [oom], run=run, config=config, at=now(60))

    sft = status["stages"]["sft"]
    assert sft["lastFailure"]["reason"] == "OOMKilled" and sft["lastFailure"]["exitCode"] == 137
    assert sft["reason"] == "OOMKilled"
    event = decision.events[0].message
    assert "OOMKilled: pod demo-sft-1 ran out of memory (limit 64Gi, exit code 137)" in event
    assert "raise spec.resources.memory or spec.stages.sft.resources.memory" in event
    assert "Last log lines: [sft] progress 3/10" in event
    assert status["message"].startswith("sft: OOMKilled")

    spec["resources"]["memory"] = "96Gi"  # edited during the backoff
    retry, status = reconcile(spec, status, [oom], run=run, config=config, at=now(70))
    new_pod = next(a.obj for a in retry.actions if isinstance(a, CreateObject) and a.kind == "Pod")
    assert new_pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "96Gi"


def test_a_permanent_error_fails_the_stage_at_once_without_retries(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    bad_row = pod("sft", 1, "Failed", reason="Error", exit_code=3, permanent=True,
                  message="/data/datasets/sft.jsonl:7: missing field 'completion'")
    decision, status = reconcile(spec, status, [bad_row], run=run, config=config, at=now(5))
    assert created(decision) == []
    assert status["state"] == "Failed"
    assert status["stages"]["sft"]["reason"] == "PermanentError"
    assert status["stages"]["sft"]["failures"] == 1
    assert condition(status, "Failed")["message"] == (
        "stage sft failed: permanent error, not retried: Error (exit code 3): "
        "/data/datasets/sft.jsonl:7: missing field 'completion'")


def test_backoff_grows_with_every_failure_and_is_capped(spec, run, now, pod):
    config = OperatorConfig(trainer_image="t", retry_base_seconds=10, retry_max_seconds=25)
    spec["backoffLimit"] = 5
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods, clock, delays = [], 0, []
    for attempt in (1, 2, 3):
        pods.append(pod("sft", attempt, "Failed", reason="Error", exit_code=1))
        clock += 1
        decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(clock))
        delays.append(decision.requeue_after)
        clock += decision.requeue_after
        decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(clock))
        assert created(decision) == [f"demo-sft-{attempt + 1}"]
    assert delays == [10, 20, 25]


# ----------------------------------------------------------------------------- disruptions


def test_disruptions_have_their_own_budget(spec, run, config, now, pod):
    spec["disruptionLimit"] = 1
    spec["backoffLimit"] = 0
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [pod("sft", 1, "Failed", reason="Evicted", message="The node was low on memory.", disrupted=True)]
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(1))
    assert created(decision) == ["demo-sft-2"] and decision.retries == [("sft", "disruption")]
    pods.append(pod("sft", 2, "Failed", reason="PreemptionByScheduler", disrupted=True))
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(2))
    assert status["state"] == "Failed"
    assert status["stages"]["sft"]["reason"] == "DisruptionLimitExceeded"
    assert "disrupted 2 times (spec.disruptionLimit 1)" in condition(status, "Failed")["message"]
    assert status["stages"]["sft"]["failures"] == 0


def test_a_pod_stuck_terminating_on_a_lost_node_is_force_deleted_then_replaced(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    stuck = pod("sft", 1, "Running", deleting=True, ready=False, deletion_time=now(100))
    early, status = reconcile(spec, status, [stuck], run=run, config=config, at=now(200))
    assert early.actions == [] and status["stages"]["sft"]["message"] == "pod demo-sft-1 is being deleted"
    assert early.requeue_after == pytest.approx(200)

    late, status = reconcile(spec, status, [stuck], run=run, config=config, at=now(401))
    assert [a for a in late.actions if isinstance(a, DeletePod)] == [DeletePod(
        "demo-sft-1", "still terminating 300s after its grace period on a node that stopped reporting", force=True)]
    assert reasons(late) == ["PodForceDeleted"]

    gone, status = reconcile(spec, status, [], run=run, config=config, at=now(402))
    assert created(gone) == ["demo-sft-2"]
    assert status["stages"]["sft"]["disruptions"] == 1


def test_a_terminating_pod_on_a_live_node_is_never_force_deleted(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    slow = pod("sft", 1, "Running", deleting=True, ready=True, deletion_time=now(0))
    decision, _ = reconcile(spec, status, [slow], run=run, config=config, at=now(10_000))
    assert deleted(decision) == []


def test_a_failure_during_suspension_backoff_resumes_with_the_next_attempt(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    failed = [pod("sft", 1, "Failed", reason="Error", exit_code=1)]
    _, status = reconcile(spec, status, failed, run=run, config=config, at=now(1))
    spec["suspend"] = True
    _, status = reconcile(spec, status, failed, run=run, config=config, at=now(2))
    assert status["stages"]["sft"]["state"] == "Suspended"
    spec["suspend"] = False
    decision, status = reconcile(spec, status, failed, run=run, config=config, at=now(30))
    assert created(decision) == ["demo-sft-2"]
    assert status["stages"]["sft"]["failures"] == 1
