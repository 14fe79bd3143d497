"""Operator upgrades and spec edits: frozen fields judged by what the user changed, edits that would
break an active stage refused with a reason, status fields of newer versions kept."""

from __future__ import annotations

import copy
from dataclasses import replace

from ftoperator.api import FineTuneRunStatus, keep_unknown_fields
from ftoperator.validation import field_digest, parse_spec, validate_admission

from .test_decide import condition, reconcile


def admit(old, new, old_status):
    return validate_admission(operation="UPDATE", new_spec=new, old_spec=old, old_status=old_status,
                              max_gpus_per_stage=8, default_image="trainer:1")


def test_a_setting_added_with_its_default_does_not_change_a_digest(spec):
    before, _ = parse_spec(spec)
    explicit = copy.deepcopy(spec)
    explicit["stages"]["ppo"]["ppoEpochs"] = 4  # the default, now written out (as the API server's defaulting does)
    after, _ = parse_spec(explicit)
    assert field_digest(before, "spec.stages.ppo") == field_digest(after, "spec.stages.ppo")


def test_digests_of_an_older_operator_are_replaced_not_compared(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    status["specDigests"] = {field: "0000digest-of-a-dump-with-defaults" for field in status["specDigests"]}
    del status["specDigestsGeneration"]
    upgraded = replace(run, generation=3)
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=upgraded, config=config, at=now(2))
    assert status["state"] == "Running"
    assert status["specDigestsGeneration"] == 3
    assert "0000digest-of-a-dump-with-defaults" not in status["specDigests"].values()


def test_an_unchanged_generation_never_fails_the_run_even_if_the_spec_reads_differently(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    spec["stages"]["sft"]["warmupSteps"] = 0  # a default the API server filled in from a newer CRD
    spec["stages"]["sft"]["seed"] = 7  # even a real difference is not judged while the generation stays
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(2))
    assert status["state"] == "Running"


def test_a_user_edit_of_a_started_stage_fails_the_run_without_the_webhook(spec, run, config, now, pod):
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=run, config=config, at=now(1))
    spec["stages"]["sft"]["epochs"] = 3
    _, status = reconcile(spec, status, [pod("sft", 1, "Running")], run=replace(run, generation=2), config=config,
                          at=now(2))
    assert status["state"] == "Failed"
    assert condition(status, "Failed")["message"].startswith("spec.stages.sft: cannot change")


RAN = {"startTime": "2025-01-01T00:00:00Z", "state": "Running",
       "stages": {"sft": {"state": "Running", "attempts": 1, "runningTime": "2025-01-01T00:01:00Z"},
                  "reward": {"state": "Pending"}, "ppo": {"state": "Pending"}}}


def test_a_gpu_change_that_changes_the_process_count_of_a_running_stage_is_refused(spec):
    new = copy.deepcopy(spec)
    new["resources"]["gpus"] = 4
    errors = admit(spec, new, RAN)
    assert [e.field for e in errors] == ["spec.stages.sft.resources.gpus"]
    assert "number of trainer processes" in errors[0].message and "runs 1 trainer process" in errors[0].message
    # The same GPU count for a stage that has not started is fine.
    new = copy.deepcopy(spec)
    new["stages"]["ppo"]["resources"] = {"gpus": 4}
    assert admit(spec, new, RAN) == []


def test_a_node_count_change_of_a_running_stage_is_refused_but_allowed_before_its_pods_ran(spec):
    new = copy.deepcopy(spec)
    new["resources"]["nodes"] = 2
    errors = admit(spec, new, RAN)
    assert [e.field for e in errors] == ["spec.stages.sft.resources.gpus"]
    assert "resources.nodes" in errors[0].message and "runs 1 trainer process" in errors[0].message
    # A gang that never ran (waiting for placement, say) may shrink to one pod.
    waiting = copy.deepcopy(RAN)
    waiting["stages"]["sft"] = {"state": "WaitingForResources", "attempts": 1}
    assert admit(new, spec, waiting) == []


def test_enabling_a_skipped_stage_after_a_later_stage_started_is_refused(spec):
    spec["stages"]["sft"]["enabled"] = False
    status = {"startTime": "2025-01-01T00:00:00Z", "state": "Running",
              "stages": {"sft": {"state": "Skipped"}, "reward": {"state": "Running", "attempts": 1}}}
    new = copy.deepcopy(spec)
    new["stages"]["sft"]["enabled"] = True
    errors = admit(spec, new, status)
    assert [e.field for e in errors] == ["spec.stages.sft"]
    assert "cannot be enabled now" in errors[0].message


def test_reward_functions_are_frozen_once_ppo_started(spec):
    del spec["data"]["preferences"]
    spec["stages"]["reward"] = {"functions": [{"type": "keywords", "keywords": ["thanks"]}]}
    status = {"startTime": "2025-01-01T00:00:00Z", "state": "Running",
              "stages": {"sft": {"state": "Succeeded"}, "reward": {"state": "Skipped"},
                         "ppo": {"state": "Running", "attempts": 1}}}
    new = copy.deepcopy(spec)
    new["stages"]["reward"]["functions"][0]["keywords"] = ["please"]
    errors = admit(spec, new, status)
    assert [e.field for e in errors] == ["spec.stages.reward.functions"]
    assert "ppo or grpo stage has started" in errors[0].message


def test_status_fields_this_operator_does_not_know_are_kept():
    old = {"state": "Running", "futureField": {"a": 1}, "stages": {"sft": {"state": "Running", "gpuHours": 3.5}},
           "conditions": []}
    new = {"state": "Running", "stages": {"sft": {"state": "Succeeded"}}}
    merged = keep_unknown_fields(old, new)
    assert merged == {"state": "Running", "futureField": {"a": 1},
                      "stages": {"sft": {"state": "Succeeded", "gpuHours": 3.5}}}
    FineTuneRunStatus.model_validate(merged)  # and this operator still reads it
