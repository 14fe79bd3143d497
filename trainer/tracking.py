"""Optional experiment tracking (``reportTo``): the stage's metrics also go to MLflow or Weights & Biases.

Off by default. Neither package is in the trainer image (each pulls in dozens of
dependencies most users do not want); a stage that asks for one the image lacks fails
at once, permanently, saying which package to add (``FROM`` the trainer image, ``pip
install mlflow-skinny`` or ``wandb``). Where the metrics go is the library's usual
environment, set through the run's ``podTemplate`` env:

* MLflow: ``MLFLOW_TRACKING_URI`` (a server, or ``file:///artifacts/mlruns`` on the volume),
  ``MLFLOW_EXPERIMENT_NAME`` (default ``finetune``), credentials as MLflow reads them.
* Weights & Biases: ``WANDB_API_KEY``, ``WANDB_PROJECT`` (default ``finetune``), ``WANDB_ENTITY``;
  ``WANDB_MODE=offline`` writes the run under ``<outputDir>/wandb`` for a later ``wandb sync``.

One tracking run per stage attempt, named ``<stage>`` plus the FineTuneRun uid's first
characters when the operator started it, with the stage's settings as parameters. The
metrics are those of the progress events (the same names as the pod log and TensorBoard),
at the event's step. A tracking service that fails is reported on stderr and never stops
training (``FanOutReporter``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from trainer.config import StageJob
from trainer.reporting import ProgressEvent

PACKAGES = {"mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}
DEFAULT_PROJECT = "finetune"
_END_STATUS = {"succeeded": ("FINISHED", 0), "failed": ("FAILED", 1), "interrupted": ("KILLED", 1)}


class TrackingUnavailable(RuntimeError):
    """``reportTo`` names a library the image does not have; the message says what to install."""


def _flat(prefix: str, value: Any, into: dict[str, Any]) -> dict[str, Any]:
    """{"lora": {"rank": 8}} -> {"lora.rank": 8}: both trackers want flat parameters."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else key, inner, into)
    else:
        into[prefix] = value
    return into


def run_name(job: StageJob) -> str:
    return job.stage if not job.run_uid else f"{job.stage}-{job.run_uid[:8]}"


def stage_parameters(job: StageJob) -> dict[str, Any]:
    settings = getattr(job, job.stage).model_dump(mode="json", by_alias=True)
    return _flat("", {"stage": job.stage, "model": job.model, job.stage: settings}, {})


def require_packages(job: StageJob) -> None:
    """TrackingUnavailable naming the field and the package for every ``reportTo`` entry the image cannot
    serve. Checked on every process before training, although only the main process reports."""
    for name in getattr(getattr(job, job.stage), "report_to", None) or []:
        if importlib.util.find_spec(name) is None:
            raise TrackingUnavailable(
                f"{job.stage}.reportTo lists {name!r}, but the trainer image has no {name} package: build an "
                f"image FROM the trainer image with `pip install {PACKAGES[name].split(' ')[0]}` and set "
                f"spec.image to it, or remove {name!r} from reportTo")


class MLflowReporter:
    """Metrics to the MLflow tracking server (or file store) named by MLFLOW_TRACKING_URI."""

    def __init__(self, job: StageJob, *, module=None):
        self._mlflow = module or importlib.import_module("mlflow")
        self._mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT))
        self._run = self._mlflow.start_run(run_name=run_name(job))
        # MLflow's parameter values are strings of at most 6000 characters.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in stage_parameters(job).items()})
        self._open = True

    def report(self, event: ProgressEvent) -> None:
        if not self._open:
            return
        if event.metrics:
            self._mlflow.log_metrics({k: float(v) for k, v in event.metrics.items()}, step=event.step)
        if event.kind in _END_STATUS:
            self._mlflow.end_run(status=_END_STATUS[event.kind][0])
            self._open = False

    def close(self) -> None:
        if self._open:
            self._mlflow.end_run(status="KILLED")
            self._open = False


class WandbReporter:
    """Metrics to Weights & Biases (WANDB_API_KEY, WANDB_PROJECT; WANDB_MODE=offline writes files only)."""

    def __init__(self, job: StageJob, *, output_dir: Path, module=None):
        self._wandb = module or importlib.import_module("wandb")
        self._run = self._wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_name(job),
                                     group=job.run_uid or None, job_type=job.stage, dir=str(output_dir),
                                     config=stage_parameters(job), reinit="create_new")
        self._open = True

    def report(self, event: ProgressEvent) -> None:
        if not self._open:
            return
        if event.metrics:
            self._run.log({f"{event.stage}/{k}": float(v) for k, v in event.metrics.items()}, step=event.step)
        if event.kind in _END_STATUS:
            self._run.finish(exit_code=_END_STATUS[event.kind][1])
            self._open = False

    def close(self) -> None:
        if self._open:
            self._run.finish(exit_code=1)
            self._open = False


def tracking_reporters(job: StageJob, *, output_dir: Path) -> list:
    """A reporter per entry of the stage's ``reportTo`` (``require_packages`` first)."""
    require_packages(job)
    targets = getattr(getattr(job, job.stage), "report_to", None) or []
    reporters: list = []
    for target in targets:
        try:
            reporters.append(MLflowReporter(job) if target == "mlflow" else WandbReporter(job, output_dir=output_dir))
        except Exception as exc:  # an unreachable tracking server must not cost the training
            print(f"WARNING: {job.stage}.reportTo {target}: could not start a tracking run "
                  f"({type(exc).__name__}: {exc}); the metrics still go to the log, progress.jsonl and TensorBoard",
                  file=sys.stderr, flush=True)
    return reporters
