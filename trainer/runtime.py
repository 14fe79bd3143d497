"""Running one stage: the context every stage receives, and the failure policy.

``run_stage`` is the only place that turns exceptions into exit codes and
termination messages; stages raise and never print their own failure.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import (
    EXPECTED_GPUS_ENV, PERMANENT_FAILURE_EXIT_CODE, PERMANENT_FAILURE_PREFIX, ConfigError, StageJob,
)
from trainer.metrics import GAUGES, TrainerMetrics
from trainer.reporting import FanOutReporter, LocalReporter, ProgressEvent, Reporter, write_termination_message

COMPLETE_MARKER = "COMPLETE"
"""File written last into a finished directory (checkpoint or final model); its presence means complete."""

STAGE_MODULES = {"sft": "trainer.sft", "reward": "trainer.reward_model", "ppo": "trainer.ppo"}


class StageFailed(Exception):
    """A stage cannot go on for a reason the user can act on; the message is that reason."""


class PermanentStageFailure(StageFailed):
    """A StageFailed that retrying cannot fix (a missing model, an invalid reward function, no CUDA):
    the process exits with ``PERMANENT_FAILURE_EXIT_CODE`` and the operator does not retry."""


def is_permanent(exc: BaseException) -> bool:
    """Whether ``exc`` fails the same way on every retry (the trainer exits with the permanent code)."""
    from trainer.data import DatasetError

    return isinstance(exc, (PermanentStageFailure, DatasetError, ConfigError))


def stage_config(job: StageJob):
    """The settings block of the job's own stage (SFTConfig, RewardConfig or PPOConfig)."""
    return {"sft": job.sft, "reward": job.reward, "ppo": job.ppo}[job.stage]


def resolve_dtype(precision: str, *, cuda: bool, bf16_supported: bool) -> torch.dtype:
    """Compute dtype for a precision setting: auto is bf16 on CUDA with bf16 support, else fp32."""
    if precision == "auto":
        return torch.bfloat16 if cuda and bf16_supported else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class StageContext:
    """What a stage needs from its surroundings.

    ``dtype`` is the compute dtype (bf16 / fp16 run under autocast, with fp32
    master weights for trained parameters); frozen models (reference, reward)
    may be loaded in it directly.
    """

    job: StageJob
    accelerator: Any  # accelerate.Accelerator
    reporter: Reporter
    metrics: TrainerMetrics
    output_dir: Path
    device: torch.device
    dtype: torch.dtype
    step: int = field(default=0)
    """Last step reported; the failure event carries it."""
    total_steps: int = field(default=0)
    """Planned steps, as last reported; the success event carries it."""

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def report(self, kind: str, *, step: int, total_steps: int, metrics: dict[str, float] | None = None,
               samples: list[dict] | None = None, checkpoint: str | None = None,
               artifact: str | None = None, reason: str | None = None) -> None:
        """Emit a ProgressEvent (main process only) and set the Prometheus gauges it names.

        Metric names that are trainer gauges (``trainer.metrics.GAUGES``) also
        update /metrics; any other name only travels in the event.
        """
        self.step = step
        self.total_steps = total_steps or self.total_steps
        if not self.accelerator.is_main_process:
            return
        metrics = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
        self.metrics.update(step=step, total_steps=total_steps,
                            **{k: v for k, v in metrics.items() if k in GAUGES})
        if self.device.type == "cuda":
            self.metrics.update(gpu_memory_allocated_bytes=torch.cuda.memory_allocated(self.device))
        self.reporter.report(ProgressEvent(
            stage=self.job.stage, kind=kind, step=step, total_steps=total_steps, metrics=metrics,
            samples=samples, checkpoint=checkpoint, artifact=artifact, reason=reason,
        ))


def check_cuda(*, expected_gpus: str | None, cuda: bool) -> None:
    """PermanentStageFailure when the pod was given GPUs (``expected_gpus`` > 0) but CUDA sees none.

    Training on the CPU instead would take days and look like a hang; a retry on the same image
    and node class fails the same way (usually a CPU-only torch build or a missing driver).
    """
    try:
        wanted = int(expected_gpus or 0)
    except ValueError:
        wanted = 0
    if wanted > 0 and not cuda:
        raise PermanentStageFailure(
            f"{wanted} GPU(s) were requested (spec.resources.gpus) but CUDA is not available in the container "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): use an image with a CUDA build of "
            "torch and nodes with the NVIDIA driver, or set gpus to 0")


