"""PPO end to end on a tiny model: the CLI, learning, resume after a kill, and the guardrails."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from trainer import ppo
from trainer.checkpoint import complete_checkpoints
from trainer.runtime import StageFailed

from .stage_runs import (final_weight_difference, kill_and_resume, progress_events, run_cli, run_in_process,
                         supervised_tiny_model, write_job, write_jsonl)

WORDS = ("good bad great happy sad yes no please hello world cats dogs weather today tomorrow "
         "love hate kind nice sure").split()


def word_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(3)) + "?"} for _ in range(n)]


@pytest.fixture(scope="module")
def toy_sft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny 'SFT' model that answers with two words from WORDS and then </s>.

    The random fixture model spreads its probability over 512 tokens, so no behaviour
    is frequent enough for PPO to discover in a few steps. Forty steps of supervised
    training (about 2 s) give it a clear vocabulary: each word about 1/20 per slot,
    which is what an SFT model hands to PPO in real life.
    """
    rng = random.Random(0)
    return supervised_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("toy-sft"), lambda step: [
        (row["prompt"], f" {rng.choice(WORDS)} {rng.choice(WORDS)}") for row in word_prompts(16, seed=1000 + step)])


def ppo_job(tmp_path: Path, model: Path, *, output: str, functions=None, **ppo_settings) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", word_prompts(96, seed=7))
    settings = {"steps": 3, "batchSize": 4, "responseLengthTokens": 6, "samplePrompts": 8, "sampleEverySteps": 2,
                "checkpointEverySteps": 2, "ppoEpochs": 2, "miniBatches": 2, "learningRate": 1e-3,
                "temperature": 1.0, "precision": "fp32",
                # The SFT models here learned raw prompt/completion text, so PPO gives them raw prompts too.
                "chatTemplate": False}
    settings.update(ppo_settings)
    return {"stage": "ppo", "model": str(model), "outputDir": str(tmp_path / output),
            "data": {"prompts": str(prompts)},
            "reward": {"functions": functions or [{"type": "keywords", "keywords": ["cats"]}]},
            "ppo": settings}


def samples_by_step(output: Path) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    for line in (output / ppo.SAMPLES_FILE).read_text().splitlines():
        sample = json.loads(line)
        found.setdefault(sample["step"], []).append(sample)
    return found


def test_ppo_cli_end_to_end_writes_a_loadable_policy_metrics_and_samples(tmp_path, toy_sft_dir):
    from transformers import AutoModelForCausalLM

    config = write_job(tmp_path / "ppo.yaml", **ppo_job(tmp_path, toy_sft_dir, output="out"))
    result = run_cli("ppo", config)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(output / "final")  # a plain causal LM, no value head
    # checkpointEverySteps=2 and the last step: a crash while writing final/ costs no rollouts.
    assert [step for step, _ in complete_checkpoints(output)] == [2, 3]

    events = progress_events(output)
    assert events[-1]["kind"] == "succeeded" and events[-1]["step"] == 3
    metrics = [e["metrics"] for e in events if e["kind"] == "progress" and e.get("metrics")]
    assert len(metrics) == 3
    for name in ("reward_mean", "score_mean", "kl", "entropy", "policy_clip_fraction", "approx_kl", "policy_loss",
                 "value_loss", "value_clip_fraction", "ratio_mean", "response_length", "episodes_per_second",
                 "tokens_per_second", "generation_seconds", "scoring_seconds", "optimisation_seconds", "kl_coef"):
        assert all(math.isfinite(m[name]) for m in metrics), name
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert metrics[0]["ratio_mean"] == pytest.approx(1.0, abs=0.2)

    # samples at the SFT baseline (0), every sampleEverySteps (2) and at the end (3), 8 held-out prompts each
    by_step = samples_by_step(output)
    assert sorted(by_step) == [0, 2, 3] and all(len(v) == 8 for v in by_step.values())
    held_out = {row["prompt"] for row in word_prompts(96, seed=7)[:8]}
    assert {s["prompt"] for s in by_step[3]} == held_out
    sample_events = [e for e in events if e["kind"] == "samples"]
    assert sample_events and sample_events[-1]["samples"][0].keys() >= {"prompt", "response", "reward", "kl"}
    assert "eval_reward_mean" in sample_events[-1]["metrics"]


def test_ppo_learns_to_say_the_rewarded_word_while_kl_stays_bounded(tmp_path, toy_sft_dir):
    """Reward 1 when the response contains "cats" (one of the SFT model's 20 words).

    Held-out reward (32 prompts, one sample each, same seed before and after) goes from
    about 0.0-0.1 (SFT: "cats" in ~10% of responses, minus the rare missing-EOS penalty) to
    0.88-0.97 after 30 steps across seeds 0, 1, 2 when this test was written (held-out KL
    2.9-4.8 nats).  Asserted: final >= 0.6 and a gain >= 0.4, KL < 15 nats: wide margins, and
    every seed is fixed, so the run is deterministic on a given machine.
    """
    job = ppo_job(tmp_path, toy_sft_dir, output="out", steps=30, batchSize=16, ppoEpochs=4, miniBatches=1,
                  learningRate=3e-3, samplePrompts=32, sampleEverySteps=10, checkpointEverySteps=1000,
                  klCoef=0.05, logEverySteps=10)
    assert run_in_process("ppo", write_job(tmp_path / "ppo.yaml", **job)) == 0
    by_step = samples_by_step(tmp_path / "out")
    mean = {step: sum(s["reward"] for s in v) / len(v) for step, v in by_step.items()}
    kl = {step: sum(s["kl"] for s in v) / len(v) for step, v in by_step.items()}
    print(f"held-out reward by step {mean}, KL {kl}")
    assert mean[30] >= 0.6
    assert mean[30] - mean[0] >= 0.4
    assert kl[30] < 15.0


