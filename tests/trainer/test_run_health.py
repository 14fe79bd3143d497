"""Run-health warnings: the decisions on hand-made batches, and what a stage does with them."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch

from trainer.run_health import (ZERO_KL_STEPS, BatchStats, KlStall, RunHealth, RunHealthStop, batch_warnings,
                                measure)
from trainer.runtime import PermanentStageFailure

HEALTHY = BatchStats(empty_fraction=0.0, no_stop_fraction=0.1, score_std=0.5, kl_k3=0.3)
ONE_PROCESS = SimpleNamespace(num_processes=1, is_main_process=True)


def warnings_for(stats: BatchStats, *, stop_token: bool = True, zero_kl_steps: int = 0) -> list[str]:
    return batch_warnings(stats, stop_token=stop_token, zero_kl_steps=zero_kl_steps)


def test_a_healthy_batch_has_no_warnings():
    assert warnings_for(HEALTHY) == []


def test_mostly_empty_responses_warn_and_point_at_the_chat_template():
    (warning,) = warnings_for(BatchStats(empty_fraction=0.75, no_stop_fraction=0.0, score_std=0.5, kl_k3=0.3))
    assert warning.startswith("75% of responses are empty") and "chatTemplate" in warning
    assert warnings_for(BatchStats(empty_fraction=0.5, no_stop_fraction=0.0, score_std=0.5, kl_k3=0.3)) == []


def test_responses_that_never_end_warn_only_when_a_stop_token_is_expected():
    endless = BatchStats(empty_fraction=0.0, no_stop_fraction=1.0, score_std=0.5, kl_k3=0.3)
    (warning,) = warnings_for(endless)
    assert "never end" in warning and "responseLengthTokens" in warning
    assert warnings_for(endless, stop_token=False) == []


def test_a_reward_that_does_not_vary_across_the_batch_warns():
    (warning,) = warnings_for(BatchStats(empty_fraction=0.0, no_stop_fraction=0.0, score_std=0.0, kl_k3=0.3))
    assert "does not vary" in warning


def test_kl_at_zero_warns_only_after_many_consecutive_steps():
    stall = KlStall()
    counts = [stall.update(kl) for kl in [0.0] * (ZERO_KL_STEPS - 1) + [0.2] + [0.0] * ZERO_KL_STEPS]
    assert counts[ZERO_KL_STEPS - 1] == 0 and counts[-1] == ZERO_KL_STEPS
    assert stall.update(math.nan) == 0, "no reference model (NaN) is not a stalled KL"
    zero = BatchStats(empty_fraction=0.0, no_stop_fraction=0.0, score_std=0.5, kl_k3=0.0)
    assert warnings_for(zero, zero_kl_steps=ZERO_KL_STEPS - 1) == []
    (warning,) = warnings_for(zero, zero_kl_steps=ZERO_KL_STEPS)
    assert f"zero for {ZERO_KL_STEPS} steps" in warning


def test_measure_counts_empty_and_endless_responses_and_k3_kl_is_never_negative():
    # (b=4, t=3), the stop token included: an immediate stop, one word and stop, no stop, an immediate stop
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    has_stop = torch.tensor([True, True, False, True])
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])
    logprobs = torch.full((4, 3), -1.0)
    ref = logprobs + torch.tensor([0.5, -0.5, 0.0])  # k1 would cancel to zero over a sequence; k3 does not
    stats = {k: float(v) for k, v in measure(mask=mask, has_stop=has_stop, scores=scores, logprobs=logprobs,
                                             ref_logprobs=ref).items()}
    assert stats["empty_fraction"] == 0.5 and stats["no_stop_fraction"] == 0.25 and stats["score_std"] == 0.0
    k3 = lambda r: math.exp(r) - 1 - r  # noqa: E731
    assert stats["kl_k3"] == pytest.approx((k3(0.5) + (k3(0.5) + k3(-0.5)) + (k3(0.5) + k3(-0.5) + 0.0) + k3(0.5)) / 4)
    assert stats["kl_k3"] > 0
    no_reference = measure(mask=mask, has_stop=has_stop, scores=scores, logprobs=None, ref_logprobs=None)
    assert math.isnan(float(no_reference["kl_k3"]))


def empty_batch() -> dict:
    return {"mask": torch.tensor([[1.0, 0.0, 0.0]] * 4), "has_stop": torch.ones(4, dtype=torch.bool),
            "scores": torch.tensor([0.1, 0.2, 0.3, 0.4]), "logprobs": torch.zeros(4, 3), "ref_logprobs": torch.zeros(4, 3)}


def test_warn_mode_logs_the_warning_and_reports_it_in_the_metrics():
    log = io.StringIO()
    health = RunHealth(mode="warn", stage="ppo", stop_token=True, stream=log)
    metrics = health.observe(ONE_PROCESS, step=3, **empty_batch())
    assert "Z [ppo] WARNING step 3: 100% of responses are empty" in log.getvalue()
    assert metrics == {"empty_fraction": 1.0, "health_warnings": 1.0, "kl_k3": 0.0}


def test_stop_mode_fails_the_stage_permanently_with_the_warnings():
    health = RunHealth(mode="stop", stage="grpo", stop_token=True, stream=io.StringIO())
    with pytest.raises(RunHealthStop, match=r"grpo: stopped at step 2 \(grpo.healthChecks: stop\): 100% of responses"):
        health.observe(ONE_PROCESS, step=2, **empty_batch())
    assert issubclass(RunHealthStop, PermanentStageFailure)


def test_off_mode_reports_nothing():
    assert RunHealth(mode="off", stage="ppo", stop_token=True).observe(ONE_PROCESS, step=1, **empty_batch()) == {}


# ----------------------------------------------------------------------------- in a PPO stage


def flat_reward_job(tmp_path, model_dir, *, mode: str) -> dict:
    """PPO whose reward is the same for every response: a regex that never matches, no stop token (nor its penalty)."""
    from .stage_runs import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(12)])
    return {"stage": "ppo", "model": str(model_dir), "outputDir": str(tmp_path / "out"),
            "data": {"prompts": str(prompts)},
            "reward": {"functions": [{"type": "regex", "pattern": "^never-said$"}]},
            "ppo": {"steps": 2, "batchSize": 4, "responseLengthTokens": 4, "samplePrompts": 2, "sampleEverySteps": 100,
                    "checkpointEverySteps": 100, "ppoEpochs": 1, "learningRate": 1e-4, "precision": "fp32",
                    "chatTemplate": False, "stopToken": None, "healthChecks": mode}}


def test_a_ppo_stage_with_a_flat_reward_warns_in_its_log_and_progress(tmp_path, tiny_model_dir, capsys):
    from .stage_runs import progress_events, run_in_process, write_job

    assert run_in_process("ppo", write_job(tmp_path / "ppo.yaml", **flat_reward_job(tmp_path, tiny_model_dir,
                                                                                      mode="warn"))) == 0
    log = capsys.readouterr().err
    assert "Z [ppo] WARNING step 1: the reward does not vary across the batch" in log
    steps = [e for e in progress_events(tmp_path / "out") if e["kind"] == "progress" and e["step"] > 0]
    assert [e["metrics"]["health_warnings"] for e in steps] == [1.0, 1.0]
    assert all(e["metrics"]["kl_k3"] >= 0 for e in steps)


def test_a_ppo_stage_with_a_flat_reward_and_health_checks_stop_fails_permanently_naming_it(tmp_path, tiny_model_dir):
    from .stage_runs import progress_events, run_in_process, write_job

    job = flat_reward_job(tmp_path, tiny_model_dir, mode="stop")
    assert run_in_process("ppo", write_job(tmp_path / "ppo.yaml", **job)) == 3  # permanent: a retry does the same
    reason = (tmp_path / "termination-log").read_text()
    assert "ppo: stopped at step 1 (ppo.healthChecks: stop)" in reason and "does not vary" in reason
    assert progress_events(tmp_path / "out")[-1]["kind"] == "failed"
