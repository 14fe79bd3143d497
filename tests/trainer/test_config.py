"""The trainer's config models hold every cross-field rule once: the webhook and the trainer both run them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainer.config import PPOConfig, RewardFunction, parse_hub_source


def error_of(cls, **settings) -> str:
    with pytest.raises(ValidationError) as raised:
        cls.model_validate(settings)
    return raised.value.errors()[0]["msg"]


def test_response_length_must_leave_room_for_the_prompt():
    message = error_of(PPOConfig, maxSeqLengthTokens=128, responseLengthTokens=200)
    assert "responseLengthTokens (200) leaves 0 of maxSeqLengthTokens (128) for the prompt" in message
    assert "at least 8" in message
    PPOConfig.model_validate({"maxSeqLengthTokens": 128, "responseLengthTokens": 120})


def test_batch_must_divide_into_minibatches_and_those_into_accumulation_steps():
    assert "batchSize (8) must be divisible by miniBatches (3)" in error_of(PPOConfig, batchSize=8, miniBatches=3)
    message = error_of(PPOConfig, batchSize=8, miniBatches=2, gradientAccumulationSteps=3)
    assert "batchSize / miniBatches = 4) must be divisible by gradientAccumulationSteps (3)" in message
    PPOConfig.model_validate({"batchSize": 8, "miniBatches": 2, "gradientAccumulationSteps": 2})


def test_regex_reward_must_compile():
    message = error_of(RewardFunction, type="regex", pattern="(cats")
    assert "pattern '(cats' is not a valid Python regular expression" in message


@pytest.mark.parametrize("reference", ["rewards", "rewards:", ":score", "my-pkg:score", "pkg.:score", "a:b:c"])
def test_python_reward_reference_must_be_module_colon_function(reference):
    assert "is not of the form module:function" in error_of(RewardFunction, type="python", function=reference)


def test_python_reward_reference_may_be_dotted():
    assert RewardFunction(type="python", function="team.rewards_v2:score").function == "team.rewards_v2:score"


def test_hub_source_without_a_revision_has_none():
    assert parse_hub_source("hf://gpt2").revision is None
    assert parse_hub_source("hf://org/name@v1.0").revision == "v1.0"
    with pytest.raises(ValueError, match="cannot contain '--'"):
        parse_hub_source("hf://org/a--b")
