"""Every transition of the pure reconcile function ``ftoperator.decide.decide``."""

from __future__ import annotations

from dataclasses import replace

import yaml

from ftoperator import builders, naming
from ftoperator.api import dump
from ftoperator.decide import CreateObject, DeletePod, decide
from ftoperator.observe import ObservedChild


def owned_children(run, pods):
    """What a started run owns: its access objects, progress ConfigMap, and each observed pod with its ConfigMap."""
    children = [ObservedChild(obj["kind"], obj["metadata"]["name"], run.uid)
                for obj in builders.run_infrastructure(run)]
    for p in pods:
        children.append(ObservedChild("Pod", p.name, run.uid, deleting=p.deleting))
        children.append(ObservedChild("ConfigMap", naming.stage_config_map_name(run.name, p.stage), run.uid))
    return children


def reconcile(spec, status, pods, *, run, config, at, children=None):
    """One pass; returns (decision, status as the API would store it).

    ``children`` defaults to what a started run owns (``owned_children``); pass ``[]`` for a brand-new run.
    """
    if children is None:
        children = owned_children(run, pods)
    decision = decide(run=run, spec=spec, status=status, pods=pods, children=children, now=at, config=config)
    return decision, dump(decision.status)


def created(decision, kind="Pod"):
    return [a.name for a in decision.actions if isinstance(a, CreateObject) and a.kind == kind]


def deleted(decision):
    return [a.name for a in decision.actions if isinstance(a, DeletePod)]


def reasons(decision):
    return [e.reason for e in decision.events]


