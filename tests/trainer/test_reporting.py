"""The human-readable progress lines a pod's log shows: UTC time, step, pace and time to finish."""

from __future__ import annotations

import io
import json

from trainer.reporting import LocalReporter, ProgressEvent, StepPace

T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z


def event(step: int, seconds: float, *, kind: str = "progress", total: int = 100, **fields) -> ProgressEvent:
    return ProgressEvent(stage="ppo", kind=kind, step=step, total_steps=total, time=T0 + seconds, **fields)


def test_each_line_starts_with_the_events_utc_time_and_progress_lines_carry_pace_and_eta(tmp_path):
    log = io.StringIO()
    reporter = LocalReporter(jsonl_path=tmp_path / "progress.jsonl", stream=log)
    reporter.report(event(0, 0))
    reporter.report(event(10, 50, metrics={"tokens_per_second": 123.0}))
    reporter.close()
    first, second = log.getvalue().splitlines()
    assert first == "2026-05-28T20:26:40Z [ppo] progress 0/100"
    # 10 steps in 50 s: 5 s a step, 90 steps to go
    assert second == "2026-05-28T20:27:30Z [ppo] progress 10/100 5s/step eta 7m30s tokens_per_second=123"
    assert [json.loads(line)["step"] for line in (tmp_path / "progress.jsonl").read_text().splitlines()] == [0, 10]


def test_pace_is_measured_from_the_step_a_resumed_stage_started_at():
    pace = StepPace()
    assert pace.update(event(40, 0)) is None  # resumed at step 40: no pace yet
    assert pace.update(event(40, 0, kind="checkpoint")) is None
    assert pace.update(event(42, 3)) == "1.5s/step eta 1m27s"  # 58 steps to go
    assert pace.update(event(140, 3600, total=4000)) == "36s/step eta 38h36m00s"


def test_a_stage_logs_no_progress_bars_or_load_reports(tmp_path, tiny_model_dir, capfd):
    from .stage_runs import run_in_process, write_job, write_jsonl

    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Question {i}?", "completion": " yes"} for i in range(8)])
    job = write_job(tmp_path / "sft.yaml", stage="sft", model=str(tiny_model_dir), outputDir=str(tmp_path / "out"),
                    data={"sft": str(data)}, sft={"maxSteps": 2, "batchSize": 4, "precision": "fp32"})
    assert run_in_process("sft", job) == 0
    log = capfd.readouterr().err
    assert "Z [sft] succeeded 2/2" in log
    for noise in ("Loading weights", "Writing model shards", "LOAD REPORT", "it/s]"):
        assert noise not in log, f"{noise!r} in the stage's log:\n{log}"


def test_sample_lines_show_the_scores_each_stage_gives_its_samples():
    log = io.StringIO()
    reporter = LocalReporter(jsonl_path=None, stream=log)
    reporter.report(event(5, 1, kind="samples", samples=[{"response": "yes", "reward": 0.5, "kl": 0.25}]))
    reporter.report(event(6, 2, kind="samples", samples=[
        {"response": "sure", "chosen_reward": 1.25, "rejected_reward": -0.5}]))  # DPO: implicit rewards
    lines = log.getvalue().splitlines()
    assert lines[1] == "  sample reward=0.500 kl=0.250: 'yes'"
    assert lines[3] == "  sample chosen_reward=1.250 rejected_reward=-0.500: 'sure'"
