"""Human-feedback rounds in the trainer: PPO stops at the boundary with its candidates, the reward model
learns from human labels that carry what the original preferences lack, and the policy resumed with it
ends up better under the labels' criterion than the same run without the round.

The toy task (tests/feedback_toy.py, shared with the cluster test): the SFT model answers with two words
out of twenty. People prefer the ten friendly ones (``FRIENDLY``). The original preference data prefers
two-word answers to one-word ones, with words drawn at random -- it teaches the format and says nothing
about which words people like. The test plays the labeller: it labels the round's candidate pairs by the
count of friendly words (tie when equal) as PreferenceLabel objects, the console's own model of a label.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ftconsole.labels import CandidateResponse, PreferenceLabelSpec, label_object
from trainer.checkpoint import complete_checkpoints
from trainer.config import FEEDBACK_ROUND_ENV, FEEDBACK_ROUND_EXIT_CODE, FEEDBACK_ROUND_PREFIX, HumanFeedbackConfig
from trainer.feedback import LABELS_FILE_ENV, is_held_out

from ..feedback_toy import format_preferences, friendly_choice, friendly_share
from .stage_runs import progress_events, run_in_process, write_job, write_jsonl
from .test_ppo import WORDS, ppo_job, samples_by_step, toy_sft_dir  # noqa: F401  (toy_sft_dir: a fixture)

EVERY, STEPS = 4, 24  # rounds after steps 4, 8 ... 20; people label round 1 only, so steps 5..24 use its reward model


def label_round(candidates: dict, *, run: str) -> list[dict]:
    """PreferenceLabel objects for every pair, as a person with the FRIENDLY criterion would choose."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    objects = []
    for pair in candidates["pairs"]:
        choice = friendly_choice(*(r["text"] for r in pair["responses"]))
        spec = PreferenceLabelSpec(run=run, round=candidates["round"], prompt=pair["prompt"],
                                   responses=[CandidateResponse(**r) for r in pair["responses"]], choice=choice,
                                   labeller="test", labelled_at=stamp)
        objects.append(label_object(spec, namespace="team-a"))
    return objects


def final_friendly_share(output: Path) -> float:
    """Held-out responses at the last step: friendly words per word slot (2 per response)."""
    by_step = samples_by_step(output)
    return friendly_share(s["response"] for s in by_step[max(by_step)])