def condition(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def job_of(decision, stage):
    config_map = next(a.obj for a in decision.actions
                      if isinstance(a, CreateObject) and a.kind == "ConfigMap" and a.name == f"demo-{stage}-job")
    return yaml.safe_load(config_map["data"]["job.yaml"])


def output_dir_env(decision, pod_name):
    pod = next(a.obj for a in decision.actions if isinstance(a, CreateObject) and a.name == pod_name)
    env = pod["spec"]["containers"][0]["env"]
    return next(e["value"] for e in env if e["name"] == "FINETUNE_OUTPUT_DIR")


# ----------------------------------------------------------------------------- start


def test_fresh_run_sets_every_condition_and_creates_access_objects_then_the_sft_pod(spec, run, config, now):
    decision, status = reconcile(spec, None, [], run=run, config=config, at=now(), children=[])

    assert [c["type"] for c in status["conditions"]] == [
        "Succeeded", "Running", "WaitingForResources", "Suspended", "Failed"]
    assert condition(status, "Succeeded")["status"] == "Unknown"
    assert all(condition(status, t)["status"] == "False" for t in ("Running", "Failed", "Suspended"))
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert status["observedGeneration"] == 1
    assert status["state"] == "Pending" and status["currentStage"] == "sft"
    kinds = [(a.kind, a.name) for a in decision.actions]
    assert kinds == [
        ("ServiceAccount", "demo-trainer"), ("Role", "demo-trainer"), ("RoleBinding", "demo-trainer"),
        ("ConfigMap", "demo-progress"), ("ConfigMap", "demo-history"), ("ConfigMap", "demo-sft-job"),
        ("Pod", "demo-sft-1")]
    assert status["stages"]["sft"]["state"] == "Starting"
    assert status["stages"]["sft"]["attempts"] == 1
    assert status["stages"]["reward"]["state"] == "Pending"
    assert reasons(decision) == ["StageStarted"]
    assert set(status["specDigests"]) == {
        "spec.model", "spec.data", "spec.artifacts", "spec.image", "spec.stages.sft"}
    assert status["specDigestsGeneration"] == 1


def test_deciding_twice_from_an_unsaved_status_asks_for_the_same_objects(spec, run, config, now):
    first, _ = reconcile(spec, None, [], run=run, config=config, at=now(), children=[])
    second, _ = reconcile(spec, None, [], run=run, config=config, at=now(1), children=[])
    assert [(a.kind, a.name) for a in first.actions] == [(a.kind, a.name) for a in second.actions]


def test_restarted_operator_adopts_the_pod_whose_status_was_never_saved(spec, run, config, now, pod):
    # The pod exists but the status patch that recorded it was lost.
    decision, status = reconcile(spec, None, [pod("sft", 1, "Running")], run=run, config=config, at=now())
    assert created(decision) == []
    assert status["stages"]["sft"]["attempts"] == 1
    assert status["stages"]["sft"]["state"] == "Running"


# ----------------------------------------------------------------------------- children: missing and leftovers


def leftovers_of_a_deleted_run(run, uid="uid-old"):
    """What a deleted run of the same name leaves until the garbage collector removes it."""
    old = [ObservedChild(obj["kind"], obj["metadata"]["name"], uid) for obj in builders.run_infrastructure(run)]
    return old + [ObservedChild("ConfigMap", "demo-sft-job", uid), ObservedChild("Pod", "demo-sft-1", uid)]


def test_recreated_run_creates_nothing_while_a_deleted_runs_children_with_its_names_remain(spec, run, config, now):
    decision, status = reconcile(spec, None, [], run=run, config=config, at=now(),
                                 children=leftovers_of_a_deleted_run(run))

    assert decision.actions == []
    assert status["state"] == "Pending" and status.get("startTime") is None
    assert "ServiceAccount demo-trainer belongs to another owner (uid uid-old)" in status["message"]
    assert "(and 4 more)" in status["message"]
    assert condition(status, "Succeeded")["reason"] == "WaitingForCleanup"
    assert reasons(decision) == ["WaitingForCleanup"]
    assert decision.requeue_after == 1.0

    again, status = reconcile(spec, status, [], run=run, config=config, at=now(1),
                              children=leftovers_of_a_deleted_run(run))
    assert again.actions == [] and again.events == [], "the same wait is announced once"


def test_recreated_run_creates_all_its_children_once_the_leftovers_are_gone(spec, run, config, now):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now(), children=leftovers_of_a_deleted_run(run))
    # The garbage collector has removed some: still waiting for the rest.
    remaining = [c for c in leftovers_of_a_deleted_run(run) if c.kind in ("Pod", "RoleBinding")]
    decision, status = reconcile(spec, status, [], run=run, config=config, at=now(2), children=remaining)
    assert decision.actions == []

    decision, status = reconcile(spec, status, [], run=run, config=config, at=now(4), children=[])
    assert [(a.kind, a.name) for a in decision.actions] == [
        ("ServiceAccount", "demo-trainer"), ("Role", "demo-trainer"), ("RoleBinding", "demo-trainer"),
        ("ConfigMap", "demo-progress"), ("ConfigMap", "demo-history"), ("ConfigMap", "demo-sft-job"),
        ("Pod", "demo-sft-1")]
    assert all(a.obj["metadata"]["ownerReferences"][0]["uid"] == run.uid for a in decision.actions)
    assert status["stages"]["sft"]["state"] == "Starting" and status["startTime"] is not None


def test_an_unowned_object_with_a_child_name_holds_the_run_and_says_to_delete_it(spec, run, config, now):
    decision, status = reconcile(spec, None, [], run=run, config=config, at=now(),
                                 children=[ObservedChild("ServiceAccount", "demo-trainer", None)])
    assert decision.actions == []
    assert "ServiceAccount demo-trainer exists but is not owned by this run" in status["message"]
    assert "delete any that stays" in status["message"]


def test_a_missing_child_of_a_running_run_is_created_again(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now(), children=[])
    running = [pod("sft", 1, "Running")]
    without_account = [c for c in owned_children(run, running) if c.kind != "ServiceAccount"]
    decision, status = reconcile(spec, status, running, run=run, config=config, at=now(5), children=without_account)
    assert [(a.kind, a.name) for a in decision.actions] == [("ServiceAccount", "demo-trainer")]
    assert status["state"] == "Running"


