"""Nothing lost: SIGTERM checkpoints at the next step boundary, NaN stops the stage by name, a damaged
checkpoint falls back to the previous one, final/ is durable.

The SIGTERM test is what a pod deletion does to the trainer (the kubelet sends SIGTERM to PID 1
and SIGKILL after the grace period); it prints the seconds from the signal to the exit, the
cost of checkpointing on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from trainer.checkpoint import complete_checkpoints
from trainer.runtime import INTERRUPTED_EXIT_CODE, GracefulStop, StageInterrupted

from .stage_runs import (load_state_dict, max_abs_diff, progress_events, run_in_process, subprocess_env, write_job)
from .test_reward_model import reward_job
from .test_sft import sft_job

TOLERANCE = 1e-5  # as in test_checkpoint_resume: a subprocess and this process may order float sums differently


def _wait_for_step(progress, *, step: int, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        if progress.exists():
            events = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
            if any(e["kind"] == "progress" and e.get("metrics") and e["step"] >= step for e in events):
                return
        time.sleep(0.02)
    raise AssertionError(f"no progress to step {step} within {timeout} s")


def test_sigterm_mid_stage_checkpoints_the_current_step_and_the_resumed_run_matches_an_uninterrupted_one(
        tmp_path, tiny_model_dir):
    # 9 rows in batches of 2: 5 steps per epoch, 200 steps; no periodic checkpoint before the end.
    settings = dict(epochs=40, batchSize=2, logEverySteps=1, checkpointEverySteps=1000, warmupSteps=2)
    straight = sft_job(tmp_path, tiny_model_dir, output="straight", **settings)
    assert run_in_process("sft", write_job(tmp_path / "straight.yaml", **straight)) == 0

    config = write_job(tmp_path / "job.yaml", **sft_job(tmp_path, tiny_model_dir, output="out", **settings))
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "trainer", "--stage", "sft", "--config", str(config)],
                               cwd=tmp_path, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(output / "progress.jsonl", step=3, process=process)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        seconds = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    print(f"SIGTERM to exit: {seconds:.2f} s (tiny model, checkpoint included)")
    assert process.returncode == INTERRUPTED_EXIT_CODE, stderr[-3000:]

    events = progress_events(output)
    trained = max(e["step"] for e in events if e["kind"] == "progress")
    assert 3 <= trained < 200
    # At most one step lost: the checkpoint is of the last step that finished.
    assert [step for step, _ in complete_checkpoints(output)] == [trained]
    assert events[-1]["kind"] == "interrupted" and f"stopped after step {trained}" in events[-1]["reason"]
    print(f"interrupted: {events[-1]['reason']}")  # "(N s after the signal)": step end + checkpoint
    assert (tmp_path / "termination-log").read_text().startswith("Interrupted: SIGTERM")
    assert not (output / "final").exists()

    assert run_in_process("sft", config) == 0
    resumed_at = [e["step"] for e in progress_events(output) if e["kind"] == "progress" and not e.get("metrics")]
    assert resumed_at[-1] == trained
    diff = max_abs_diff(load_state_dict(tmp_path / "straight" / "final"), load_state_dict(output / "final"))
    print(f"max abs weight difference after the SIGTERM and resume: {diff:.3g}")
    assert diff < TOLERANCE, diff


def test_sigterm_outside_the_training_loop_stops_at_once():
    stop = GracefulStop()
    with pytest.raises(StageInterrupted, match="outside the training loop"):
        stop._handle(signal.SIGTERM, None)
    stop = GracefulStop()
    stop.armed = True
    stop._handle(signal.SIGTERM, None)  # recorded; the loop stops at the step boundary
    assert stop.requested()


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, capfd, damaged):
    job = sft_job(tmp_path, tiny_model_dir, epochs=2, batchSize=2, checkpointEverySteps=2, keepCheckpoints=3)
    config = write_job(tmp_path / "job.yaml", **job)
    assert run_in_process("sft", config) == 0
    output = tmp_path / "out"
    straight = load_state_dict(output / "final")
    import shutil

    shutil.rmtree(output / "final")
    steps = [step for step, _ in complete_checkpoints(output)]
    assert steps == [6, 8, 10]
    latest = output / "checkpoints" / "step-10"
    target = latest / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # truncated behind our back

    assert run_in_process("sft", config) == 0
    err = capfd.readouterr().err
    assert f"WARNING: checkpoint {latest} cannot be" in err and "falling back to the previous checkpoint" in err
    assert f"resumed from {output / 'checkpoints' / 'step-8'} at step 8" in err
    assert max_abs_diff(straight, load_state_dict(output / "final")) < TOLERANCE


def _model_with_nan(source, target):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_a_non_finite_loss_stops_supervised_stages_naming_the_values(tmp_path, tiny_model_dir, stage):
    broken = _model_with_nan(tiny_model_dir, tmp_path / "nan-model")
    job = (sft_job if stage == "sft" else reward_job)(tmp_path, broken, checkpointEverySteps=1)
    assert run_in_process(stage, write_job(tmp_path / "job.yaml", **job)) == 1  # retryable, like PPO's guard
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith(f"{stage}: non-finite values at step 1: grad_norm=nan, loss=nan; lower {stage}.learningRate")
    # Stopped before the optimizer step: no checkpoint of poisoned weights.
    assert complete_checkpoints(tmp_path / "out") == []