def build_context(job: StageJob) -> StageContext:
    """Accelerator, reporters and metrics for ``job``; starts the metrics server on the main process."""
    from accelerate import Accelerator

    cfg = stage_config(job)
    cuda = torch.cuda.is_available()
    check_cuda(expected_gpus=os.environ.get(EXPECTED_GPUS_ENV), cuda=cuda)
    dtype = resolve_dtype(cfg.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = TrainerMetrics(stage=job.stage, gpu=cuda)
    reporters: list[Reporter] = []
    if accelerator.is_main_process:
        progress = job.reporting.progress_file or output_dir / "progress.jsonl"
        reporters.append(LocalReporter(jsonl_path=progress))
        if job.reporting.progress_config_map:
            # Imported lazily: the kubernetes client is only needed in a cluster.
            from trainer.kube_reporter import KubernetesReporter

            reporters.append(KubernetesReporter(config_map=job.reporting.progress_config_map,
                                                min_interval_seconds=job.reporting.report_interval_seconds))
        if job.reporting.metrics_port is not None:
            metrics.start_server(job.reporting.metrics_port)
    return StageContext(job=job, accelerator=accelerator, reporter=FanOutReporter(reporters),
                        metrics=metrics, output_dir=output_dir, device=accelerator.device, dtype=dtype)


def failure_reason(exc: BaseException) -> str:
    """What the user reads in ``kubectl describe``: short for expected errors, type and place otherwise."""
    from trainer.data import DatasetError

    if isinstance(exc, (StageFailed, DatasetError, ConfigError)):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def final_is_complete(output_dir: Path) -> bool:
    return (output_dir / "final" / COMPLETE_MARKER).is_file()


def termination_message(exc: BaseException) -> str:
    """The failure reason, prefixed with ``PERMANENT_FAILURE_PREFIX`` when retrying cannot help."""
    reason = failure_reason(exc)
    return PERMANENT_FAILURE_PREFIX + reason if is_permanent(exc) else reason


def exit_code(exc: BaseException) -> int:
    return PERMANENT_FAILURE_EXIT_CODE if is_permanent(exc) else 1


def run_stage(job: StageJob) -> int:
    """Run the job's stage; return the process exit code: 0 success, ``PERMANENT_FAILURE_EXIT_CODE``
    for an error that retrying cannot fix (``is_permanent``), 1 for any other failure.

    On failure the reason is reported, printed and written to
    ``reporting.terminationLogPath``. A stage whose ``final/`` is already
    complete succeeds at once, so a re-run of a finished pod does no work.
    """
    ctx = None
    try:
        ctx = build_context(job)
        if final_is_complete(ctx.output_dir):
            ctx.report("succeeded", step=0, total_steps=0, artifact=str(ctx.output_dir / "final"))
            return 0
        ctx.report("started", step=0, total_steps=0)
        stage = importlib.import_module(STAGE_MODULES[job.stage])
        artifact = stage.run(ctx)
        ctx.report("succeeded", step=ctx.total_steps, total_steps=ctx.total_steps, artifact=str(artifact))
        return 0
    except Exception as exc:  # the one place every failure becomes a reason and an exit code
        reason = failure_reason(exc)
        print(f"[{job.stage}] failed: {reason}", file=sys.stderr, flush=True)
        from trainer.data import DatasetError

        if not isinstance(exc, (StageFailed, DatasetError, ConfigError)):
            traceback.print_exc()  # the short reason names one frame; the log gets all of them
        write_termination_message(job.reporting.termination_log_path, termination_message(exc))
        if ctx is not None:
            try:
                ctx.report("failed", step=ctx.step, total_steps=ctx.total_steps, reason=reason)
            except Exception:  # a broken reporter must not hide the original failure
                pass
        return exit_code(exc)
    finally:
        if ctx is not None:
            ctx.reporter.close()
            ctx.metrics.stop_server()