def test_a_pending_pods_missing_stage_config_map_is_created_again(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now(), children=[])
    pending = [pod("sft", 1, "Pending")]
    without_job = [c for c in owned_children(run, pending) if c.name != "demo-sft-job"]
    decision, _ = reconcile(spec, status, pending, run=run, config=config, at=now(5), children=without_job)
    assert [(a.kind, a.name) for a in decision.actions] == [("ConfigMap", "demo-sft-job")]


def test_the_runs_own_config_map_being_deleted_is_waited_for_then_created_again(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now(), children=[])
    running = [pod("sft", 1, "Running")]
    children = [ObservedChild(c.kind, c.name, c.controller_uid, deleting=c.name == "demo-progress")
                for c in owned_children(run, running)]
    decision, status = reconcile(spec, status, running, run=run, config=config, at=now(5), children=children)
    assert decision.actions == [] and "ConfigMap demo-progress is being deleted" in status["message"]

    gone = [c for c in children if c.name != "demo-progress"]
    decision, status = reconcile(spec, status, running, run=run, config=config, at=now(6), children=gone)
    assert [(a.kind, a.name) for a in decision.actions] == [("ConfigMap", "demo-progress")]
    assert status["state"] == "Running" and condition(status, "Succeeded")["reason"] == "StageRunning"


# ----------------------------------------------------------------------------- pod phases


