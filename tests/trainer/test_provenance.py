"""Outputs are never stale or mixed up: the fingerprint in checkpoints and final/ decides what is reused.

The cases (docs/trainer.md, "Outputs are never stale"):
another run's outputs are removed and the stage retrains; this run's outputs are
reused only for the same inputs and settings, else the stage fails naming what
changed; learning rate and weight decay changed at a resume are applied.
Runs are in-process (a few seconds each on the tiny model); "interrupted" is
simulated by removing final/ and the newest checkpoints of a finished run.
"""

from __future__ import annotations

import json
import shutil

import pytest

from trainer.checkpoint import STATE_FILE, complete_checkpoints
from trainer.config import PERMANENT_FAILURE_EXIT_CODE, PERMANENT_FAILURE_PREFIX, StageJob
from trainer.provenance import FINGERPRINT_FILE, differences, file_digest, job_fingerprint, model_identity

from .stage_runs import load_state_dict, max_abs_diff, progress_events, run_in_process, write_job, write_jsonl
from .test_sft import sft_job

SETTINGS = dict(epochs=2, batchSize=2, checkpointEverySteps=2, keepCheckpoints=5, logEverySteps=1)
# 9 rows in batches of 2: 5 steps per epoch, 10 steps, checkpoints at 2, 4, 6, 8, 10.


def _job(tmp_path, model_dir, *, uid="run-a", data_rows=None, output="out", **settings) -> dict:
    job = sft_job(tmp_path, model_dir, output=output, **{**SETTINGS, **settings})
    job["runUid"] = uid
    if data_rows is not None:
        job["data"]["sft"] = str(write_jsonl(tmp_path / f"sft-{output}-{uid}.jsonl", data_rows))
    return job


def _run(tmp_path, job: dict, name: str = "job.yaml") -> int:
    return run_in_process("sft", write_job(tmp_path / name, **job))


def _interrupt_after(output, step: int) -> None:
    """Make a finished run look killed after ``step``: no final/, no checkpoint after that step."""
    shutil.rmtree(output / "final")
    for saved, path in complete_checkpoints(output):
        if saved > step:
            shutil.rmtree(path)


NEW_ROWS = [{"prompt": f"Question {i}?", "completion": f" Answer number {i} is new."} for i in range(7)]


def test_a_new_run_in_the_same_output_dir_retrains_on_its_own_data(tmp_path, tiny_model_dir, capfd):
    old = _job(tmp_path, tiny_model_dir, uid="run-a")
    assert _run(tmp_path, old) == 0
    new = _job(tmp_path, tiny_model_dir, uid="run-b", data_rows=NEW_ROWS)
    assert _run(tmp_path, new) == 0
    assert "holds outputs of another run: checkpoints/step-10 (run run-a)" in capfd.readouterr().err

    final = tmp_path / "out" / "final"
    recorded = json.loads((final / FINGERPRINT_FILE).read_text())
    assert recorded["runUid"] == "run-b"
    assert recorded["inputs"]["data.sft"] == file_digest(new["data"]["sft"])
    # Trained from scratch on the new data: the same weights as the new run in a fresh directory.
    fresh = _job(tmp_path, tiny_model_dir, uid="run-b", data_rows=NEW_ROWS, output="fresh")
    assert _run(tmp_path, fresh, "fresh.yaml") == 0
    assert max_abs_diff(load_state_dict(final), load_state_dict(tmp_path / "fresh" / "final")) == 0.0
    # The old run's progress log went with its outputs.
    assert [e["kind"] for e in progress_events(tmp_path / "out")].count("started") == 1


def test_an_interrupted_run_of_another_uid_is_not_resumed(tmp_path, tiny_model_dir, capfd):
    assert _run(tmp_path, _job(tmp_path, tiny_model_dir, uid="run-a")) == 0
    _interrupt_after(tmp_path / "out", 4)
    assert _run(tmp_path, _job(tmp_path, tiny_model_dir, uid="run-b")) == 0
    err = capfd.readouterr().err
    assert "another run" in err and "resumed from" not in err
    starts = [e["step"] for e in progress_events(tmp_path / "out") if e["kind"] == "progress" and not e.get("metrics")]
    assert starts == [0]


def test_a_finished_stage_of_the_same_run_is_not_redone(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir)
    assert _run(tmp_path, job) == 0
    weights = tmp_path / "out" / "final" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    count = len(progress_events(tmp_path / "out"))
    # Operational settings (log and checkpoint cadence) do not make final/ stale.
    assert _run(tmp_path, {**job, "sft": {**job["sft"], "logEverySteps": 5}}) == 0
    assert weights.stat().st_mtime_ns == written
    assert [e["kind"] for e in progress_events(tmp_path / "out")[count:]] == ["succeeded"]


def test_changed_data_under_a_finished_stage_fails_naming_the_file(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir)
    assert _run(tmp_path, job) == 0
    write_jsonl(tmp_path / "sft.jsonl", NEW_ROWS)  # the same path, new content
    assert _run(tmp_path, job) == PERMANENT_FAILURE_EXIT_CODE
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith(PERMANENT_FAILURE_PREFIX) and "final was produced from other inputs" in message
    assert "data.sft: sha256:" in message and "re-create the FineTuneRun" in message


