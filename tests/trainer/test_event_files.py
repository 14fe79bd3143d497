"""TensorBoard event files: what the trainer writes, read back with tensorboard's own loader."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.event_files import EventFileWriter, crc32c
from trainer.reporting import ProgressEvent, TensorBoardReporter


def test_crc32c_matches_the_published_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720, appendix B.4


def test_scalars_written_are_the_scalars_tensorboard_reads(tmp_path):
    writer = EventFileWriter(tmp_path, clock=lambda: 1_780_000_000.0)
    writer.add_scalars(1, {"ppo/kl": 0.25, "ppo/reward_mean": -1.5})
    writer.add_scalars(300, {"ppo/kl": 3.0})
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["ppo/kl", "ppo/reward_mean"]
    assert [(e.step, e.value) for e in events.Scalars("ppo/kl")] == [(1, 0.25), (300, 3.0)]
    assert [(e.step, e.value, e.wall_time) for e in events.Scalars("ppo/reward_mean")] == [(1, -1.5, 1_780_000_000.0)]


def test_the_reporter_writes_each_events_metrics_under_the_stage_name(tmp_path):
    reporter = TensorBoardReporter(tmp_path / "tensorboard")
    reporter.report(ProgressEvent(stage="sft", kind="started"))
    reporter.report(ProgressEvent(stage="sft", kind="progress", step=3, total_steps=10, metrics={"loss": 2.5}))
    reporter.report(ProgressEvent(stage="sft", kind="samples", step=3, total_steps=10,
                                  metrics={"eval_reward_mean": 0.5}))
    reporter.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["sft/eval_reward_mean", "sft/loss"]
    assert [(e.step, e.value) for e in events.Scalars("sft/loss")] == [(3, 2.5)]


def test_a_stage_writes_its_metrics_as_tensorboard_scalars_in_its_output_directory(tmp_path, tiny_model_dir):
    from .stage_runs import run_in_process, write_job, write_jsonl

    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Question {i}?", "completion": " yes"} for i in range(8)])
    job = write_job(tmp_path / "sft.yaml", stage="sft", model=str(tiny_model_dir), outputDir=str(tmp_path / "out"),
                    data={"sft": str(data)}, sft={"maxSteps": 2, "batchSize": 4, "precision": "fp32"})
    assert run_in_process("sft", job) == 0
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2]
