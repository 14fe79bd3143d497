"""The pure validation shared by the admission webhook and the reconciler."""

from __future__ import annotations

import pytest

from ftoperator.validation import describe, validate_admission, validate_spec


def errors_of(spec, **kwargs):
    kwargs.setdefault("max_gpus_per_stage", 8)
    _, errors = validate_spec(spec, **kwargs)
    return {e.field: e.message for e in errors}


def test_the_reference_spec_is_valid(spec):
    assert errors_of(spec) == {}


def test_ppo_without_any_reward_source_is_rejected(spec):
    del spec["stages"]["reward"]
    errors = errors_of(spec)
    assert set(errors) == {"spec.stages.ppo"}
    assert "no reward" in errors["spec.stages.ppo"]


def test_ppo_with_a_disabled_reward_stage_and_no_functions_is_rejected(spec):
    spec["stages"]["reward"]["enabled"] = False
    assert "spec.stages.ppo" in errors_of(spec)


def test_ppo_with_reward_functions_only_is_valid(spec):
    del spec["data"]["preferences"]
    spec["stages"]["reward"] = {"functions": [{"type": "keywords", "keywords": ["thanks"]}]}
    assert errors_of(spec) == {}


@pytest.mark.parametrize(("stage", "dataset"), [("sft", "sft"), ("ppo", "prompts")])
def test_enabled_stage_without_its_dataset_is_rejected(spec, stage, dataset):
    del spec["data"][dataset]
    errors = errors_of(spec)
    assert f"spec.data.{dataset}" in errors
    assert f"spec.stages.{stage} is enabled" in errors[f"spec.data.{dataset}"]


def test_reward_stage_without_preferences_or_functions_is_rejected(spec):
    del spec["data"]["preferences"]
    del spec["stages"]["ppo"]
    assert "spec.data.preferences" in errors_of(spec)


def test_disabled_stage_needs_no_dataset(spec):
    del spec["data"]["sft"]
    spec["stages"]["sft"]["enabled"] = False
    assert errors_of(spec) == {}


def test_no_enabled_stage_is_rejected(spec):
    spec["stages"] = {}
    assert "spec.stages" in errors_of(spec)


def test_more_gpus_than_the_operator_allows_is_rejected_naming_the_stage_field(spec):
    spec["stages"]["ppo"]["resources"] = {"gpus": 16}
    errors = errors_of(spec, max_gpus_per_stage=8)
    assert set(errors) == {"spec.stages.ppo.resources.gpus"}
    assert "at most 8" in errors["spec.stages.ppo.resources.gpus"]


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("gpus", -1, "greater than or equal to 0"),
    ("memory", "-1Gi", "negative"),
    ("memory", "lots", "not a Kubernetes quantity"),
    ("cpu", "0", "zero"),
])
def test_impossible_resources_are_rejected(spec, field, value, expected):
    spec["resources"][field] = value
    errors = errors_of(spec)
    assert expected in errors[f"spec.resources.{field}"]


def test_integer_cpu_is_a_quantity(spec):
    spec["resources"]["cpu"] = 4
    assert errors_of(spec) == {}


def test_schema_errors_carry_kubernetes_field_paths(spec):
    spec["stages"]["ppo"]["miniBatches"] = 3  # batchSize 8 is not divisible by 3
    spec["stages"]["reward"]["functions"] = [{"type": "length"}]
    spec["stages"]["sft"]["epochz"] = 1
    errors = errors_of(spec)
    assert "divisible" in errors["spec.stages.ppo"]
    assert "targetLengthTokens" in errors["spec.stages.reward.functions[0]"]
    assert "spec.stages.sft.epochz" in errors


def test_bad_uris_are_rejected(spec):
    spec["model"]["source"] = "s3://bucket/model"
    spec["data"]["sft"] = "relative/path.jsonl"
    assert {"spec.model.source", "spec.data.sft"} <= set(errors_of(spec))


def test_missing_image_without_an_operator_default_is_rejected(spec):
    del spec["image"]
    assert errors_of(spec, default_image="trainer:1") == {}
    assert "spec.image" in errors_of(spec, default_image=None)


# ----------------------------------------------------------------------------- admission UPDATE

