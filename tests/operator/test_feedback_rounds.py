"""Human-feedback rounds in the pure core (``ftoperator.feedback`` through ``decide``): a round opens when the
online stage exits at a boundary, counts labels, retrains the reward model with enough of them, times out
with Continue or Fail, and survives an operator restart."""

from __future__ import annotations

import copy

from ftoperator import builders, naming
from ftoperator.api import dump
from ftoperator.decide import CreateObject, decide
from ftoperator.observe import ObservedChild
from ftoperator.validation import validate_spec
from trainer.config import FEEDBACK_ROUND_ENV, FEEDBACK_ROUND_EXIT_CODE

ROUND_MESSAGE = "FeedbackRound: round 1 after step 100: 8 candidate pairs in ConfigMap demo-feedback-1"


def feedback_spec(spec, **feedback):
    spec["humanFeedback"] = {"everySteps": 100, "labelsNeeded": 4, "timeoutSeconds": 600, **feedback}
    return spec


def children_of(run, spec, pods):
    parsed, _ = validate_spec(spec)
    children = [ObservedChild(o["kind"], o["metadata"]["name"], run.uid)
                for o in builders.run_infrastructure(run, feedback_rounds=builders.feedback_rounds(parsed))]
    for p in pods:
        children.append(ObservedChild("Pod", p.name, run.uid))
        children.append(ObservedChild("ConfigMap", naming.stage_config_map_name(run.name, p.stage), run.uid))
    return children


def step(spec, status, pods, *, run, config, at, labels=None):
    decision = decide(run=run, spec=spec, status=status, pods=pods, children=children_of(run, spec, pods), now=at,
                      config=config, label_counts=labels)
    return decision, dump(decision.status)


def pods_created(decision):
    return [a.obj for a in decision.actions if isinstance(a, CreateObject) and a.kind == "Pod"]


def env_of(pod_obj):
    return {e["name"]: e.get("value") for e in pod_obj["spec"]["containers"][0]["env"]}


def round_opened(spec, *, run, config, now, pod):
    """Passes from a fresh run to the ppo pod exiting at round 1's boundary; returns (pods, status)."""
    done = [pod("sft", 1, "Succeeded"), pod("reward", 1, "Succeeded")]
    status = None
    for pods in ([], done[:1], done):
        _, status = step(spec, status, pods, run=run, config=config, at=now())
    assert status["stages"]["ppo"]["pod"] == "demo-ppo-1"
    pods = done + [pod("ppo", 1, "Failed", exit_code=FEEDBACK_ROUND_EXIT_CODE, message=ROUND_MESSAGE, reason="Error")]
    return pods, status


def test_a_round_opens_when_the_online_stage_exits_at_a_boundary(spec, run, config, now, pod):
    spec = feedback_spec(spec)
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)

    decision, status = step(spec, status, pods, run=run, config=config, at=now(10))

    assert status["state"] == "AwaitingFeedback"
    assert status["stages"]["ppo"]["state"] == "AwaitingFeedback"
    assert status["stages"]["ppo"]["failures"] == 0 and "lastFailure" not in status["stages"]["ppo"]
    [opened] = status["feedbackRounds"]
    assert opened == {"round": 1, "state": "AwaitingLabels", "stage": "ppo", "step": 100, "attempt": 1,
                      "candidates": 8, "labels": 0, "needed": 4, "since": "2025-01-01T12:00:10Z"}
    awaiting = next(c for c in status["conditions"] if c["type"] == "AwaitingFeedback")
    assert awaiting["status"] == "True" and awaiting["message"] == "round 1: 0/4 labels"
    assert pods_created(decision) == []
    assert "FeedbackRoundOpened" in [e.reason for e in decision.events]
    assert decision.requeue_after is not None and decision.requeue_after <= 5  # labels wake no watch: poll


def test_the_round_counts_labels_and_waits_below_labels_needed(spec, run, config, now, pod):
    spec = feedback_spec(spec)
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    _, status = step(spec, status, pods, run=run, config=config, at=now(10))

    decision, status = step(spec, status, pods, run=run, config=config, at=now(20), labels={1: 3, 0: 50})

    assert status["feedbackRounds"][0]["labels"] == 3  # ad-hoc round-0 labels do not count
    assert status["stages"]["ppo"]["message"] == "round 1: 3/4 labels"
    assert pods_created(decision) == []