def test_unschedulable_pod_makes_the_run_wait_for_resources_with_the_schedulers_message(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    waiting = pod("sft", 1, "Pending", unschedulable=message)
    decision, status = reconcile(spec, status, [waiting], run=run, config=config, at=now(5))

    assert status["state"] == "WaitingForResources"
    assert condition(status, "WaitingForResources")["status"] == "True"
    assert condition(status, "WaitingForResources")["message"] == message
    assert condition(status, "Running")["status"] == "False"
    assert reasons(decision) == ["WaitingForResources"]
    assert message in decision.events[0].message

    again, _ = reconcile(spec, status, [waiting], run=run, config=config, at=now(10))
    assert again.events == [], "the event is posted once per transition"


def test_pending_pod_that_is_scheduled_is_starting(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Pending")], run=run, config=config, at=now(1))
    assert status["stages"]["sft"]["state"] == "Starting"
    assert status["state"] == "Pending"


def test_image_pull_error_is_the_runs_waiting_reason_with_the_image_and_fails_the_stage_after_the_timeout(
        spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    stuck = pod("sft", 1, "Pending", waiting="ImagePullBackOff: pull access denied", waiting_reason="ImagePullBackOff",
                image="ghcr.io/example/trainer:typo")
    decision, status = reconcile(spec, status, [stuck], run=run, config=config, at=now(1))
    assert "cannot pull image ghcr.io/example/trainer:typo: ImagePullBackOff: pull access denied" in status["message"]
    assert status["stages"]["sft"]["reason"] == "ImagePullBackOff"
    assert reasons(decision) == ["ImagePullFailed"]
    assert decision.requeue_after == 600
    again, status = reconcile(spec, status, [stuck], run=run, config=config, at=now(300))
    assert again.events == [] and status["state"] == "Pending"

    final, status = reconcile(spec, status, [stuck], run=run, config=config, at=now(601))
    assert status["state"] == "Failed"
    assert status["stages"]["sft"]["reason"] == "ImagePullFailed"
    assert "ghcr.io/example/trainer:typo" in condition(status, "Failed")["message"]
    assert deleted(final) == ["demo-sft-1"]


def test_running_pod_makes_the_run_running_and_records_the_start_latency(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    decision, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(7))
    assert status["state"] == "Running"
    assert condition(status, "Running")["status"] == "True"
    assert condition(status, "Succeeded")["status"] == "Unknown"
    assert decision.pod_start_seconds == [("sft", 7.0)]
    assert [(t.stage, t.from_state, t.to_state) for t in decision.transitions] == [("sft", "Starting", "Running")]

    again, _ = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(9))
    assert again.pod_start_seconds == [] and again.actions == [] and again.events == []


def test_succeeded_pod_completes_the_stage_and_starts_the_next_in_the_same_pass(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    decision, status = reconcile(spec, status, [pod("sft", 1, "Succeeded")], run=run, config=config, at=now(60))

    sft = status["stages"]["sft"]
    assert sft["state"] == "Succeeded"
    assert sft["artifact"] == "pvc://runs/team-a/demo/sft/final"
    assert created(decision) == ["demo-reward-1"]
    assert reasons(decision) == ["StageSucceeded", "StageStarted"]
    assert decision.stage_durations == [("sft", "Succeeded", 60.0)]
    assert status["currentStage"] == "reward"
    assert job_of(decision, "reward")["model"] == "/artifacts/team-a/demo/sft/final"


def test_all_stages_succeeded_makes_the_run_succeeded(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [pod("sft", 1, "Succeeded")]
    _, status = reconcile(spec, status, pods, run=run, config=config, at=now(1))
    pods.append(pod("reward", 1, "Succeeded"))
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(2))
    assert job_of(decision, "ppo")["rewardModel"] == "/artifacts/team-a/demo/reward/final"
    pods.append(pod("ppo", 1, "Succeeded"))
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(3))

    assert status["state"] == "Succeeded"
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Running")["status"] == "False"
    assert status["completionTime"] == "2025-01-01T12:00:03Z"
    assert reasons(decision) == ["StageSucceeded", "RunSucceeded"]
    assert "pvc://runs/team-a/demo/ppo/final" in status["message"]

    idle, _ = reconcile(spec, status, pods, run=run, config=config, at=now(4))
    assert idle.actions == [] and idle.events == []


# ----------------------------------------------------------------------------- skipping


def test_disabled_sft_is_skipped_and_reward_starts_from_the_base_model(spec, run, config, now):
    spec["stages"]["sft"]["enabled"] = False
    decision, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert status["stages"]["sft"]["state"] == "Skipped"
    assert status["stages"]["sft"]["reason"] == "Disabled"
    assert created(decision) == ["demo-reward-1"]
    assert job_of(decision, "reward")["model"] == "/data/models/base-1b"


def test_reward_functions_without_preferences_skip_the_reward_pod_and_reach_ppo(spec, run, config, now, pod):
    del spec["data"]["preferences"]
    spec["stages"]["reward"] = {"functions": [{"type": "length", "targetLengthTokens": 20, "weight": 0.5}]}
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert status["stages"]["reward"]["state"] == "Skipped"
    assert status["stages"]["reward"]["reason"] == "NoPreferenceData"
    decision, status = reconcile(spec, status, [pod("sft", 1, "Succeeded")], run=run, config=config, at=now(1))
    assert created(decision) == ["demo-ppo-1"]
    job = job_of(decision, "ppo")
    assert job["rewardModel"] is None
    assert job["reward"]["functions"][0]["targetLengthTokens"] == 20


def test_grpo_run_skips_the_reward_pod_runs_grpo_after_sft_and_ends_on_its_model(spec, run, config, now, pod):
    del spec["data"]["preferences"]
    spec["stages"]["reward"] = {"functions": [{"type": "numericAnswer"}]}
    spec["stages"]["grpo"] = {"algorithm": "rloo", "steps": 5, "batchSize": 8, "groupSize": 4}
    del spec["stages"]["ppo"]
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert (status["stages"]["reward"]["state"], status["stages"]["reward"]["message"]) == (
        "Skipped", "no spec.data.preferences: no reward model is trained; grpo uses the reward functions")
    assert status["stages"]["grpo"]["state"] == "Pending" and "ppo" not in status["stages"]
    decision, status = reconcile(spec, status, [pod("sft", 1, "Succeeded")], run=run, config=config, at=now(1))
    assert created(decision) == ["demo-grpo-1"]
    job = job_of(decision, "grpo")
    assert (job["stage"], job["grpo"]["algorithm"], job["rewardModel"]) == ("grpo", "rloo", None)
    assert job["reward"]["functions"][0]["type"] == "numericAnswer"
    decision, status = reconcile(spec, status, [pod("sft", 1, "Succeeded"), pod("grpo", 1, "Succeeded")],
                                 run=run, config=config, at=now(2))
    assert status["state"] == "Succeeded" and status["currentStage"] == "grpo"
    assert status["message"] == "all stages succeeded; final model at pvc://runs/team-a/demo/grpo/final"


def test_dpo_run_goes_from_sft_to_dpo_on_the_preferences(spec, run, config, now, pod):
    for stage in ("reward", "ppo"):
        del spec["stages"][stage]
    spec["stages"]["dpo"] = {"beta": 0.1}
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert set(status["stages"]) == {"sft", "dpo"}
    decision, status = reconcile(spec, status, [pod("sft", 1, "Succeeded")], run=run, config=config, at=now(1))
    assert created(decision) == ["demo-dpo-1"]
    job = job_of(decision, "dpo")
    assert (job["model"], job["data"]["preferences"]) == ("/artifacts/team-a/demo/sft/final",
                                                          "/data/datasets/prefs.jsonl")


def test_two_policy_stages_fail_the_run_as_invalid_when_the_webhook_is_off(spec, run, config, now):
    spec["stages"]["dpo"] = {}
    decision, status = reconcile(spec, None, [], run=run, config=config, at=now(), children=[])
    assert status["state"] == "Failed" and created(decision) == []
    assert condition(status, "Failed")["reason"] == "InvalidSpec"
    assert "spec.stages.dpo: cannot run together with spec.stages.ppo" in condition(status, "Failed")["message"]


def test_unlisted_stage_has_no_status(spec, run, config, now):
    del spec["stages"]["ppo"]
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert "ppo" not in status["stages"]


# ----------------------------------------------------------------------------- failures


def test_failed_pod_is_retried_with_the_same_output_dir_until_backoff_limit_then_the_run_fails(
        spec, run, config, now, pod):
    spec["backoffLimit"] = 1
    first, status = reconcile(spec, None, [], run=run, config=config, at=now())
    failed = pod("sft", 1, "Failed", reason="Error", message="CUDA out of memory", exit_code=1)
    backing_off, status = reconcile(spec, status, [failed], run=run, config=config, at=now(10))
    assert created(backing_off) == [], "a failure is retried after a backoff, not at once"
    assert reasons(backing_off) == ["StageRetrying"]
    assert "Error (exit code 1): CUDA out of memory" in backing_off.events[0].message
    assert backing_off.retries == [("sft", "failure")]
    assert backing_off.requeue_after == 10
    assert status["stages"]["sft"]["state"] == "BackingOff"
    assert status["stages"]["sft"]["retryAfter"] == "2025-01-01T12:00:20Z"
    assert status["stages"]["sft"]["lastFailure"] == {
        "attempt": 1, "pod": "demo-sft-1", "reason": "Error", "exitCode": 1, "message": "CUDA out of memory",
        "permanent": False, "time": "2025-01-01T12:00:10Z"}
    early, status = reconcile(spec, status, [failed], run=run, config=config, at=now(15))
    assert early.actions == [] and early.events == [] and status["stages"]["sft"]["failures"] == 1

    retry, status = reconcile(spec, status, [failed], run=run, config=config, at=now(20))
    assert created(retry) == ["demo-sft-2"]
    assert reasons(retry) == ["StageStarted"]
    assert status["stages"]["sft"]["failures"] == 1
    assert status["stages"]["sft"]["attempts"] == 2
    # The retry reuses the stage's ConfigMap (it exists), so it reads the same output directory and resumes.
    assert created(retry, "ConfigMap") == []
    assert job_of(first, "sft")["outputDir"] == output_dir_env(retry, "demo-sft-2") == "/artifacts/team-a/demo/sft"

    pods = [failed, pod("sft", 2, "Failed", reason="Error", message="CUDA out of memory again", exit_code=1)]
    final, status = reconcile(spec, status, pods, run=run, config=config, at=now(30))
    assert created(final) == []
    assert status["state"] == "Failed"
    assert status["stages"]["sft"]["state"] == "Failed"
    assert status["stages"]["sft"]["reason"] == "BackoffLimitExceeded"
    assert condition(status, "Failed") | {"lastTransitionTime": None} == {
        "type": "Failed", "status": "True", "reason": "StageFailed",
        "message": "stage sft failed 2 times (spec.backoffLimit 1); last: Error (exit code 1): CUDA out of memory again",
        "lastTransitionTime": None, "observedGeneration": 1}
    assert condition(status, "Succeeded")["status"] == "False"
    assert reasons(final) == ["StageFailed", "RunFailed"]
    assert final.stage_durations == [("sft", "Failed", 30.0)]


def test_vanished_pod_gets_a_new_attempt_that_does_not_count_against_backoff(spec, run, config, now, pod):
    spec["backoffLimit"] = 0
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    decision, status = reconcile(spec, status, [], run=run, config=config, at=now(2))
    assert created(decision) == ["demo-sft-2"]
    assert status["stages"]["sft"]["failures"] == 0
    assert status["stages"]["sft"]["disruptions"] == 1
    assert reasons(decision) == ["StageRetrying"]
    assert decision.retries == [("sft", "disruption")]


def test_evicted_pod_is_a_disruption_not_a_failure(spec, run, config, now, pod):
    spec["backoffLimit"] = 0
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    evicted = pod("sft", 1, "Failed", reason="Evicted", message="node out of memory", disrupted=True)
    decision, status = reconcile(spec, status, [evicted], run=run, config=config, at=now(1))
    assert created(decision) == ["demo-sft-2"]
    assert status["state"] != "Failed"
    assert status["stages"]["sft"]["disruptions"] == 1 and status["stages"]["sft"]["failures"] == 0
    assert status["stages"]["sft"]["lastFailure"]["reason"] == "Evicted"
    assert reasons(decision) == ["StageRetrying"]


def test_pod_being_deleted_is_waited_for_whatever_its_phase(spec, run, config, now, pod):
    spec["backoffLimit"] = 0
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    dying = pod("sft", 1, "Failed", reason="Error", exit_code=143, deleting=True)
    decision, status = reconcile(spec, status, [dying], run=run, config=config, at=now(1))
    assert decision.actions == []
    assert status["stages"]["sft"]["failures"] == 0


def test_stale_pod_of_an_older_attempt_is_deleted(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [pod("sft", 1, "Running"), pod("sft", 2, "Running")]
    decision, _ = reconcile(spec, status, pods, run=run, config=config, at=now(1))
    assert deleted(decision) == ["demo-sft-1"]


# ----------------------------------------------------------------------------- suspend and resume


def test_suspend_deletes_the_pod_and_resume_starts_a_new_attempt(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))

    spec["suspend"] = True
    suspended, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(2))
    assert deleted(suspended) == ["demo-sft-1"]
    assert reasons(suspended) == ["RunSuspended"]
    assert status["state"] == "Suspended"
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Running")["status"] == "False"
    assert status["stages"]["sft"]["state"] == "Suspended"

    still, status = reconcile(spec, status, [], run=run, config=config, at=now(3))
    assert still.events == [] and still.actions == []

    spec["suspend"] = False
    resumed, status = reconcile(spec, status, [], run=run, config=config, at=now(4))
    assert reasons(resumed) == ["RunResumed", "StageStarted"]
    assert created(resumed) == ["demo-sft-2"]
    assert condition(status, "Suspended")["status"] == "False"
    assert condition(status, "Suspended")["reason"] == "Resumed"
    assert status["state"] == "Pending", "the summary must not keep saying Suspended (Kubeflow #3666)"
    assert status["stages"]["sft"]["failures"] == 0
    assert status["activeSince"] == "2025-01-01T12:00:04Z"


def test_run_created_suspended_creates_nothing_until_resumed(spec, run, config, now):
    spec["suspend"] = True
    decision, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert decision.actions == []
    assert status["state"] == "Suspended"
    spec["suspend"] = False
    decision, status = reconcile(spec, status, [], run=run, config=config, at=now(1))
    assert created(decision) == ["demo-sft-1"]


# ----------------------------------------------------------------------------- deadline


def test_active_deadline_requeues_before_and_fails_the_run_after(spec, run, config, now, pod):
    spec["activeDeadlineSeconds"] = 100
    first, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert first.requeue_after == 100
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(40))
    decision, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(100))
    assert deleted(decision) == ["demo-sft-1"]
    assert status["state"] == "Failed"
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds" in condition(status, "Failed")["message"]
    assert status["stages"]["sft"]["state"] == "Failed"