def test_a_round_of_human_labels_teaches_the_reward_model_and_the_policy(tmp_path, toy_sft_dir, monkeypatch):  # noqa: F811
    started = time.monotonic()
    feedback = {"everySteps": EVERY, "prompts": 64, "responsesPerPrompt": 3, "labelsNeeded": 30,
                "heldOutShare": 0.3}
    prefs = write_jsonl(tmp_path / "prefs.jsonl", format_preferences(words=WORDS))
    reward_settings = {"learningRate": 2e-3, "batchSize": 8, "epochs": 6, "evalFraction": 0.0,
                       "checkpointEverySteps": 1000, "logEverySteps": 10}
    reward = {"stage": "reward", "model": str(toy_sft_dir), "outputDir": str(tmp_path / "reward"),
              "data": {"preferences": str(prefs)}, "reward": reward_settings, "humanFeedback": feedback,
              "runName": "demo"}
    assert run_in_process("reward", write_job(tmp_path / "reward.yaml", **reward)) == 0
    original_reward = tmp_path / "reward-original"
    shutil.copytree(tmp_path / "reward" / "final", original_reward)

    ppo = ppo_job(tmp_path, toy_sft_dir, output="ppo", steps=STEPS, samplePrompts=32, sampleEverySteps=100,
                  checkpointEverySteps=100, functions=[], rewardModelWeight=1.0, batchSize=8, ppoEpochs=2,
                  miniBatches=1)
    ppo.update(rewardModel=str(tmp_path / "reward" / "final"), humanFeedback=feedback, runName="demo")
    ppo_config = write_job(tmp_path / "ppo.yaml", **ppo)

    # 1. The round boundary: checkpoint, candidates, the distinct exit code and message.
    assert run_in_process("ppo", ppo_config) == FEEDBACK_ROUND_EXIT_CODE
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith(f"{FEEDBACK_ROUND_PREFIX}round 1 after step {EVERY}: 192 candidate pairs")
    candidates = json.loads((tmp_path / "ppo" / "feedback" / "round-1.json").read_text())
    assert candidates["round"] == 1 and candidates["step"] == EVERY and len(candidates["pairs"]) == 64 * 3
    assert {r["source"] for p in candidates["pairs"] for r in p["responses"]} == {f"ppo@{EVERY}"}
    assert [s for s, _ in complete_checkpoints(tmp_path / "ppo")] == [EVERY]
    baseline = tmp_path / "ppo-baseline"
    shutil.copytree(tmp_path / "ppo", baseline)  # the same run from here on, without the round

    # 2. The labels, and the reward model retrained on them (continuation mode).
    labels = label_round(candidates, run="demo")
    (tmp_path / "labels.json").write_text(json.dumps({"kind": "List", "items": labels}))
    monkeypatch.setenv(LABELS_FILE_ENV, str(tmp_path / "labels.json"))
    monkeypatch.setenv(FEEDBACK_ROUND_ENV, "1")
    assert run_in_process("reward", write_job(tmp_path / "reward.yaml", **reward)) == 0
    monkeypatch.delenv(FEEDBACK_ROUND_ENV)
    retrained = json.loads((tmp_path / "reward" / "final" / "feedback.json").read_text())
    event = [e for e in progress_events(tmp_path / "reward") if "feedback_round" in e.get("metrics", {})][-1]
    before, after = event["metrics"]["human_accuracy_before"], event["metrics"]["human_accuracy_after"]
    held_out = int(event["metrics"]["human_labels_held_out"])
    print(f"held-out human-label accuracy {before:.3f} -> {after:.3f} on {held_out} pairs")
    assert retrained["round"] == 1 and held_out >= 10
    assert after >= before + 0.15 and after >= 0.7
    assert (tmp_path / "reward" / "final.before-round-1").is_dir()  # the old model is kept

    # 3. PPO resumes after the boundary with the new reward model; the baseline with the old. Nobody labels
    # the later rounds: each resumes unchanged, as the operator does after onTimeout Continue without labels.
    base_config = write_job(tmp_path / "ppo-baseline.yaml",
                            **dict(ppo, outputDir=str(baseline), rewardModel=str(original_reward)))
    for config, output in ((ppo_config, tmp_path / "ppo"), (base_config, baseline)):
        for round_ in range(2, STEPS // EVERY):
            assert run_in_process("ppo", config) == FEEDBACK_ROUND_EXIT_CODE
            assert f"round {round_} after step {round_ * EVERY}:" in (tmp_path / "termination-log").read_text()
        assert run_in_process("ppo", config) == 0
        assert sorted(p.name for p in (output / "feedback").iterdir()) == [
            f"round-{r}.json" for r in range(1, STEPS // EVERY)]  # each round opened once
    with_round, without = final_friendly_share(tmp_path / "ppo"), final_friendly_share(baseline)
    print(f"held-out friendly-word share after {STEPS} steps: {with_round:.3f} with the round, {without:.3f} "
          f"without; {time.monotonic() - started:.0f}s")
    assert with_round >= without + 0.1


def test_held_out_human_pairs_are_chosen_by_the_pair_whatever_its_order():
    assert is_held_out("p", "x", "y", share=0.5) == is_held_out("p", "y", "x", share=0.5)
    shares = [is_held_out(f"prompt {i}", "a", "b", share=0.25) for i in range(2000)]
    assert 0.2 < sum(shares) / len(shares) < 0.3
    assert not any(is_held_out(f"prompt {i}", "a", "b", share=0.0) for i in range(100))


def test_the_same_labels_give_the_same_training_rows_whatever_order_they_were_given_in():
    from trainer.feedback import human_preference_rows

    def label(prompt, a, b, choice, second):
        return PreferenceLabelSpec(run="demo", round=1, prompt=prompt, responses=[CandidateResponse(text=a),
                                   CandidateResponse(text=b)], choice=choice, labeller="alice",
                                   labelled_at=f"2026-12-01T10:00:{second:02d}Z")

    given = [label(f"prompt {i}", f"a{i}", f"b{i}", "a" if i % 2 else "b", i // 3) for i in range(12)]
    fast = [label(x.prompt, x.responses[0].text, x.responses[1].text, x.choice, 0) for x in reversed(given)]

    def rows(labels):
        train, held, _ = human_preference_rows(labels, share=0.3)
        return [(r.prompt, r.chosen, r.rejected) for r in train], [(r.prompt, r.chosen, r.rejected) for r in held]

    assert rows(given) == rows(fast) == rows(list(reversed(given)))
    assert rows(given)[0] and rows(given)[1]  # both sides used


def test_round_boundaries_every_n_steps_and_once_at_the_end():
    every = HumanFeedbackConfig(every_steps=10)
    assert [s for s in range(1, 31) if every.round_at(s, total_steps=30)] == [10, 20]
    assert every.rounds(30) == 2 and every.round_at(20, total_steps=30) == 2
    at_end = HumanFeedbackConfig(every_steps=0)
    assert [s for s in range(1, 31) if at_end.round_at(s, total_steps=30)] == [30] and at_end.rounds(30) == 1


def test_grpo_opens_a_round_with_an_sft_response_and_resumes_after_it(tmp_path, tiny_model_dir):
    from .test_grpo import grpo_job

    job = grpo_job(tmp_path, tiny_model_dir, output="grpo", steps=3, klCoef=0.05, checkpointEverySteps=100)
    job.update(humanFeedback={"everySteps": 2, "prompts": 3, "responsesPerPrompt": 3, "includeSft": True},
               runName="demo")
    config = write_job(tmp_path / "grpo.yaml", **job)
    assert run_in_process("grpo", config) == FEEDBACK_ROUND_EXIT_CODE
    assert "round 1 after step 2: 9 candidate pairs" in (tmp_path / "termination-log").read_text()
    candidates = json.loads((tmp_path / "grpo" / "feedback" / "round-1.json").read_text())
    per_prompt = [sorted(r["source"] for r in pair["responses"]) for pair in candidates["pairs"]]
    assert per_prompt.count(["grpo@2", "grpo@2"]) == 3 and per_prompt.count(["grpo@2", "sft"]) == 6
    assert run_in_process("grpo", config) == 0  # resumes at step 2: the round is not opened again
    assert [e["step"] for e in progress_events(tmp_path / "grpo") if e["kind"] == "succeeded"] == [3]