def test_ppo_resumed_after_a_kill_ends_like_an_uninterrupted_run(tmp_path, toy_sft_dir):
    """Both runs are subprocesses with one thread, so sampling sees bit-identical logits.

    Observed difference: 0 (bitwise equal). Asserted: < 1e-5, which any lost state
    (optimizer moments, scheduler, KL coefficient, data position, sampling seed) exceeds by far.
    """
    settings = dict(steps=4, checkpointEverySteps=2, adaptiveKl={"targetKl": 0.5, "horizon": 100})
    straight = write_job(tmp_path / "straight.yaml", **ppo_job(tmp_path, toy_sft_dir, output="straight", **settings))
    assert run_cli("ppo", straight).returncode == 0

    resumed = write_job(tmp_path / "resumed.yaml", **ppo_job(tmp_path, toy_sft_dir, output="resumed", **settings))
    kill_and_resume("ppo", resumed, tmp_path / "resumed")

    events = progress_events(tmp_path / "resumed")
    assert [e["step"] for e in events if e["kind"] == "progress" and not e.get("metrics")][-1] == 2
    straight_events = progress_events(tmp_path / "straight")
    assert events[-1]["step"] == straight_events[-1]["step"] == 4
    final_metrics = [e["metrics"] for e in events if e["kind"] == "progress" and e.get("metrics")][-1]
    straight_metrics = [e["metrics"] for e in straight_events if e["kind"] == "progress" and e.get("metrics")][-1]
    assert final_metrics["kl_coef"] == pytest.approx(straight_metrics["kl_coef"], rel=1e-9)  # KL controller restored
    assert final_weight_difference(tmp_path / "straight", tmp_path / "resumed") < 1e-5


def test_ppo_stops_with_a_reason_naming_kl_when_the_policy_drifts(tmp_path, toy_sft_dir):
    # Step 1 has KL 0 (policy == reference); after one update the KL of step 2 exceeds any tiny bound.
    job = ppo_job(tmp_path, toy_sft_dir, output="out", steps=4, maxKl=1e-6, checkpointEverySteps=1000)
    assert run_in_process("ppo", write_job(tmp_path / "ppo.yaml", **job)) == 1
    reason = (tmp_path / "termination-log").read_text()
    assert "KL divergence" in reason and "maxKl" in reason and "step 2" in reason
    assert progress_events(tmp_path / "out")[-1]["kind"] == "failed"


def test_ppo_fails_clearly_when_a_reward_function_cannot_be_imported(tmp_path, toy_sft_dir):
    job = ppo_job(tmp_path, toy_sft_dir, output="out",
                  functions=[{"type": "python", "function": "no_such_reward_module:score"}])
    assert run_in_process("ppo", write_job(tmp_path / "ppo.yaml", **job)) == 3  # permanent: no retry helps
    assert "no_such_reward_module:score" in (tmp_path / "termination-log").read_text()


def test_nan_guard_names_the_non_finite_values():
    with pytest.raises(StageFailed, match=r"step 7: policy_loss=nan, value_loss=inf"):
        ppo.check_finite({"policy_loss": float("nan"), "value_loss": float("inf"), "kl": 0.1}, step=7)
    ppo.check_finite({"kl": 0.1}, step=1)


def test_kl_guard_only_fires_above_the_bound():
    ppo.check_kl(5.0, max_kl=None, step=1)
    ppo.check_kl(5.0, max_kl=5.0, step=1)
    with pytest.raises(StageFailed, match="above ppo.maxKl=5.0"):
        ppo.check_kl(5.1, max_kl=5.0, step=1)


def test_each_process_samples_with_its_own_seed_and_the_seed_depends_only_on_the_step():
    seeds = {ppo.step_seed(0, rank=r, step=s) for r in range(4) for s in range(1, 100)}
    assert len(seeds) == 4 * 99
    assert ppo.step_seed(3, rank=1, step=5) == ppo.step_seed(3, rank=1, step=5)


def test_held_out_prompts_must_leave_some_to_train_on():
    with pytest.raises(StageFailed, match="samplePrompts=8"):
        ppo.split_prompts(["p"] * 8, held_out=8, source="prompts.jsonl")
    held, train = ppo.split_prompts(list("abcde"), held_out=2, source="x")
    assert held == ["a", "b"] and train == ["c", "d", "e"]


def test_a_reward_function_returning_garbage_during_ppo_stops_the_stage_naming_it(tmp_path, monkeypatch):
    from trainer.config import RewardFunction
    from trainer.rewards import CompositeReward

    (tmp_path / "garbage_reward.py").write_text("def score(prompt, response):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = CompositeReward([RewardFunction(type="python", function="garbage_reward:score")])
    with pytest.raises(StageFailed, match="python:garbage_reward:score returned str"):
        ppo.score_responses(reward, ["a prompt"], ["a response"])