def test_enough_labels_retrain_the_reward_model_then_resume_the_online_stage(spec, run, config, now, pod):
    spec = feedback_spec(spec)
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    _, status = step(spec, status, pods, run=run, config=config, at=now(10))

    decision, status = step(spec, status, pods, run=run, config=config, at=now(20), labels={1: 4})
    [retrain] = pods_created(decision)
    assert retrain["metadata"]["name"] == "demo-reward-2"
    assert env_of(retrain)[FEEDBACK_ROUND_ENV] == "1"
    assert status["feedbackRounds"][0]["state"] == "Retraining"
    assert status["feedbackRounds"][0]["rewardAttempt"] == 2

    pods = pods + [pod("reward", 2, "Running")]
    decision, status = step(spec, status, pods, run=run, config=config, at=now(30), labels={1: 4})
    assert pods_created(decision) == [] and status["currentStage"] == "reward"

    pods[-1] = pod("reward", 2, "Succeeded")
    status["stages"]["reward"]["metrics"] = {"feedback_round": 1, "human_accuracy_before": 0.5,
                                            "human_accuracy_after": 0.875}
    decision, status = step(spec, status, pods, run=run, config=config, at=now(40), labels={1: 4})
    [resumed] = pods_created(decision)
    assert resumed["metadata"]["name"] == "demo-ppo-2"
    assert FEEDBACK_ROUND_ENV not in env_of(resumed)
    closed = status["feedbackRounds"][0]
    assert closed["state"] == "Done" and closed["heldOutAccuracyBefore"] == 0.5
    assert closed["heldOutAccuracy"] == 0.875 and closed["completionTime"] == "2025-01-01T12:00:40Z"
    assert status["stages"]["ppo"]["failures"] == 0
    assert any("0.50 -> 0.88" in e.message for e in decision.events if e.reason == "FeedbackRoundClosed")

    # The resumed attempt runs and succeeds: the round stays closed and the run succeeds.
    pods = pods + [pod("ppo", 2, "Succeeded")]
    decision, status = step(spec, status, pods, run=run, config=config, at=now(50), labels={1: 4})
    assert status["state"] == "Succeeded" and pods_created(decision) == []


def test_the_round_waits_a_while_for_the_accuracy_to_reach_the_status(spec, run, config, now, pod):
    spec = feedback_spec(spec)
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    _, status = step(spec, status, pods, run=run, config=config, at=now(10))
    _, status = step(spec, status, pods, run=run, config=config, at=now(20), labels={1: 4})
    pods = pods + [pod("reward", 2, "Succeeded")]

    decision, status = step(spec, status, pods, run=run, config=config, at=now(30), labels={1: 4})
    assert pods_created(decision) == [] and decision.requeue_after == 1.0

    decision, status = step(spec, status, pods, run=run, config=config, at=now(70), labels={1: 4})
    assert [p["metadata"]["name"] for p in pods_created(decision)] == ["demo-ppo-2"]
    assert "heldOutAccuracy" not in status["feedbackRounds"][0]


def test_timeout_with_continue_and_no_labels_resumes_with_the_unchanged_reward_model(spec, run, config, now, pod):
    spec = feedback_spec(spec, onTimeout="Continue")
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    _, status = step(spec, status, pods, run=run, config=config, at=now(10))

    decision, status = step(spec, status, pods, run=run, config=config, at=now(10 + 600), labels={})

    assert [p["metadata"]["name"] for p in pods_created(decision)] == ["demo-ppo-2"]
    assert status["feedbackRounds"][0]["state"] == "TimedOut"
    assert "FeedbackRoundTimedOut" in [e.reason for e in decision.events]


def test_timeout_with_continue_and_some_labels_retrains_on_them(spec, run, config, now, pod):
    spec = feedback_spec(spec, onTimeout="Continue")
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    _, status = step(spec, status, pods, run=run, config=config, at=now(10))

    decision, status = step(spec, status, pods, run=run, config=config, at=now(10 + 600), labels={1: 2})

    assert [p["metadata"]["name"] for p in pods_created(decision)] == ["demo-reward-2"]
    assert status["feedbackRounds"][0]["state"] == "Retraining"


