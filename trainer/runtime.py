"""Running one stage: the context every stage receives, and the failure policy.

``run_stage`` is the only place that turns exceptions into exit codes and
termination messages; stages raise and never print their own failure.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import (
    EXPECTED_GPUS_ENV, FEEDBACK_ROUND_ENV, FEEDBACK_ROUND_EXIT_CODE, PERMANENT_FAILURE_EXIT_CODE,
    PERMANENT_FAILURE_PREFIX, ConfigError, StageJob,
)
from trainer.metrics import GAUGES, TrainerMetrics
from trainer.reporting import (FanOutReporter, LocalReporter, ProgressEvent, Reporter, TensorBoardReporter,
                               quiet_libraries, write_termination_message)

COMPLETE_MARKER = "COMPLETE"
"""File written last into a finished directory (checkpoint or final model); its presence means complete."""

STAGE_MODULES = {"sft": "trainer.sft", "reward": "trainer.reward_model", "ppo": "trainer.ppo", "grpo": "trainer.grpo",
                 "dpo": "trainer.dpo"}


class StageFailed(Exception):
    """A stage cannot go on for a reason the user can act on; the message is that reason."""


class PermanentStageFailure(StageFailed):
    """A StageFailed that retrying cannot fix (a missing model, an invalid reward function, no CUDA):
    the process exits with ``PERMANENT_FAILURE_EXIT_CODE`` and the operator does not retry."""


INTERRUPTED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit code after a SIGTERM (preemption, node drain, suspend, pod deletion): 143, as a process killed by it."""


class StageInterrupted(Exception):
    """SIGTERM was received; the message says what was saved. Not a failure of the stage: the next attempt resumes."""


class FeedbackRoundOpened(Exception):
    """The online stage checkpointed at a human-feedback round boundary and published the round's candidates
    (``trainer.feedback``); the message starts with ``FEEDBACK_ROUND_PREFIX``. Not a failure: the process
    exits with ``FEEDBACK_ROUND_EXIT_CODE`` and the next attempt resumes after the boundary."""


class GracefulStop:
    """Turns SIGTERM into a stop at the next step boundary, after a checkpoint of that step.

    Kubernetes sends SIGTERM, waits ``terminationGracePeriodSeconds`` (30 by default) and
    then sends SIGKILL. While a stage's training loop runs (``armed``), the handler only
    records the signal; the loop asks ``requested()`` after every step, saves a checkpoint
    and raises StageInterrupted. Outside the loop (loading models, writing ``final/``)
    there is no step to save, so the handler raises StageInterrupted at once.

    The handler is needed even to die promptly: the trainer is PID 1 in its container, and
    the kernel ignores signals that PID 1 has no handler for.
    """

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        self.received_at: float | None = None
        """time.monotonic() of the first SIGTERM, or None."""
        self.armed = False

    def install(self) -> None:
        """Handle SIGTERM in this process until ``uninstall``; a no-op outside the main thread."""
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if getattr(self, "_previous", None) is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
        if not self.armed:
            raise StageInterrupted("SIGTERM outside the training loop; nothing to save, the next attempt resumes "
                                   "from the last checkpoint")

    def requested(self) -> bool:
        """Whether any process received SIGTERM; the same answer on every process (one small all-reduce)."""
        flag = self.received_at is not None
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "sum")
        return float(total) > 0

    def interrupted(self, *, step: int, checkpoint: Path) -> StageInterrupted:
        waited = time.monotonic() - self.received_at if self.received_at is not None else 0.0
        return StageInterrupted(f"SIGTERM: stopped after step {step} with checkpoint {checkpoint} "
                                f"({waited:.1f} s after the signal); the next attempt resumes there")


def is_permanent(exc: BaseException) -> bool:
    """Whether ``exc`` fails the same way on every retry (the trainer exits with the permanent code)."""
    from trainer.data import DatasetError

    return isinstance(exc, (PermanentStageFailure, DatasetError, ConfigError))


def check_finite(values: dict[str, float], *, stage: str, step: int, advice: str) -> None:
    """StageFailed naming every non-finite value (NaN or inf in a loss, gradient norm, reward, KL ...).

    Called before the optimizer step, so the weights and the last checkpoint are still sound.
    """
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise StageFailed(f"{stage}: non-finite values at step {step}: {listed}; {advice}")


