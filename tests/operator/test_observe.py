"""Reading what matters out of a raw Pod."""

from __future__ import annotations

from ftoperator.observe import leftover_reason, observe_child, observe_pod


def raw_pod(phase, *, conditions=(), containers=(), reason=None, deleting=False, labels=None):
    meta = {"name": "demo-sft-1", "creationTimestamp": "2025-01-01T12:00:00Z",
            "labels": labels if labels is not None else {"finetune.dev/stage": "sft", "finetune.dev/attempt": "1"}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T12:01:00Z"
    status = {"phase": phase, "conditions": list(conditions), "containerStatuses": list(containers)}
    if reason:
        status["reason"] = reason
    return {"metadata": meta, "status": status}


def test_unschedulable_pod_carries_the_schedulers_message():
    pod = observe_pod(raw_pod("Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]))
    assert pod.unschedulable == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    assert pod.active and (pod.stage, pod.attempt) == ("sft", 1)


def test_a_pod_held_by_a_queue_scheduling_gate_waits_for_resources():
    raw = raw_pod("Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                                          "message": "Scheduling is blocked due to non-empty scheduling gates"}])
    raw["spec"] = {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]}
    pod = observe_pod(raw)
    assert "kueue.x-k8s.io/admission" in pod.unschedulable and pod.active


def test_failed_pod_keeps_reason_exit_code_and_termination_message_together():
    with_message = observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {
        "exitCode": 1, "reason": "Error", "message": "sft: dataset /data/x.jsonl line 3: missing 'prompt'\n"}}}]))
    assert with_message.failure == "Error (exit code 1): sft: dataset /data/x.jsonl line 3: missing 'prompt'"
    assert with_message.exit_code == 1 and not with_message.active and not with_message.permanent
    bare = observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]))
    assert bare.failure == "OOMKilled (exit code 137)"


def test_oomkilled_reason_survives_a_log_tail_message():
    # FallbackToLogsOnError: the kubelet puts the log tail into the message of a killed container.
    pod = observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {
        "exitCode": 137, "reason": "OOMKilled", "message": "[ppo] progress 12/500 loss=0.31\n"}}}]))
    assert (pod.reason, pod.exit_code, pod.message) == ("OOMKilled", 137, "[ppo] progress 12/500 loss=0.31")
    assert pod.failure.startswith("OOMKilled (exit code 137): ")


def test_permanent_errors_are_recognised_by_exit_code_or_message_prefix():
    by_code = observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {
        "exitCode": 3, "reason": "Error", "message": "PermanentError: prompts.jsonl:4: missing field 'prompt'"}}}]))
    assert by_code.permanent and by_code.message == "prompts.jsonl:4: missing field 'prompt'"
    # accelerate launch exits 1 whatever its processes returned; the message still says it.
    by_prefix = observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {
        "exitCode": 1, "reason": "Error", "message": "PermanentError: model hf://org/x: not found"}}}]))
    assert by_prefix.permanent
    retryable = observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]))
    assert not retryable.permanent


def test_disruption_target_condition_and_kubelet_rejection_are_disruptions():
    preempted = observe_pod(raw_pod("Failed", conditions=[{
        "type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
        "message": "Preempted to accommodate a higher priority pod"}], containers=[{"state": {"terminated": {
            "exitCode": 143, "reason": "Error"}}}]))
    assert preempted.disrupted and not preempted.permanent
    rejected = observe_pod(raw_pod("Failed", reason="OutOfnvidia.com/gpu"))
    assert rejected.disrupted and rejected.reason == "OutOfnvidia.com/gpu"


def test_memory_limit_image_and_readiness_are_read_from_the_pod():
    raw = raw_pod("Running", conditions=[{"type": "Ready", "status": "False"}], deleting=True)
    raw["spec"] = {"containers": [{"name": "trainer", "image": "trainer:1",
                                   "resources": {"limits": {"memory": "64Gi"}}}]}
    pod = observe_pod(raw)
    assert (pod.image, pod.memory_limit, pod.ready) == ("trainer:1", "64Gi", False)
    assert pod.deletion_time.isoformat() == "2025-01-01T12:01:00+00:00"


def test_long_failure_messages_keep_their_end():
    text = "x" * 5000 + "THE REASON"
    pod = observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {"exitCode": 1, "message": text}}}]))
    assert len(pod.message) <= 1000 and pod.failure.endswith("THE REASON")


def test_evicted_pod_is_a_disruption():
    pod = observe_pod(raw_pod("Failed", reason="Evicted"))
    assert pod.disrupted and pod.failure.startswith("Evicted")
    assert not observe_pod(raw_pod("Failed", containers=[{"state": {"terminated": {"exitCode": 1}}}])).disrupted


def test_image_pull_trouble_is_reported_while_pending():
    pod = observe_pod(raw_pod("Pending", containers=[{"state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "pull access denied"}}}]))
    assert pod.waiting == "ImagePullBackOff: pull access denied"
    assert pod.waiting_reason == "ImagePullBackOff"


def test_deleting_pod_is_not_active_and_foreign_pods_are_ignored():
    assert not observe_pod(raw_pod("Running", deleting=True)).active
    assert observe_pod(raw_pod("Running", labels={"app": "other"})) is None
    assert observe_pod(raw_pod("Running", labels={"finetune.dev/stage": "sft", "finetune.dev/attempt": "x"})) is None


def child(*, uid="uid-1", deleting=False, kind="ServiceAccount"):
    meta = {"name": "demo-trainer", "ownerReferences": [{"uid": "someone", "controller": False}]}
    if uid is not None:
        meta["ownerReferences"].append({"uid": uid, "controller": True})
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T12:01:00Z"
    return observe_child({"kind": kind, "metadata": meta})


def test_a_child_is_the_runs_own_only_if_the_run_controls_it_and_it_is_not_being_deleted():
    assert child().controller_uid == "uid-1"
    assert leftover_reason(child(), "uid-1") is None
    assert "belongs to another owner (uid uid-0)" in leftover_reason(child(uid="uid-0"), "uid-1")
    assert "not owned by this run" in leftover_reason(child(uid=None), "uid-1")
    assert leftover_reason(child(deleting=True), "uid-1") == "ServiceAccount demo-trainer is being deleted"


def test_the_runs_own_pod_being_deleted_is_not_a_leftover():
    assert leftover_reason(child(kind="Pod", deleting=True), "uid-1") is None
    assert leftover_reason(child(kind="Pod", uid="uid-0"), "uid-1") is not None