def test_timeout_with_fail_fails_the_run_naming_the_setting(spec, run, config, now, pod):
    spec = feedback_spec(spec, onTimeout="Fail")
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    _, status = step(spec, status, pods, run=run, config=config, at=now(10))

    decision, status = step(spec, status, pods, run=run, config=config, at=now(10 + 600), labels={1: 3})

    assert status["state"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "onTimeout is Fail" in failed["message"] and "3/4" in failed["message"]
    assert status["feedbackRounds"][0]["state"] == "Failed"
    assert pods_created(decision) == []


def test_an_operator_restart_mid_round_loses_nothing_and_creates_nothing_twice(spec, run, config, now, pod):
    spec = feedback_spec(spec)
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    _, opened = step(spec, status, pods, run=run, config=config, at=now(10))

    # A new operator decides from the saved status: the round is neither reopened nor restarted.
    _, again = step(spec, copy.deepcopy(opened), pods, run=run, config=config, at=now(15), labels={1: 1})
    assert again["feedbackRounds"][0]["since"] == opened["feedbackRounds"][0]["since"]
    assert len(again["feedbackRounds"]) == 1

    # The status that recorded the retraining pod was lost, the pod exists: the same pod, not a third attempt.
    decision, lost = step(spec, copy.deepcopy(opened), pods, run=run, config=config, at=now(20), labels={1: 4})
    assert [p["metadata"]["name"] for p in pods_created(decision)] == ["demo-reward-2"]
    pods = pods + [pod("reward", 2, "Running")]
    decision, status = step(spec, copy.deepcopy(opened), pods, run=run, config=config, at=now(25), labels={1: 4})
    assert [p["metadata"]["name"] for p in pods_created(decision)] == ["demo-reward-2"]  # 409, adopted as its own
    assert status["stages"]["reward"]["attempts"] == 2

    # The resumed ppo pod exists but its status was lost: the round is closed, no third ppo attempt.
    pods[-1] = pod("reward", 2, "Succeeded")
    status["stages"]["reward"]["metrics"] = {"feedback_round": 1, "human_accuracy_before": 0.5,
                                            "human_accuracy_after": 0.75}
    _, before_resume = step(spec, copy.deepcopy(status), pods, run=run, config=config, at=now(30), labels={1: 4})
    stale = copy.deepcopy(status)
    pods = pods + [pod("ppo", 2, "Running")]
    decision, status = step(spec, stale, pods, run=run, config=config, at=now(35), labels={1: 4})
    assert pods_created(decision) == []
    assert status["stages"]["ppo"]["attempts"] == 2 and status["state"] == "Running"
    assert before_resume["feedbackRounds"][0]["state"] == "Done"


def test_a_failure_that_is_not_a_round_boundary_is_still_a_failure(spec, run, config, now, pod):
    spec = feedback_spec(spec)
    pods, status = round_opened(spec, run=run, config=config, now=now, pod=pod)
    pods[-1] = pod("ppo", 1, "Failed", exit_code=FEEDBACK_ROUND_EXIT_CODE, message="CUDA error", reason="Error")

    _, status = step(spec, status, pods, run=run, config=config, at=now(10))

    assert status["stages"]["ppo"]["failures"] == 1 and status["stages"]["ppo"]["state"] == "BackingOff"
    assert status.get("feedbackRounds", []) == []


def test_the_run_creates_each_rounds_config_map_and_its_role_names_them(spec, run, config, now):
    spec = feedback_spec(spec, everySteps=200)  # ppo.steps 500: rounds after 200 and 400
    decision = decide(run=run, spec=spec, status=None, pods=[], children=[], now=now(), config=config)
    config_maps = [a.name for a in decision.actions if a.kind == "ConfigMap"]
    assert "demo-feedback-1" in config_maps and "demo-feedback-2" in config_maps
    assert "demo-feedback-3" not in config_maps
    role = next(a.obj for a in decision.actions if a.kind == "Role")
    assert role["rules"][0]["resourceNames"][-2:] == ["demo-feedback-1", "demo-feedback-2"]
    assert {"apiGroups": ["finetune.dev"], "resources": ["preferencelabels"], "verbs": ["list"]} in role["rules"]


def test_without_human_feedback_the_role_and_config_maps_are_unchanged(spec, run):
    role = next(o for o in builders.run_infrastructure(run) if o["kind"] == "Role")
    assert len(role["rules"]) == 1 and not any("feedback" in n for n in role["rules"][0]["resourceNames"])


def errors_of(spec):
    _, errors = validate_spec(spec)
    return {e.field: e.message for e in errors}


def test_validation_refuses_human_feedback_with_dpo_and_says_what_to_do_instead(spec):
    spec["stages"] = {"dpo": {"epochs": 1}}
    errors = errors_of(feedback_spec(spec))
    assert "spec.humanFeedback" in errors and "DPO" in errors["spec.humanFeedback"]
    assert "labels export" in errors["spec.humanFeedback"]


def test_validation_needs_a_reward_model_to_retrain(spec):
    del spec["data"]["preferences"]
    spec["stages"]["reward"] = {"functions": [{"type": "length", "targetLengthTokens": 20}]}
    errors = errors_of(feedback_spec(spec))
    assert "reward model to retrain" in errors.get("spec.humanFeedback", ""), errors


def test_validation_needs_a_round_before_the_last_step(spec):
    errors = errors_of(feedback_spec(spec, everySteps=500))
    assert "spec.humanFeedback.everySteps" in errors and "0 for one round" in errors["spec.humanFeedback.everySteps"]
    assert errors_of(feedback_spec(spec, everySteps=0)) == {}


def test_validation_refuses_human_feedback_with_a_multi_pod_online_stage(spec):
    spec["stages"]["ppo"] = {**spec["stages"].get("ppo", {}), "resources": {"nodes": 2}}
    errors = errors_of(feedback_spec(spec))
    assert "several pods per stage" in errors.get("spec.humanFeedback", ""), errors
    assert "ppo" in errors["spec.humanFeedback"]