ACTIVE = {"startTime": "2025-01-01T00:00:00Z", "state": "Running",
          "stages": {"sft": {"state": "Running", "attempts": 1}, "reward": {"state": "Pending"}}}


def admit(old, new, old_status, operation="UPDATE"):
    return validate_admission(operation=operation, new_spec=new, old_spec=old, old_status=old_status,
                              max_gpus_per_stage=8, default_image="trainer:1")


def test_changing_the_model_of_an_active_run_is_rejected(spec):
    new = {**spec, "model": {"source": "pvc://models/other"}}
    errors = admit(spec, new, ACTIVE)
    assert [e.field for e in errors] == ["spec.model"]
    assert "cannot change while the run is active" in describe(errors)


def test_changing_a_started_stage_is_rejected_but_a_pending_stage_may_change(spec):
    new = {**spec, "stages": {**spec["stages"], "sft": {"epochs": 3}, "reward": {"epochs": 2}}}
    assert [e.field for e in admit(spec, new, ACTIVE)] == ["spec.stages.sft"]


def test_resources_suspend_and_backoff_may_change_while_active(spec):
    new = {**spec, "suspend": True, "backoffLimit": 5, "resources": {"gpus": 2},
           "stages": {**spec["stages"], "sft": {**spec["stages"]["sft"], "resources": {"gpus": 1}}}}
    assert admit(spec, new, ACTIVE) == []


def test_everything_may_change_before_start_and_after_the_end(spec):
    new = {**spec, "model": {"source": "pvc://models/other"}}
    assert admit(spec, new, None) == []
    assert admit(spec, new, {**ACTIVE, "state": "Succeeded"}) == []


def test_create_is_checked_like_any_spec(spec):
    del spec["data"]["prompts"]
    assert [e.field for e in admit(None, spec, None, operation="CREATE")] == ["spec.data.prompts"]


def test_update_that_leaves_the_spec_alone_is_admitted_even_if_the_spec_is_invalid(spec):
    del spec["data"]["prompts"]  # admitted while the webhook was off
    assert admit(spec, dict(spec), ACTIVE) == [], "finalizer and label updates must never be blocked"


# ----------------------------------------------------------------------------- caught at kubectl apply (issue 9)


@pytest.mark.parametrize(("toleration", "expected"), [
    ({"key": "gpu", "operator": "Exists", "value": "yes"}, "must be empty when operator is Exists"),
    ({"key": "gpu", "operator": "Equal", "value": "a", "tolerationSeconds": 30}, "only allowed with effect NoExecute"),
    ({"operator": "Equal", "value": "a"}, "an empty key needs operator Exists"),
    ({"key": "bad key!", "operator": "Exists"}, "the name must be at most 63 characters"),
    ({"key": "gpu", "value": "not valid!"}, "value 'not valid!' must be"),
])
def test_tolerations_are_checked_as_the_pod_api_checks_them(spec, toleration, expected):
    spec["tolerations"] = [{"key": "ok", "operator": "Exists"}, toleration]
    errors = errors_of(spec)
    assert set(errors) == {"spec.tolerations[1]"}
    assert expected in errors["spec.tolerations[1]"]


