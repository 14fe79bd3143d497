"""Heuristic reward functions and the composite reward."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from trainer.config import RewardFunction
from trainer.rewards import CompositeReward, RewardError, build_heuristic, load_normalization


def fn(**kwargs) -> RewardFunction:
    return RewardFunction.model_validate(kwargs)


class WordTokenizer:
    """One token per whitespace-separated word: lengths are easy to state."""

    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_length_reward_is_zero_at_target_and_negative_relative_distance_elsewhere():
    f = build_heuristic(fn(type="length", targetLengthTokens=4), tokenizer=WordTokenizer())
    assert f("p", "a b c d") == 0.0
    assert f("p", "a b") == pytest.approx(-0.5)
    assert f("p", "a b c d e f g h") == pytest.approx(-1.0)


def test_regex_keywords_and_banned_phrases():
    assert build_heuristic(fn(type="regex", pattern=r"\bcats?\b"))("p", "I like cats") == 1.0
    assert build_heuristic(fn(type="regex", pattern=r"\bcats?\b"))("p", "dogs") == 0.0
    kw = build_heuristic(fn(type="keywords", keywords=["Cats", "dogs"]))
    assert kw("p", "CATS are nice") == 0.5
    banned = build_heuristic(fn(type="bannedPhrases", phrases=["as an ai", "sorry"]))
    assert banned("p", "Sorry, as an AI I cannot") == -2.0


def test_bad_regex_is_refused_by_the_config_and_names_the_pattern():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="pattern '\\(' is not a valid Python regular expression"):
        fn(type="regex", pattern="(")


def test_python_reward_is_imported_and_called(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(prompt, response):\n    return float(response.count('!'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = build_heuristic(fn(type="python", function="my_rewards:shout"))
    assert f("p", "hi!!") == 2.0


def test_python_reward_import_error_names_field_and_value():
    with pytest.raises(RewardError, match=r"function='no_such_module_xyz:f'.*cannot import"):
        build_heuristic(fn(type="python", function="no_such_module_xyz:f"))
    with pytest.raises(RewardError, match="has no callable 'nope'"):
        build_heuristic(fn(type="python", function="json:nope"))


@pytest.mark.parametrize("returned, message", [("float('nan')", "finite"), ("'high'", "must return a float"),
                                               ("None", "must return a float")])
def test_user_function_returning_garbage_fails_clearly(tmp_path, monkeypatch, returned, message):
    module = f"bad_rewards_{abs(hash(returned))}"
    (tmp_path / f"{module}.py").write_text(f"def f(prompt, response):\n    return {returned}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = CompositeReward([fn(type="python", function=f"{module}:f")])
    with pytest.raises(RewardError, match=message) as info:
        reward.score(["p"], ["r"])
    assert f"{module}:f" in str(info.value)


def test_composite_sums_weighted_functions():
    reward = CompositeReward([fn(type="keywords", keywords=["cats"], weight=2.0),
                              fn(type="bannedPhrases", phrases=["dogs"], weight=0.5)])
    scores = reward.score(["p", "p"], ["cats", "cats and dogs"])
    assert scores.tolist() == pytest.approx([2.0, 1.5])


def test_composite_needs_something_to_optimise():
    with pytest.raises(RewardError, match="nothing to optimise"):
        CompositeReward([])


class FakeRewardModel(torch.nn.Module):
    """Scores a right-padded sequence by its last real token id (what a sequence classifier reads)."""

    def forward(self, input_ids, attention_mask):
        last = attention_mask.sum(1) - 1
        logits = input_ids[torch.arange(input_ids.shape[0]), last].float().unsqueeze(1)
        return type("Out", (), {"logits": logits})()


class CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_reward_model_score_is_normalised_and_read_at_the_last_token():
    reward = CompositeReward([fn(type="keywords", keywords=["b"])], tokenizer=CharTokenizer(),
                             reward_model=FakeRewardModel(), normalization=(90.0, 4.0), reward_model_weight=0.5)
    # "a"+"b": last char 'b' = 98 -> (98-90)/4 = 2 -> 0.5*2 = 1, plus keyword 1 = 2
    # "a"+"xyz": last 'z' = 122 -> 8 -> 4, keyword 0
    scores = reward.score(["a", "a"], ["b", "xyz"])
    assert scores.tolist() == pytest.approx([2.0, 4.0])


def test_load_normalization(tmp_path):
    assert load_normalization(tmp_path) == (0.0, 1.0)
    (tmp_path / "reward_normalization.json").write_text(json.dumps({"mean": 1.5, "std": 2.0}))
    assert load_normalization(tmp_path) == (1.5, 2.0)
    (tmp_path / "reward_normalization.json").write_text(json.dumps({"mean": 1.5, "std": 0.0}))
    with pytest.raises(RewardError, match="std must be a positive number"):
        load_normalization(tmp_path)


# --------------------------------------------------------------------------- verifiable rewards


@pytest.mark.parametrize("response, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box, nested braces kept
    ("working... #### 17", " 17"),
    ("no marker here", None),
    ("\\boxed{unclosed", None),
])
def test_final_answer_is_the_last_box_else_after_the_last_hashes(response, expected):
    from trainer.rewards import final_answer

    assert final_answer(response) == expected


def test_exact_answer_compares_the_marked_answer_or_the_whole_response():
    f = CompositeReward([fn(type="exactAnswer")])
    responses = ["The capital is \\boxed{Paris}.", " Paris. ", "paris", "Lyon #### Paris", "\\boxed{Lyon} Paris"]
    assert f.score(["q"] * 5, responses, [{"answer": "Paris"}] * 5).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_numeric_answer_reads_the_last_number_with_separators_and_tolerance():
    f = CompositeReward([fn(type="numericAnswer", answerField="solution", tolerance=0.01)])
    responses = ["3 + 4 = 7", "first 7 then 8", "\\boxed{1,000} not 7", "-2.499", "no number", "#### 7.0 apples"]
    rows = [{"solution": "7"}, {"solution": 7}, {"solution": "1000"}, {"solution": "-2.5"}, {"solution": "7"},
            {"solution": 7}]
    assert f.score(["q"] * 6, responses, rows).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_answer_rewards_name_the_missing_field_and_reject_a_non_numeric_answer():
    with pytest.raises(RewardError, match="no field 'answer'.*answerField"):
        CompositeReward([fn(type="exactAnswer")]).score(["q"], ["r"], [{"solution": "1"}])
    with pytest.raises(RewardError, match="'abc', not a number"):
        CompositeReward([fn(type="numericAnswer")]).score(["q"], ["1"], [{"answer": "abc"}])


def test_python_batch_reward_is_called_like_trl_with_every_row_field(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(
        "def correct(prompts, completions, answer, **kwargs):\n"
        "    assert kwargs == {'difficulty': [1, None]}, kwargs\n"
        "    return [1.0 if c.strip() == a else None for c, a in zip(completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = CompositeReward([fn(type="pythonBatch", function="trl_rewards:correct", weight=2.0),
                         fn(type="regex", pattern="4")])
    rows = [{"answer": "4", "difficulty": 1}, {"answer": "5"}]
    # row 0: 2 * 1 + regex 1 = 3; row 1: None (not applicable) counts 0, regex 1
    assert f.score(["2+2", "2+3"], [" 4", "4"], rows).tolist() == [3.0, 1.0]


def test_python_batch_reward_returning_the_wrong_count_fails_naming_it(tmp_path, monkeypatch):
    (tmp_path / "short_rewards.py").write_text("def one(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="pythonBatch:short_rewards:one returned 1 values for 2 responses"):
        CompositeReward([fn(type="pythonBatch", function="short_rewards:one")]).score(["a", "b"], ["x", "y"])