def check_kl(kl: float, *, max_kl: float | None, stage: str, step: int, advice: str) -> None:
    """StageFailed when the mean KL per sequence to the reference exceeds ``<stage>.maxKl`` (None: no limit)."""
    if max_kl is not None and kl > max_kl:
        raise StageFailed(f"{stage}: KL divergence from the reference (SFT) model is {kl:.3f} nats per sequence at "
                          f"step {step}, above {stage}.maxKl={max_kl}; {advice}")


def step_health(accelerator, *, loss: torch.Tensor, grad_norm) -> dict[str, float]:
    """{"loss", "grad_norm"} of one optimizer step, averaged over processes (a NaN anywhere stays NaN).

    Under fp16 the gradient scaler skips steps with inf gradients by design, so the norm is
    left out there and only the loss is checked.
    """
    stats = torch.stack([loss.detach().float().reshape(()),
                         torch.as_tensor(grad_norm, device=loss.device).detach().float().reshape(())])
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, "mean")
    health = {"loss": float(stats[0]), "grad_norm": float(stats[1])}
    if getattr(accelerator, "scaler", None) is not None:
        del health["grad_norm"]
    return health


def stage_config(job: StageJob):
    """The settings block of the job's own stage (SFTConfig, RewardConfig, PPOConfig, GRPOConfig or DPOConfig)."""
    return {"sft": job.sft, "reward": job.reward, "ppo": job.ppo, "grpo": job.grpo, "dpo": job.dpo}[job.stage]


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
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """What produced this stage's outputs (``trainer.provenance.job_fingerprint``): saved in every checkpoint and final/."""
    stop: GracefulStop = field(default_factory=GracefulStop)
    """SIGTERM handling: arm it around the training loop and ask ``stop.requested()`` after every step."""
    step: int = field(default=0)
    """Last step reported; the failure event carries it."""
    total_steps: int = field(default=0)
    """Planned steps, as last reported; the success event carries it."""
    latest_metrics: dict[str, float] = field(default_factory=dict)
    """Each metric's latest reported value (this process start only): what the model card shows."""
    watchdog: Any = None
    """``trainer.watchdog.ProgressWatchdog`` when a progress timeout is set: every report is a beat."""

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
        if self.watchdog is not None:
            self.watchdog.beat(step)
        if not self.accelerator.is_main_process:
            return
        metrics = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
        self.latest_metrics.update(metrics)
        self.metrics.update(step=step, total_steps=total_steps,
                            **{k: v for k, v in metrics.items() if k in GAUGES})
        if self.device.type == "cuda":
            self.metrics.update(gpu_memory_allocated_bytes=torch.cuda.memory_allocated(self.device))
        self.reporter.report(ProgressEvent(
            stage=self.job.stage, kind=kind, step=step, total_steps=total_steps, metrics=metrics,
            samples=samples, checkpoint=checkpoint, artifact=artifact, reason=reason,
        ))


MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}
"""Oldest NVIDIA Linux driver (major version) that runs torch built for each CUDA major version
(NVIDIA's CUDA toolkit release notes; 12.x relies on minor-version compatibility)."""
CUDA12_INDEX_URL = "https://download.pytorch.org/whl/cu128"
"""PyTorch's wheel index of the CUDA 12.8 build: the trainer image for drivers 525-579 (Dockerfile TORCH_INDEX_URL)."""
NVIDIA_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


