"""The stage plan: which stages have a pod, in what order, and what each one reads."""

from __future__ import annotations

import pytest

from ftoperator.stageplan import Skip, Step, plan
from ftoperator.validation import parse_spec


def planned(raw):
    spec, errors = parse_spec(raw)
    assert not errors, errors
    return plan(spec)


def as_grpo(spec, **settings):
    """The reference spec with its ppo stage replaced by grpo."""
    spec["stages"].pop("ppo")
    spec["stages"]["grpo"] = {"steps": 10, **settings}
    return spec


def as_dpo(spec):
    """SFT then DPO on the preference pairs: no reward stage, no prompts."""
    spec["stages"].pop("ppo")
    spec["stages"].pop("reward")
    spec["data"].pop("prompts")
    spec["stages"]["dpo"] = {"beta": 0.1}
    return spec


def test_three_stage_ppo_chains_sft_into_reward_and_ppo_with_the_reward_model(spec):
    stages = planned(spec)
    assert stages.steps == (
        Step("sft", model_from=None, reward_model_from=None, dataset="sft"),
        Step("reward", model_from="sft", reward_model_from=None, dataset="preferences"),
        Step("ppo", model_from="sft", reward_model_from="reward", dataset="prompts"),
    )
    assert stages.last == "ppo" and stages.skipped == () and stages.policy_stages == ("ppo",)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_take_the_ppo_place_with_the_same_inputs(spec, algorithm):
    stages = planned(as_grpo(spec, algorithm=algorithm))
    assert stages.stages == ("sft", "reward", "grpo")
    assert stages.step("grpo") == Step("grpo", model_from="sft", reward_model_from="reward", dataset="prompts")


def test_grpo_with_reward_functions_only_skips_the_reward_pod_and_names_grpo_as_their_user(spec):
    del spec["data"]["preferences"]
    spec["stages"]["reward"] = {"functions": [{"type": "numericAnswer"}]}
    stages = planned(as_grpo(spec))
    assert stages.stages == ("sft", "grpo")
    assert stages.step("grpo").reward_model_from is None
    assert stages.skip("reward") == Skip("reward", "NoPreferenceData", "no spec.data.preferences: no reward "
                                         "model is trained; grpo uses the reward functions")
    assert [f.type for f in stages.reward_functions] == ["numericAnswer"]


def test_dpo_starts_from_the_sft_output_reads_the_preferences_and_no_reward_model(spec):
    stages = planned(as_dpo(spec))
    assert stages.stages == ("sft", "dpo")
    assert stages.step("dpo") == Step("dpo", model_from="sft", reward_model_from=None, dataset="preferences")


def test_without_sft_every_stage_starts_from_the_base_model(spec):
    spec["stages"]["sft"]["enabled"] = False
    stages = planned(spec)
    assert stages.stages == ("reward", "ppo")
    assert [step.model_from for step in stages.steps] == [None, None]
    assert stages.skip("sft") == Skip("sft", "Disabled", "spec.stages.sft.enabled is false")

    dpo_only = planned({**spec, "stages": {"dpo": {}}})
    assert dpo_only.steps == (Step("dpo", model_from=None, reward_model_from=None, dataset="preferences"),)


def test_a_disabled_reward_stage_trains_nothing_but_its_functions_still_score(spec):
    spec["stages"]["reward"] = {"enabled": False, "functions": [{"type": "keywords", "keywords": ["cats"]}]}
    stages = planned(spec)
    assert stages.stages == ("sft", "ppo")
    assert stages.step("ppo").reward_model_from is None and stages.reward_functions


def test_unlisted_stages_are_neither_run_nor_skipped(spec):
    stages = planned({**spec, "stages": {"sft": {}}})
    assert stages.stages == ("sft",) and stages.skipped == ()


def test_two_enabled_policy_stages_are_both_reported_for_the_validator_to_refuse(spec):
    spec["stages"]["dpo"] = {}
    spec["stages"]["grpo"] = {"enabled": False}
    stages = planned(spec)
    assert stages.policy_stages == ("ppo", "dpo")
    assert stages.skip("grpo").reason == "Disabled"


def test_step_of_a_stage_that_does_not_run_names_what_runs(spec):
    with pytest.raises(KeyError, match="stage dpo does not run in this plan .runs: sft, reward, ppo."):
        planned(spec).step("dpo")


def test_reward_functions_without_an_online_stage_are_skipped_saying_nothing_uses_them(spec):
    del spec["data"]["preferences"]
    stages = planned({**spec, "stages": {"sft": {}, "reward": {"functions": [{"type": "numericAnswer"}]}}})
    assert stages.stages == ("sft",)
    assert stages.skip("reward").message == ("no spec.data.preferences: no reward model is trained; "
                                             "no enabled stage uses the reward functions")