def test_changed_data_under_a_checkpoint_is_never_resumed_from(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir)
    assert _run(tmp_path, job) == 0
    _interrupt_after(tmp_path / "out", 4)
    old_digest = file_digest(tmp_path / "sft.jsonl")
    write_jsonl(tmp_path / "sft.jsonl", NEW_ROWS)
    assert _run(tmp_path, job) == PERMANENT_FAILURE_EXIT_CODE
    message = (tmp_path / "termination-log").read_text()
    assert f"checkpoint {tmp_path / 'out' / 'checkpoints' / 'step-4'} was written with other inputs" in message
    assert f"data.sft: sha256:{old_digest[7:19]} -> sha256:" in message
    assert [s for s, _ in complete_checkpoints(tmp_path / "out")][-1] == 4  # kept: restoring the data resumes


@pytest.mark.parametrize(("setting", "new", "shown"), [
    ("batchSize", 4, "sft.batchSize: 2 -> 4"),
    ("seed", 1, "sft.seed: 0 -> 1"),
    ("lora", {"rank": 4}, "sft.lora: null -> {"),
])
def test_a_resume_with_a_setting_that_shapes_training_fails_saying_what_changed(tmp_path, tiny_model_dir,
                                                                                 setting, new, shown):
    assert _run(tmp_path, _job(tmp_path, tiny_model_dir)) == 0
    _interrupt_after(tmp_path / "out", 4)
    assert _run(tmp_path, _job(tmp_path, tiny_model_dir, **{setting: new})) == PERMANENT_FAILURE_EXIT_CODE
    assert shown in (tmp_path / "termination-log").read_text()


def test_a_resume_applies_a_new_learning_rate_from_the_step_it_resumes_at(tmp_path, tiny_model_dir, capfd):
    assert _run(tmp_path, _job(tmp_path, tiny_model_dir, learningRate=3e-3)) == 0
    straight = {e["step"]: e["metrics"]["learning_rate"] for e in progress_events(tmp_path / "out")
                if e["kind"] == "progress" and e.get("metrics")}
    _interrupt_after(tmp_path / "out", 4)
    count = len(progress_events(tmp_path / "out"))
    assert _run(tmp_path, _job(tmp_path, tiny_model_dir, learningRate=1e-3, weightDecay=0.1)) == 0
    err = capfd.readouterr().err
    assert "resuming with a changed setting, applied from now on: sft.learningRate: 0.003 -> 0.001" in err
    assert "sft.weightDecay: 0.0 -> 0.1" in err
    resumed = {e["step"]: e["metrics"]["learning_rate"] for e in progress_events(tmp_path / "out")[count:]
               if e["kind"] == "progress" and e.get("metrics")}
    assert sorted(resumed) == list(range(5, 11))
    for step, rate in resumed.items():  # same warm-up/decay position, a third of the peak
        assert rate == pytest.approx(straight[step] / 3, rel=1e-9), step
    recorded = json.loads((tmp_path / "out" / "final" / FINGERPRINT_FILE).read_text())
    assert recorded["settings"]["learningRate"] == 1e-3


def test_outputs_without_a_fingerprint_are_treated_as_another_runs(tmp_path, tiny_model_dir):
    """Written before fingerprints existed: whose they are is unknown, so they are never resumed from."""
    job = _job(tmp_path, tiny_model_dir)
    assert _run(tmp_path, job) == 0
    _interrupt_after(tmp_path / "out", 4)
    state_file = tmp_path / "out" / "checkpoints" / "step-4" / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["fingerprint"]
    state_file.write_text(json.dumps(state))
    assert _run(tmp_path, job) == 0
    starts = [e["step"] for e in progress_events(tmp_path / "out") if e["kind"] == "progress" and not e.get("metrics")]
    assert starts == [0]


def test_fingerprint_names_every_input_setting_and_process_count_that_differs(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    job = StageJob.model_validate({"stage": "ppo", "model": str(tiny_model_dir), "outputDir": str(tmp_path / "o"),
                                   "runUid": "u1", "data": {"prompts": str(data)},
                                   "reward": {"functions": [{"type": "keywords", "keywords": ["x"]}]}})
    one = job_fingerprint(job, processes=1)
    assert one["runUid"] == "u1" and set(one["inputs"]) == {"model", "data.prompts", "rewardModel", "reward.functions"}
    assert one["inputs"]["model"] == model_identity(str(tiny_model_dir))
    changed = job.model_copy(update={"ppo": job.ppo.model_copy(update={"kl_coef": 0.5, "log_every_steps": 3})})
    changed.reward.functions[0].keywords = ["y"]
    other = job_fingerprint(changed, processes=2)
    assert differences(one, other, stage="ppo", ignore_settings=frozenset({"log_every_steps"})) == [
        'reward.functions: [{"type": "keywords", "weight": 1.0, "keywords": ["x"]}] -> '
        '[{"type": "keywords", "weight": 1.0, "keywords": ["y"]}]',
        "ppo.klCoef: 0.05 -> 0.5",
        "processes: 1 -> 2",
    ]


def test_a_model_written_by_the_trainer_is_identified_by_its_fingerprint_not_its_file_times(tmp_path):
    model = tmp_path / "final"
    model.mkdir()
    (model / "config.json").write_text("{}")
    by_listing = model_identity(str(model))
    assert by_listing.startswith("files:")
    (model / FINGERPRINT_FILE).write_text('{"runUid": "u"}')
    assert model_identity(str(model)) == file_digest(model / FINGERPRINT_FILE)
    assert model_identity("hf://org/name@abc") == "hf://org/name@abc"
    assert model_identity(str(tmp_path / "none")) == "missing"