def test_valid_tolerations_are_admitted(spec):
    spec["tolerations"] = [{"operator": "Exists"},
                           {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                           {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                            "tolerationSeconds": 60},
                           {"key": "team", "value": "ml", "effect": "NoSchedule"}]
    assert errors_of(spec) == {}


def test_node_selector_keys_and_values_are_label_syntax(spec):
    spec["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert errors_of(spec) == {}
    spec["nodeSelector"] = {"Bad_Prefix.com/x": "y"}
    assert "prefix before '/' must be a DNS subdomain" in errors_of(spec)["spec.nodeSelector"]
    spec["nodeSelector"] = {"gpu": "a b"}
    assert "value 'a b'" in errors_of(spec)["spec.nodeSelector"]


@pytest.mark.parametrize(("memory", "hint"), [("500m", "500Mi"), ("512", "512Mi"), ("64Mi", "64Gi")])
def test_memory_below_the_floor_is_refused_with_a_hint(spec, memory, hint):
    spec["stages"]["ppo"]["resources"] = {"memory": memory}
    message = errors_of(spec)["spec.stages.ppo.resources.memory"]
    assert f"did you mean {hint}?" in message and "256Mi" in message


def test_a_maximum_of_gpus_per_pod_is_on_by_default():
    from ftoperator.config import OperatorConfig

    assert OperatorConfig().max_gpus_per_stage == 8


def test_gpus_above_the_default_maximum_are_refused(spec):
    from ftoperator.config import OperatorConfig

    spec["resources"]["gpus"] = 64
    _, errors = validate_spec(spec, max_gpus_per_stage=OperatorConfig().max_gpus_per_stage)
    assert [e.field for e in errors] == ["spec.resources.gpus"]


@pytest.mark.parametrize("source", ["hf://gpt2", "hf://org/name", "hf://org/name@v1.2", "hf://org/name@refs/pr/3",
                                    "hf://EleutherAI/pythia-70m@a1b2c3d"])
def test_every_valid_hub_id_and_an_optional_revision_is_admitted(spec, source):
    spec["model"]["source"] = source
    assert errors_of(spec) == {}


@pytest.mark.parametrize("source", ["hf://a/b/c", "hf://org/-x", "hf://org/a--b", "hf://org/name@", "hf://"])
def test_invalid_hub_ids_are_refused_naming_the_field(spec, source):
    spec["model"]["source"] = source
    assert "spec.model.source" in errors_of(spec)


def test_trainer_rules_are_refused_at_apply_naming_the_stage(spec):
    spec["stages"]["reward"]["functions"] = [{"type": "regex", "pattern": "(cats"},
                                             {"type": "python", "function": "rewards"}]
    spec["stages"]["ppo"].update(maxSeqLengthTokens=128, responseLengthTokens=200)
    errors = errors_of(spec)
    assert "pattern '(cats' is not a valid Python regular expression" in errors["spec.stages.reward.functions[0].pattern"]
    assert "module:function" in errors["spec.stages.reward.functions[1].function"]
    assert "responseLengthTokens (200)" in errors["spec.stages.ppo"]


# ----------------------------------------------------------------------------- the policy stage (issue 12)


def grpo_spec(spec, **settings):
    """SFT, a numericAnswer reward function and GRPO (no reward model)."""
    del spec["data"]["preferences"]
    spec["stages"]["reward"] = {"functions": [{"type": "numericAnswer"}]}
    spec["stages"].pop("ppo")
    spec["stages"]["grpo"] = {"steps": 10, "batchSize": 8, "groupSize": 4, **settings}
    return spec


def dpo_spec(spec):
    """SFT then DPO on the preference pairs."""
    for stage in ("reward", "ppo"):
        spec["stages"].pop(stage)
    del spec["data"]["prompts"]
    spec["stages"]["dpo"] = {"beta": 0.1}
    return spec


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_with_reward_functions_are_valid(spec, algorithm):
    assert errors_of(grpo_spec(spec, algorithm=algorithm)) == {}


def test_grpo_with_a_trained_reward_model_only_is_valid(spec):
    spec["stages"]["grpo"] = spec["stages"].pop("ppo")
    assert errors_of(spec) == {}


def test_dpo_after_sft_is_valid(spec):
    assert errors_of(dpo_spec(spec)) == {}


def test_two_policy_stages_are_refused_naming_the_second(spec):
    spec["stages"]["dpo"] = {}
    errors = errors_of(spec)
    assert errors["spec.stages.dpo"] == (
        "cannot run together with spec.stages.ppo: a run has one policy-optimisation stage (ppo, grpo, dpo). "
        "Remove one of them or set its enabled: false")


def test_a_disabled_second_policy_stage_is_fine(spec):
    spec["stages"]["grpo"] = {"enabled": False}
    assert errors_of(spec) == {}


def test_dpo_without_preference_pairs_is_refused(spec):
    dpo_spec(spec)
    del spec["data"]["preferences"]
    assert errors_of(spec) == {"spec.data.preferences": (
        "required because spec.stages.dpo is enabled (or set spec.stages.dpo.enabled: false)")}


@pytest.mark.parametrize("reward", [{"epochs": 1}, {"functions": [{"type": "keywords", "keywords": ["x"]}]}],
                         ids=["reward-model", "reward-functions"])
def test_dpo_with_an_enabled_reward_stage_is_refused_as_unused(spec, reward):
    dpo_spec(spec)["stages"]["reward"] = reward
    errors = errors_of(spec)
    assert set(errors) == {"spec.stages.reward"}
    assert errors["spec.stages.reward"].startswith("DPO uses no reward model and no reward functions")
    assert "remove spec.stages.reward or set spec.stages.reward.enabled: false" in errors["spec.stages.reward"]
    spec["stages"]["reward"]["enabled"] = False
    assert errors_of(spec) == {}


@pytest.mark.parametrize(("algorithm", "name"), [("grpo", "GRPO"), ("rloo", "RLOO")])
def test_grpo_or_rloo_without_any_reward_source_is_refused_naming_the_stage(spec, algorithm, name):
    grpo_spec(spec, algorithm=algorithm)
    del spec["stages"]["reward"]
    errors = errors_of(spec)
    assert set(errors) == {"spec.stages.grpo"}
    assert errors["spec.stages.grpo"].startswith(f"{name} has no reward: enable spec.stages.reward with "
                                                 "spec.data.preferences to train a reward model, or set "
                                                 "spec.stages.reward.functions")


def test_grpo_without_prompts_is_refused(spec):
    grpo_spec(spec)
    del spec["data"]["prompts"]
    assert errors_of(spec) == {"spec.data.prompts": (
        "required because spec.stages.grpo is enabled (or set spec.stages.grpo.enabled: false)")}


def test_group_size_that_does_not_divide_the_batch_is_refused_naming_the_stage(spec):
    errors = errors_of(grpo_spec(spec, batchSize=6, groupSize=4))
    assert errors == {"spec.stages.grpo": "batchSize (6) must be divisible by groupSize (4): each prompt is "
                                          "sampled groupSize times"}


def test_an_unknown_algorithm_is_refused_naming_the_field(spec):
    errors = errors_of(grpo_spec(spec, algorithm="ppo"))
    assert "'grpo' or 'rloo'" in errors["spec.stages.grpo.algorithm"]


def test_no_enabled_stage_lists_every_stage(spec):
    spec["stages"] = {"dpo": {"enabled": False}}
    assert errors_of(spec)["spec.stages"] == "no stage is enabled; list at least one of sft, reward, ppo, grpo, dpo"


def test_reward_functions_are_frozen_once_grpo_started(spec):
    grpo_spec(spec)
    status = {"startTime": "2025-01-01T00:00:00Z", "state": "Running",
              "stages": {"sft": {"state": "Succeeded"}, "reward": {"state": "Skipped"},
                         "grpo": {"state": "Running", "attempts": 1}}}
    new = {**spec, "stages": {**spec["stages"], "reward": {"functions": [{"type": "exactAnswer"}]}}}
    assert [e.field for e in admit(spec, new, status)] == ["spec.stages.reward.functions"]


def test_the_policy_stage_cannot_be_switched_once_it_started(spec):
    status = {"startTime": "2025-01-01T00:00:00Z", "state": "Running",
              "stages": {"sft": {"state": "Succeeded"}, "reward": {"state": "Succeeded"},
                         "ppo": {"state": "Running", "attempts": 1}}}
    new = {**spec, "stages": {**{k: v for k, v in spec["stages"].items() if k != "ppo"},
                              "grpo": spec["stages"]["ppo"]}}
    fields = [e.field for e in admit(spec, new, status)]
    assert "spec.stages.ppo" in fields


def test_sharded_stages_are_admitted_with_and_without_lora_and_fp16_sharding_is_refused_naming_the_stage(spec):
    spec["stages"]["ppo"]["fsdp"] = {}
    assert errors_of(spec) == {}
    spec["stages"]["ppo"]["lora"] = {}
    assert errors_of(spec) == {}
    spec["stages"]["ppo"]["precision"] = "fp16"
    assert "fsdp cannot be combined with precision fp16" in errors_of(spec)["spec.stages.ppo"]
    spec["stages"]["ppo"]["precision"] = "bf16"
    spec["stages"]["sft"].update(fsdp={}, lora={"rank": 8})
    spec["stages"]["reward"].update(fsdp={"cpuOffload": True}, lora={})
    assert errors_of(spec) == {}
    assert errors_of(grpo_spec(spec, fsdp={"cpuOffload": True}, lora={})) == {}
