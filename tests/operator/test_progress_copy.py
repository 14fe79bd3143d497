"""The trainer's progress ConfigMap becomes a small, sanitised status patch."""

from __future__ import annotations

import json

from ftoperator.progress import MAX_METRICS, MAX_SAMPLES, SAMPLE_CHARS, status_patch


def data(document):
    return {"progress.json": json.dumps(document)}


def test_progress_reward_and_kl_columns_come_from_the_current_stage_and_ppo_metrics():
    patch = status_patch(data({
        "current": "ppo",
        "stages": {
            "sft": {"step": 40, "totalSteps": 40, "metrics": {"loss": 1.2}},
            "ppo": {"step": 120, "totalSteps": 500, "metrics": {"score_mean": 0.41234, "kl": 0.0731, "reward_mean": 0.3}},
        },
        "samples": [{"stage": "ppo", "step": 120, "prompt": "hi", "response": "hello", "reward": 0.5, "kl": 0.1}],
    }))
    assert patch["progress"] == "ppo 120/500"
    assert patch["reward"] == 0.4123 and patch["kl"] == 0.0731
    assert patch["stages"]["sft"] == {"step": 40, "totalSteps": 40, "metrics": {"loss": 1.2}}
    assert patch["samples"] == [{"stage": "ppo", "step": 120, "prompt": "hi", "response": "hello",
                                 "reward": 0.5, "kl": 0.1}]
    assert set(patch) == {"progress", "reward", "kl", "stages", "samples"}, "never conditions or state"


def test_untrusted_content_is_dropped_or_bounded():
    metrics = {f"m{i:03d}": float(i) for i in range(100)}
    metrics.update({"kl": 0.2, "bad name!": 1.0, "nan": float("nan"), "text": "x", "flag": True})
    patch = status_patch(data({
        "current": "ppo",
        "stages": {"ppo": {"step": -3, "totalSteps": "many", "metrics": metrics}, "evil": {"step": 1}},
        "samples": [{"stage": "ppo", "prompt": "p" * 5000, "response": 7}] * 10 + [{"stage": "x"}],
    }))
    ppo = patch["stages"]["ppo"]
    assert set(patch["stages"]) == {"ppo"}
    assert "step" not in ppo and "totalSteps" not in ppo
    assert len(ppo["metrics"]) == MAX_METRICS and "kl" in ppo["metrics"]
    assert not {"bad name!", "nan", "text", "flag"} & set(ppo["metrics"])
    assert len(patch["samples"]) <= MAX_SAMPLES
    assert all(len(s["prompt"]) == SAMPLE_CHARS and "response" not in s for s in patch["samples"])
    assert patch["progress"] == "ppo"


def test_garbage_yields_no_patch():
    assert status_patch(None) is None
    assert status_patch({}) is None
    assert status_patch({"progress.json": "{not json"}) is None
    assert status_patch({"progress.json": "[1, 2]"}) is None
    assert status_patch(data({"stages": {}})) is None


def test_sample_text_is_stripped_of_control_characters():
    document = {"current": "ppo", "stages": {"ppo": {"step": 1}}, "samples": [{
        "stage": "ppo", "step": 1, "prompt": "hi\x1b[2J\x1b]0;pwned\x07 there\r",
        "response": "line one\nline\ttwo\u202e\x00\x85"}]}
    sample = status_patch({"progress.json": json.dumps(document)})["samples"][0]
    assert sample["prompt"] == "hi[2J]0;pwned there"
    assert sample["response"] == "line one\nline\ttwo"
    only_controls = {**document, "samples": [{"stage": "ppo", "prompt": "\x1b\x07"}]}
    assert "prompt" not in status_patch({"progress.json": json.dumps(only_controls)})["samples"][0]


def test_grpo_fills_the_reward_and_kl_columns_and_its_samples_are_kept():
    patch = status_patch(data({
        "current": "grpo",
        "stages": {"grpo": {"step": 3, "totalSteps": 10,
                            "metrics": {"reward_mean": 0.625, "kl": 0.01234, "eval_reward_mean": 0.5}}},
        "samples": [{"stage": "grpo", "step": 2, "prompt": "cats?", "response": " 3", "reward": 1.0}],
    }))
    assert patch["progress"] == "grpo 3/10"
    assert (patch["reward"], patch["kl"]) == (0.625, 0.0123)
    assert patch["samples"] == [{"stage": "grpo", "step": 2, "prompt": "cats?", "response": " 3", "reward": 1.0}]
    assert "preferenceAccuracy" not in patch and "rewardMargin" not in patch


def test_dpo_fills_the_accuracy_and_margin_columns_from_held_out_pairs_first():
    metrics = {"loss": 0.6, "chosen_reward": 0.2, "rejected_reward": -0.1, "reward_margin": 0.3,
               "preference_accuracy": 0.75, "eval_loss": 0.65, "eval_reward_margin": 0.21234,
               "eval_preference_accuracy": 0.6875}
    patch = status_patch(data({"current": "dpo", "stages": {"dpo": {"step": 8, "totalSteps": 8, "metrics": metrics}}}))
    assert (patch["preferenceAccuracy"], patch["rewardMargin"]) == (0.6875, 0.2123)
    assert patch["stages"]["dpo"]["metrics"] == metrics
    assert "reward" not in patch and "kl" not in patch

    before_eval = {k: v for k, v in metrics.items() if not k.startswith("eval_")}
    patch = status_patch(data({"current": "dpo", "stages": {"dpo": {"step": 1, "metrics": before_eval}}}))
    assert (patch["preferenceAccuracy"], patch["rewardMargin"]) == (0.75, 0.3)


def test_the_column_metrics_survive_the_cap_on_metrics():
    metrics = {f"a{i:03d}": 1.0 for i in range(100)}
    metrics.update(eval_preference_accuracy=0.9, eval_reward_margin=1.5)
    patch = status_patch(data({"current": "dpo", "stages": {"dpo": {"step": 1, "metrics": metrics}}}))
    assert len(patch["stages"]["dpo"]["metrics"]) == MAX_METRICS
    assert (patch["preferenceAccuracy"], patch["rewardMargin"]) == (0.9, 1.5)


def test_dpo_samples_keep_the_pair_and_its_implicit_rewards_bounded():
    sample = {"stage": "dpo", "step": 4, "prompt": "Tell me about cats.", "response": " cats tea",
              "chosen": "cats yes" + "!" * 1000, "rejected": "dogs\x1b[31m tea", "chosen_reward": 0.25,
              "rejected_reward": -0.5, "chosen_sum": 3.0}
    patch = status_patch(data({"current": "dpo", "stages": {"dpo": {"step": 4}}, "samples": [sample]}))
    (copied,) = patch["samples"]
    assert copied == {"stage": "dpo", "step": 4, "prompt": "Tell me about cats.", "response": " cats tea",
                      "chosen": copied["chosen"], "rejected": "dogs[31m tea", "chosenReward": 0.25,
                      "rejectedReward": -0.5}
    assert len(copied["chosen"]) == SAMPLE_CHARS and copied["chosen"].startswith("cats yes!")


def test_the_kl_column_shows_the_non_negative_k3_estimate_when_the_trainer_reports_it():
    patch = status_patch(data({
        "current": "ppo",
        "stages": {"ppo": {"step": 2, "totalSteps": 12, "metrics": {"score_mean": 0.1, "kl": -0.13, "kl_k3": 0.15}}},
    }))
    assert patch["kl"] == 0.15
