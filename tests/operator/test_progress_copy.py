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