def nvidia_driver_version(path: Path = NVIDIA_DRIVER_VERSION_FILE) -> str | None:
    """The NVIDIA kernel driver version visible in the container (``580.65.06``), or None when there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else None


def check_cuda(*, expected_gpus: str | None, cuda: bool, visible_gpus: int | None = None,
               cuda_build: str | None = None, driver_version: str | None = None) -> None:
    """PermanentStageFailure when the pod was given GPUs (``expected_gpus`` > 0) but CUDA cannot use them.

    Training on the CPU instead would take days and look like a hang; a retry on the same image
    and node class fails the same way. The message names the cause: a CPU-only torch build, no
    driver in the container, or a driver older than the torch build needs (``cuda_build`` is
    ``torch.version.cuda``, ``driver_version`` what ``nvidia_driver_version`` found).
    """
    try:
        wanted = int(expected_gpus or 0)
    except ValueError:
        wanted = 0
    if wanted <= 0:
        return
    if cuda:
        if visible_gpus is not None and visible_gpus < wanted:
            raise PermanentStageFailure(
                f"{wanted} GPU(s) were requested (spec.resources.gpus) but CUDA sees {visible_gpus}: check "
                "CUDA_VISIBLE_DEVICES and the NVIDIA device plugin on the node")
        return
    head = (f"{wanted} GPU(s) were requested (spec.resources.gpus) but CUDA is not usable in the container "
            f"(torch {torch.__version__}")
    if cuda_build is None:
        raise PermanentStageFailure(f"{head}, a CPU-only build): use the CUDA trainer image, or set gpus to 0")
    head += f" built for CUDA {cuda_build}"
    needed = MIN_DRIVER_FOR_CUDA.get(int(cuda_build.split(".")[0]))
    requirement = f"it needs NVIDIA driver {needed} or newer on the node" if needed else "see the pod log"
    cuda12 = (f"; for older drivers (525 or newer) build the trainer image with --build-arg "
              f"TORCH_INDEX_URL={CUDA12_INDEX_URL}") if needed and needed > MIN_DRIVER_FOR_CUDA[12] else ""
    if driver_version is None:
        raise PermanentStageFailure(
            f"{head}; {requirement}): no NVIDIA driver is visible in the container ({NVIDIA_DRIVER_VERSION_FILE} "
            "is missing): check the node's driver, the NVIDIA container toolkit and device plugin" + cuda12)
    if needed and int(driver_version.split(".")[0]) < needed:
        raise PermanentStageFailure(
            f"{head}; {requirement}): the node's driver is {driver_version}: upgrade it to {needed} or newer"
            + cuda12)
    raise PermanentStageFailure(f"{head}, driver {driver_version}; {requirement}): CUDA failed to initialise, "
                                "see the pod log for the CUDA error")


def build_context(job: StageJob, *, stop: GracefulStop) -> StageContext:
    """Accelerator, reporters and metrics for ``job``; starts the metrics server on the main process.

    Another run's outputs in outputDir are removed first (``trainer.outputs.claim_output_dir``).
    """
    quiet_libraries()
    from accelerate import Accelerator

    from trainer.multinode import EXPECTED_WORLD_SIZE_ENV, check_world_size, init_distributed
    from trainer.outputs import claim_output_dir  # imports trainer.checkpoint, which imports this module
    from trainer.provenance import job_fingerprint
    from trainer.tracking import TrackingUnavailable, require_packages, tracking_reporters

    cfg = stage_config(job)
    try:
        require_packages(job)  # every process, before any rendezvous: all of them fail alike
    except TrackingUnavailable as exc:
        raise PermanentStageFailure(str(exc)) from None
    cuda = torch.cuda.is_available()
    check_cuda(expected_gpus=os.environ.get(EXPECTED_GPUS_ENV), cuda=cuda,
               visible_gpus=torch.cuda.device_count() if cuda else 0, cuda_build=torch.version.cuda,
               driver_version=nvidia_driver_version())
    dtype = resolve_dtype(cfg.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    init_distributed(cuda=cuda)  # before accelerate, with our rendezvous and collective timeouts
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    check_world_size(expected=os.environ.get(EXPECTED_WORLD_SIZE_ENV), actual=accelerator.num_processes)
    if accelerator.num_processes > 1:  # every process says where it stands: `kubectl logs` of each pod shows it
        print(f"[{job.stage}] world size {accelerator.num_processes}: rank {accelerator.process_index} "
              f"(node rank {os.environ.get('NODE_RANK', os.environ.get('GROUP_RANK', '0'))}, local rank "
              f"{accelerator.local_process_index}, backend {torch.distributed.get_backend()})",
              file=sys.stderr, flush=True)
    stop.accelerator = accelerator
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = job_fingerprint(job, processes=accelerator.num_processes)
    claim_output_dir(job, output_dir=output_dir, accelerator=accelerator)
    metrics = TrainerMetrics(stage=job.stage, gpu=cuda)
    reporters: list[Reporter] = []
    if accelerator.is_main_process:
        progress = job.reporting.progress_file or output_dir / "progress.jsonl"
        reporters.append(LocalReporter(jsonl_path=progress))
        reporters.append(TensorBoardReporter(output_dir / "tensorboard"))
        reporters.extend(tracking_reporters(job, output_dir=output_dir))  # reportTo: MLflow, W&B; none by default
        if job.reporting.progress_config_map:
            # Imported lazily: the kubernetes client is only needed in a cluster.
            from trainer.kube_reporter import KubernetesReporter

            reporters.append(KubernetesReporter(config_map=job.reporting.progress_config_map,
                                                min_interval_seconds=job.reporting.report_interval_seconds,
                                                history_config_map=job.reporting.history_config_map))
        if job.reporting.metrics_port is not None:
            metrics.start_server(job.reporting.metrics_port)
    ctx = StageContext(job=job, accelerator=accelerator, reporter=FanOutReporter(reporters), metrics=metrics,
                       output_dir=output_dir, device=accelerator.device, dtype=dtype, fingerprint=fingerprint,
                       stop=stop)
    return ctx


def failure_reason(exc: BaseException) -> str:
    """What the user reads in ``kubectl describe``: short for expected errors, type and place otherwise."""
    from trainer.data import DatasetError

    if isinstance(exc, (StageFailed, DatasetError, ConfigError)):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def termination_message(exc: BaseException) -> str:
    """The failure reason, prefixed with ``PERMANENT_FAILURE_PREFIX`` when retrying cannot help."""
    reason = failure_reason(exc)
    return PERMANENT_FAILURE_PREFIX + reason if is_permanent(exc) else reason


def exit_code(exc: BaseException) -> int:
    return PERMANENT_FAILURE_EXIT_CODE if is_permanent(exc) else 1


def run_stage(job: StageJob) -> int:
    """Run the job's stage; return the process exit code: 0 success, ``PERMANENT_FAILURE_EXIT_CODE``
    for an error that retrying cannot fix (``is_permanent``), ``INTERRUPTED_EXIT_CODE`` after a
    SIGTERM (``GracefulStop``), 1 for any other failure.

    On failure the reason is reported, printed and written to
    ``reporting.terminationLogPath``. A stage whose ``final/`` is complete and was
    produced by this very job succeeds at once, so a re-run of a finished pod does no
    work (``trainer.outputs.final_is_current``).
    """
    from trainer.outputs import final_is_current

    from trainer.watchdog import exit_hung
    from trainer.watchdog import from_env as progress_watchdog

    stop = GracefulStop()
    stop.install()
    ctx = None
    # From the start: a rendezvous or model load that hangs is caught too (the timeout must cover them).
    watchdog = progress_watchdog(on_hung=exit_hung(job.reporting.termination_log_path))
    try:
        ctx = build_context(job, stop=stop)
        ctx.watchdog = watchdog
        # A reward pod of a human-feedback round continues from final/ on purpose.
        retraining = job.stage == "reward" and bool(os.environ.get(FEEDBACK_ROUND_ENV))
        if not retraining and final_is_current(ctx):
            ctx.report("succeeded", step=0, total_steps=0, artifact=str(ctx.output_dir / "final"))
            return 0
        ctx.report("started", step=0, total_steps=0)
        stage = importlib.import_module(STAGE_MODULES[job.stage])
        artifact = stage.run(ctx)
        ctx.report("succeeded", step=ctx.total_steps, total_steps=ctx.total_steps, artifact=str(artifact))
        return 0
    except FeedbackRoundOpened as exc:
        print(f"[{job.stage}] {exc}", file=sys.stderr, flush=True)
        write_termination_message(job.reporting.termination_log_path, str(exc))
        return FEEDBACK_ROUND_EXIT_CODE
    except StageInterrupted as exc:
        stop.armed = True  # a second SIGTERM while reporting only records
        print(f"[{job.stage}] interrupted: {exc}", file=sys.stderr, flush=True)
        write_termination_message(job.reporting.termination_log_path, f"Interrupted: {exc}")
        if ctx is not None:
            try:
                ctx.report("interrupted", step=ctx.step, total_steps=ctx.total_steps, reason=str(exc))
            except Exception:
                pass
        return INTERRUPTED_EXIT_CODE
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
        if watchdog is not None:
            watchdog.stop()
        stop.uninstall()  # run in-process (tests), the caller's handler is back
        if ctx is not None:
            ctx.reporter.close()
            ctx.metrics.stop_server()
