"""reportTo: a stage's metrics also go to MLflow or Weights & Biases; off by default, refused clearly
when the image lacks the package.

MLflow is tested for real and offline: mlflow-skinny (a dev dependency) with its file store in
tmp_path. wandb is not a dev dependency (it pulls a Go service binary and a beta package), so its
reporter is tested against a stand-in module that records what the trainer asks of the wandb API.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from .stage_runs import progress_events, run_in_process, write_job, write_jsonl
from .test_sft import sft_rows


def sft_job(tmp_path, model_dir, **settings):
    return write_job(tmp_path / "job.yaml", stage="sft", model=str(model_dir), outputDir=str(tmp_path / "out"),
                     data={"sft": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows()))},
                     sft={"batchSize": 4, "maxSteps": 2, "learningRate": 1e-3, **settings})


def test_report_to_mlflow_logs_the_stage_metrics_and_settings_offline(tmp_path, tiny_model_dir, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a file store is offline
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    mlflow.set_tracking_uri(store)
    assert run_in_process("sft", sft_job(tmp_path, tiny_model_dir, reportTo=["mlflow"])) == 0

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tracking-test").experiment_id])
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    assert run.data.params["sft.learningRate"] == "0.001" and run.data.params["model"] == str(tiny_model_dir)
    history = client.get_metric_history(run.info.run_id, "loss")
    logged = {e["step"]: e["metrics"]["loss"] for e in progress_events(tmp_path / "out") if "loss" in e.get("metrics", {})}
    assert {m.step: m.value for m in history} == logged and sorted(logged) == [1, 2]


class FakeWandb:
    """The part of the wandb API the reporter uses, recording every call."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return SimpleNamespace(log=lambda data, step: self.calls.append(("log", data, step)),
                               finish=lambda exit_code: self.calls.append(("finish", exit_code)))


def test_report_to_wandb_starts_one_run_per_stage_logs_each_event_and_finishes(tmp_path, monkeypatch):
    from trainer.config import StageJob
    from trainer.reporting import ProgressEvent
    from trainer.tracking import WandbReporter

    monkeypatch.setenv("WANDB_PROJECT", "helpful")
    job = StageJob.model_validate({"stage": "ppo", "model": "/m", "outputDir": str(tmp_path), "runUid": "abcdef123456",
                                   "ppo": {"reportTo": ["wandb"], "lora": {"rank": 4}}})
    fake = FakeWandb()
    reporter = WandbReporter(job, output_dir=tmp_path, module=fake)
    reporter.report(ProgressEvent(stage="ppo", kind="progress", step=3, total_steps=5, metrics={"kl": 0.5}))
    reporter.report(ProgressEvent(stage="ppo", kind="samples", step=3, total_steps=5, samples=[{"response": "x"}]))
    reporter.report(ProgressEvent(stage="ppo", kind="succeeded", step=5, total_steps=5))
    reporter.close()  # after the end event: nothing more
    (_, init), *rest = fake.calls
    assert init["project"] == "helpful" and init["name"] == "ppo-abcdef12" and init["dir"] == str(tmp_path)
    assert init["group"] == "abcdef123456" and init["config"]["ppo.lora.rank"] == 4
    assert rest == [("log", {"ppo/kl": 0.5}, 3), ("finish", 0)]


def test_a_report_to_package_missing_from_the_image_fails_at_start_naming_field_and_package(
        tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec now says: not installed
    config = sft_job(tmp_path, tiny_model_dir, reportTo=["wandb"])
    assert run_in_process("sft", config) == 3  # permanent: a retry in the same image cannot help
    message = (tmp_path / "termination-log").read_text()
    assert "sft.reportTo lists 'wandb'" in message and "pip install wandb" in message
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_report_to_is_off_by_default_and_never_blocks_a_resume():
    from trainer.config import SFTConfig

    assert SFTConfig().report_to == [] and "report_to" in SFTConfig.OPERATIONAL_SETTINGS