def test_finished_run_only_cleans_up_leftover_pods(spec, run, config, now, pod):
    spec["activeDeadlineSeconds"] = 1
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(5))
    decision, _ = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(6))
    assert decision.events == []
    assert deleted(decision) == ["demo-sft-1"]


# ----------------------------------------------------------------------------- invalid specs


def test_invalid_spec_fails_the_run_with_the_field_name_when_the_webhook_is_off(spec, run, config, now):
    del spec["data"]["prompts"]
    decision, status = reconcile(spec, None, [], run=run, config=config, at=now())
    assert decision.actions == []
    assert status["state"] == "Failed"
    assert condition(status, "Failed")["reason"] == "InvalidSpec"
    assert "spec.data.prompts" in condition(status, "Failed")["message"]


def test_fixing_an_invalid_spec_that_never_ran_starts_the_run(spec, run, config, now):
    broken = {**spec, "data": {}}
    _, status = reconcile(broken, None, [], run=run, config=config, at=now())
    fixed_run = type(run)(run.name, run.namespace, run.uid, generation=2)
    decision, status = reconcile(spec, status, [], run=fixed_run, config=config, at=now(1))
    assert created(decision) == ["demo-sft-1"]
    assert status["state"] == "Pending"


def test_changing_a_frozen_field_while_running_fails_the_run_naming_the_field(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    spec["model"]["source"] = "pvc://models/other"
    edited = replace(run, generation=2)  # the API server bumps the generation on every spec change
    decision, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=edited, config=config, at=now(2))
    assert deleted(decision) == ["demo-sft-1"]
    assert status["state"] == "Failed"
    assert condition(status, "Failed")["message"].startswith("spec.model: cannot change")


def test_mutable_fields_may_change_while_running(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    spec["backoffLimit"] = 5
    spec["resources"]["memory"] = "32Gi"
    spec["stages"]["sft"]["resources"] = {"gpus": 2}
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    assert status["state"] == "Running"


# ----------------------------------------------------------------------------- conditions


def test_condition_transition_time_moves_only_when_the_status_changes(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(10))
    running_since = condition(status, "Running")["lastTransitionTime"]
    failed_since = condition(status, "Failed")["lastTransitionTime"]
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(20))
    assert condition(status, "Running")["lastTransitionTime"] == running_since == "2025-01-01T12:00:10Z"
    assert condition(status, "Failed")["lastTransitionTime"] == failed_since == "2025-01-01T12:00:00Z"
