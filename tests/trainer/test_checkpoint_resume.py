"""Resume after a kill: the resumed run ends where an uninterrupted one does, with the same weights.

The kill is deterministic: FINETUNE_FAIL_AT_STEP makes the process exit with
137 (as if SIGKILLed) right after the checkpoint of that step is complete.
Tolerance 1e-5 (max abs weight difference, fp32 on CPU): the interrupted run
computes its first steps in a subprocess with one thread and the reference in
this process, so float reductions may be ordered differently; a resume that
lost the optimizer state, scheduler or data position differs by ~1e-3 or more.
"""

from __future__ import annotations

import pytest

from trainer.checkpoint import COMPLETE_MARKER, complete_checkpoints, latest_checkpoint

from .stage_runs import load_state_dict, max_abs_diff, progress_events, run_cli, run_in_process, write_job
from .test_reward_model import reward_job
from .test_sft import sft_job

TOLERANCE = 1e-5


def _run_interrupted_then_resumed(tmp_path, stage: str, job: dict, *, fail_at: int):
    config = write_job(tmp_path / f"{stage}-resumed.yaml", **job)
    killed = run_cli(stage, config, env={"FINETUNE_FAIL_AT_STEP": str(fail_at)})
    assert killed.returncode == 137, killed.stderr[-3000:]
    output = tmp_path / job["outputDir"]
    assert not (output / "final").exists()
    assert latest_checkpoint(output).name == f"step-{fail_at}"
    assert run_in_process(stage, config) == 0
    events = progress_events(output)
    resumed_from = [e for e in events if e["kind"] == "progress" and not e.get("metrics")][-1]
    assert resumed_from["step"] == fail_at
    return events


def test_sft_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    settings = dict(epochs=3, batchSize=2, gradientAccumulationSteps=2, checkpointEverySteps=2, keepCheckpoints=2)
    reference = sft_job(tmp_path, tiny_model_dir, output="straight", **settings)
    assert run_in_process("sft", write_job(tmp_path / "sft-straight.yaml", **reference)) == 0

    resumed = sft_job(tmp_path, tiny_model_dir, output="resumed", **settings)
    events = _run_interrupted_then_resumed(tmp_path, "sft", resumed, fail_at=4)

    straight_events = progress_events(tmp_path / "straight")
    # 9 rows in micro-batches of 2: 5 per epoch, 15 in 3 epochs, 2 per step: 8 steps (the last one short).
    assert events[-1]["step"] == straight_events[-1]["step"] == 8
    diff = max_abs_diff(load_state_dict(tmp_path / "straight" / "final"),
                        load_state_dict(tmp_path / "resumed" / "final"))
    print(f"max abs weight difference after resume: {diff:.3g}")
    assert diff < TOLERANCE, diff
    # keepCheckpoints=2: only the two newest complete checkpoints remain.
    assert [step for step, _ in complete_checkpoints(tmp_path / "resumed")] == [6, 8]


def test_reward_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    settings = dict(epochs=2, checkpointEverySteps=3)
    reference = reward_job(tmp_path, tiny_model_dir, output="straight", **settings)
    assert run_in_process("reward", write_job(tmp_path / "rm-straight.yaml", **reference)) == 0

    resumed = reward_job(tmp_path, tiny_model_dir, output="resumed", **settings)
    events = _run_interrupted_then_resumed(tmp_path, "reward", resumed, fail_at=3)

    assert events[-1]["step"] == progress_events(tmp_path / "straight")[-1]["step"] == 10
    diff = max_abs_diff(load_state_dict(tmp_path / "straight" / "final"),
                        load_state_dict(tmp_path / "resumed" / "final"))
    print(f"max abs weight difference after resume: {diff:.3g}")
    assert diff < TOLERANCE, diff


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in [(2, True), (4, True), (6, False)]:
        (root / f"step-{step}").mkdir(parents=True)
        if complete:
            (root / f"step-{step}" / COMPLETE_MARKER).write_text("")
    (root / ".tmp-step-8").mkdir()  # a save killed before its rename
    (root / ".tmp-step-8" / COMPLETE_MARKER).write_text("")
    assert latest_checkpoint(tmp_path) == root / "step-4"
    assert latest_checkpoint(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_lora_checkpoints_of_supervised_stages_hold_the_adapters_not_the_base_and_resume_exactly(
        tmp_path, tiny_model_dir, stage):
    """A LoRA SFT or reward checkpoint holds the adapters (and the reward model's score head), not the
    frozen base; a kill after it and a restart give the uninterrupted run's weights."""
    from safetensors import safe_open

    from .stage_runs import write_jsonl

    lora = {"rank": 4, "alpha": 8, "dropout": 0.0}
    if stage == "sft":
        data = {"sft": str(write_jsonl(tmp_path / "sft.jsonl", [
            {"prompt": f"Say {w}?", "completion": f" {w}!"} for w in ("yes", "no", "maybe", "hello") * 2]))}
    else:
        data = {"preferences": str(write_jsonl(tmp_path / "prefs.jsonl", [
            {"prompt": f"Say {w}?", "chosen": " yes", "rejected": " no"} for w in ("a", "b", "c", "d") * 2]))}
    settings = {"batchSize": 2, "maxSteps": 4, "learningRate": 1e-2, "checkpointEverySteps": 2, "lora": lora}

    def job(output):
        return write_job(tmp_path / f"{output}.yaml", stage=stage, model=str(tiny_model_dir), data=data,
                         outputDir=str(tmp_path / output), **{stage: settings})

    straight = run_cli(stage, job("straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = complete_checkpoints(tmp_path / "straight")[-1][1]
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora_" in k or (stage == "reward" and ".score." in k) for k in keys), keys[:5]
    base_bytes = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert (checkpoint / "model.safetensors").stat().st_size < base_bytes / 4

    resumed = job("resumed")
    killed = run_cli(stage, resumed, env={"FINETUNE_FAIL_AT_STEP": "2"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    result = run_cli(stage, resumed)
    assert result.returncode == 0 and "resumed from" in result.stderr + result.stdout, result.stderr[-3000:]
    assert max_abs_diff(load_state_dict(tmp_path / "straight" / "final"),
                        load_state_dict(tmp_path / "resumed" / "final")) < 1e-6
