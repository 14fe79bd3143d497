"""GRPO and RLOO end to end on a tiny model: the CLI, learning a verifiable task, resume after a kill."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from trainer import grpo
from trainer.checkpoint import complete_checkpoints
from trainer.rollout import SAMPLES_FILE

from .stage_runs import (final_weight_difference, kill_and_resume, progress_events, run_cli, run_in_process,
                         supervised_tiny_model, write_job, write_jsonl)

FILLERS = "good bad great happy sad yes no please hello world weather today tomorrow love hate kind nice".split()
ANSWERS = {"cats": 3, "dogs": 7}
"""The verifiable toy task: the answer is the digit that the prompt's first word stands for."""


def task_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(sorted(ANSWERS))
        rows.append({"prompt": f"{key} {rng.choice(FILLERS)} {rng.choice(FILLERS)}?", "answer": str(ANSWERS[key])})
    return rows


@pytest.fixture(scope="module")
def digit_sft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny 'SFT' model that answers any prompt with one digit, uniformly, and then </s>.

    Its answers are right one time in ten; GRPO and RLOO have to learn which digit each
    prompt's first word asks for. Forty supervised steps, about 2 s.
    """
    rng = random.Random(0)
    return supervised_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("digit-sft"), lambda step: [
        (row["prompt"], f" {rng.randrange(10)}") for row in task_rows(16, seed=1000 + step)])


def grpo_job(tmp_path: Path, model: Path, *, output: str, **settings) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", task_rows(128, seed=7))
    grpo_settings = {"steps": 3, "batchSize": 8, "groupSize": 4, "responseLengthTokens": 4, "samplePrompts": 8,
                     "sampleEverySteps": 2, "checkpointEverySteps": 2, "iterationsPerBatch": 2, "miniBatches": 2,
                     "learningRate": 1e-3, "temperature": 1.0, "precision": "fp32",
                     "chatTemplate": False}  # the toy SFT model was trained on raw prompt text
    grpo_settings.update(settings)
    return {"stage": "grpo", "model": str(model), "outputDir": str(tmp_path / output),
            "data": {"prompts": str(prompts)},
            "reward": {"functions": [{"type": "numericAnswer"}]}, "grpo": grpo_settings}


def held_out_reward(output: Path) -> dict[int, float]:
    by_step: dict[int, list[float]] = {}
    for line in (output / SAMPLES_FILE).read_text().splitlines():
        sample = json.loads(line)
        by_step.setdefault(sample["step"], []).append(sample["reward"])
    return {step: sum(v) / len(v) for step, v in by_step.items()}


def progress_metrics(output: Path) -> list[dict]:
    return [e["metrics"] for e in progress_events(output) if e["kind"] == "progress" and e.get("metrics")]


def test_grpo_cli_end_to_end_writes_a_loadable_policy_metrics_and_samples(tmp_path, digit_sft_dir):
    from transformers import AutoModelForCausalLM

    config = write_job(tmp_path / "grpo.yaml", **grpo_job(tmp_path, digit_sft_dir, output="out"))
    result = run_cli("grpo", config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no reference model (klCoef 0)" in result.stdout
    output = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(output / "final")
    assert [step for step, _ in complete_checkpoints(output)] == [2, 3]
    events = progress_events(output)
    assert events[-1]["kind"] == "succeeded" and events[-1]["step"] == 3
    metrics = progress_metrics(output)
    assert len(metrics) == 3
    for name in ("reward_mean", "reward_std", "zero_std_fraction", "entropy", "loss", "policy_loss",
                 "policy_clip_fraction", "ratio_mean", "response_length", "eos_fraction", "episodes_per_second",
                 "tokens_per_second", "generation_seconds", "scoring_seconds", "optimisation_seconds"):
        assert all(math.isfinite(m[name]) for m in metrics), name
    assert all("kl" not in m for m in metrics)  # no reference model, so no KL to report
    samples = [e for e in events if e["kind"] == "samples"]
    assert [e["step"] for e in samples] == [0, 2, 3]
    assert samples[-1]["samples"][0].keys() >= {"prompt", "response", "reward"}
    assert "eval_reward_mean" in samples[-1]["metrics"]


def test_with_a_kl_coefficient_the_reference_is_loaded_and_kl_reported(tmp_path, digit_sft_dir):
    job = grpo_job(tmp_path, digit_sft_dir, output="out", steps=3, batchSize=16, klCoef=0.1, algorithm="rloo",
                   lossNormalisation="token", clipRangeHigh=0.28, checkpointEverySteps=1000)
    assert run_in_process("grpo", write_job(tmp_path / "grpo.yaml", **job)) == 0
    metrics = progress_metrics(tmp_path / "out")
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    # A step whose groups all scored alike moves nothing, so ask that some later step moved away.
    assert max(m["kl"] for m in metrics[1:]) > 0
    samples = [json.loads(line) for line in (tmp_path / "out" / SAMPLES_FILE).read_text().splitlines()]
    assert all("kl" in s for s in samples)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_methods_learn_the_verifiable_task(tmp_path, digit_sft_dir, algorithm):
    """Reward 1 when the response's number is the digit the prompt's first word stands for (cats 3, dogs 7).

    Held-out reward (32 prompts, one sample each, the same seed before and after): the SFT model
    guesses a digit, so it starts near 0.1 (0.16 when this test was written); after 40 steps of
    4 prompts x 8 responses it reached 0.97 with both algorithms, and 0.72-0.97 in the variants
    tried while writing it (seed 1; prompts rendered through the chat template).
    A policy that always says one digit scores 0.41-0.5 here, so the asserted 0.6 and gain of 0.4
    mean the answer depends on the prompt. Every seed is fixed: deterministic on a given machine.
    """
    job = grpo_job(tmp_path, digit_sft_dir, output="out", algorithm=algorithm, steps=40, batchSize=32, groupSize=8,
                   learningRate=2e-3, iterationsPerBatch=4, miniBatches=1, samplePrompts=32, sampleEverySteps=40,
                   checkpointEverySteps=1000, logEverySteps=10)
    assert run_in_process("grpo", write_job(tmp_path / "grpo.yaml", **job)) == 0
    reward = held_out_reward(tmp_path / "out")
    print(f"{algorithm}: held-out reward by step {reward}")
    assert reward[40] >= 0.6
    assert reward[40] - reward[0] >= 0.4


def test_grpo_resumed_after_a_kill_ends_like_an_uninterrupted_run(tmp_path, digit_sft_dir):
    """Subprocesses with one thread each, so sampling sees bit-identical logits; asserted < 1e-5 (observed 0)."""
    settings = dict(steps=4, checkpointEverySteps=2)
    straight = write_job(tmp_path / "straight.yaml", **grpo_job(tmp_path, digit_sft_dir, output="straight", **settings))
    assert run_cli("grpo", straight).returncode == 0
    resumed = write_job(tmp_path / "resumed.yaml", **grpo_job(tmp_path, digit_sft_dir, output="resumed", **settings))
    kill_and_resume("grpo", resumed, tmp_path / "resumed")
    assert final_weight_difference(tmp_path / "straight", tmp_path / "resumed") < 1e-5
    # Fused AdamW, recorded in the checkpoint, so a resume continues with it (trainer/adamw.py)
    groups = torch.load(tmp_path / "resumed" / "checkpoints" / "step-4" / "optimizer.bin")["param_groups"]
    assert groups[0]["fused"] and not groups[0]["foreach"]


def test_group_size_must_divide_the_batch():
    from pydantic import ValidationError

    from trainer.config import GRPOConfig

    with pytest.raises(ValidationError, match=r"batchSize \(10\) must be divisible by groupSize \(4\)"):
        GRPOConfig(batchSize=10, groupSize=4)
    assert GRPOConfig(algorithm="grpo").scales_rewards and not GRPOConfig(algorithm="rloo").scales_rewards
    assert GRPOConfig(algorithm="rloo", scaleRewards=True).scales_rewards


def test_kl_guard_names_the_grpo_setting():
    from trainer.runtime import StageFailed

    grpo.check_kl(5.0, max_kl=5.0, step=1)
    with pytest.raises(StageFailed, match="above grpo.maxKl=5.0"):
        grpo.check_kl(5.1, max_kl=5.0, step=1)


def test_lora_grpo_with_kl_uses_the_policys_base_as_reference_and_checkpoints_only_adapters(tmp_path, digit_sft_dir,
                                                                                            capfd):
    from safetensors import safe_open

    lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    job = grpo_job(tmp_path, digit_sft_dir, output="out", steps=2, batchSize=8, klCoef=0.1, lora=lora,
                   checkpointEverySteps=1)
    assert run_in_process("grpo", write_job(tmp_path / "grpo.yaml", **job)) == 0
    assert "reference: the policy's frozen base with its LoRA adapters disabled" in capfd.readouterr().out
    assert progress_metrics(tmp_path / "out")[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    for _, checkpoint in complete_checkpoints(tmp_path / "out"):
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
        assert keys and all("lora_" in k for k in keys)
