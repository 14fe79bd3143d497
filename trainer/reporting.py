"""Progress events and the reporters that deliver them.

A stage emits ``ProgressEvent``s through a ``Reporter``; it never knows where
they go.  ``LocalReporter`` prints a line to stderr and appends JSON Lines;
``trainer.kube_reporter.KubernetesReporter`` forwards to the run's progress
ConfigMap.  ``FanOutReporter`` sends each event to several reporters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

EventKind = Literal["started", "progress", "checkpoint", "samples", "succeeded", "failed", "interrupted", "feedback"]


@dataclass
class ProgressEvent:
    """One thing a stage wants the world to know.

    ``metrics`` hold plain floats (loss, reward mean, KL ...); ``samples`` hold
    dicts with prompt, response, reward and kl; ``artifact`` is the final model
    directory on success; ``reason`` is the failure reason on failure, or what was saved when
    SIGTERM interrupted the stage (kind ``interrupted``).
    """

    stage: str
    kind: EventKind
    step: int = 0
    total_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] | None = None
    checkpoint: str | None = None
    artifact: str | None = None
    reason: str | None = None
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Reporter(Protocol):
    def report(self, event: ProgressEvent) -> None: ...

    def close(self) -> None: ...


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _duration(seconds: float) -> str:
    """90 -> '1m30s', 4000 -> '1h06m40s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StepPace:
    """Seconds per step and time to finish, from the times of the progress events (not the wall clock).

    Measured from the first progress event this process saw (the start, or the step a retry
    resumed from), so a resumed stage's pace is not distorted by the steps before it.
    """

    def __init__(self) -> None:
        self._start: tuple[int, float] | None = None  # (step, event time)

    def update(self, event: ProgressEvent) -> str | None:
        """'4.2s/step eta 3m10s' for a progress event past the first one, else None."""
        if event.kind != "progress" or not event.total_steps:
            return None
        if self._start is None or event.step < self._start[0]:
            self._start = (event.step, event.time)
            return None
        steps = event.step - self._start[0]
        if steps <= 0:
            return None
        per_step = (event.time - self._start[1]) / steps
        return f"{per_step:.3g}s/step eta {_duration(per_step * max(event.total_steps - event.step, 0))}"


# Online stages score a sample with one reward; DPO's held-out samples carry the implicit rewards of
# the pair's chosen and rejected replies instead.
_SAMPLE_SCORES = ("reward", "kl", "chosen_reward", "rejected_reward")


def _sample_scores(sample: dict) -> str:
    scores = [f"{key}={sample[key]:.3f}" for key in _SAMPLE_SCORES if isinstance(sample.get(key), (int, float))]
    return " ".join(scores) or "unscored"


class LocalReporter:
    """Human-readable progress on stderr and one JSON object per event in ``jsonl_path``.

    Each stderr line starts with the event's UTC time; progress lines add seconds per step
    and the estimated time to the end of the stage (``StepPace``).
    """

    def __init__(self, *, jsonl_path: str | Path | None, stream: TextIO | None = None):
        self._stream = stream or sys.stderr
        self._file = None
        self._pace = StepPace()
        if jsonl_path is not None:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(jsonl_path, "a", encoding="utf-8")

    def report(self, event: ProgressEvent) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.time))
        head = f"{stamp} [{event.stage}] {event.kind}"
        if event.total_steps:
            head += f" {event.step}/{event.total_steps}"
        parts = [head]
        pace = self._pace.update(event)
        if pace:
            parts.append(pace)
        if event.metrics:
            parts.append(_format_metrics(event.metrics))
        if event.checkpoint:
            parts.append(f"checkpoint={event.checkpoint}")
        if event.artifact:
            parts.append(f"artifact={event.artifact}")
        if event.reason:
            parts.append(f"reason={event.reason}")
        print(" ".join(parts), file=self._stream, flush=True)
        if event.samples:
            for sample in event.samples[:2]:
                response = str(sample.get("response", ""))[:120].replace("\n", " ")
                print(f"  sample {_sample_scores(sample)}: {response!r}", file=self._stream, flush=True)
        if self._file is not None:
            self._file.write(json.dumps(event.to_json()) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardReporter:
    """Every event's metrics as TensorBoard scalars ``<stage>/<metric>`` at the event's step, in
    ``directory`` (a stage writes ``<outputDir>/tensorboard``; ``tensorboard --logdir`` over the
    run's directory shows every stage)."""

    def __init__(self, directory: str | Path):
        from trainer.event_files import EventFileWriter

        self._writer = EventFileWriter(directory)

    def report(self, event: ProgressEvent) -> None:
        if event.metrics:
            self._writer.add_scalars(event.step, {f"{event.stage}/{k}": float(v) for k, v in event.metrics.items()},
                                     wall_time=event.time)

    def close(self) -> None:
        self._writer.close()


class FanOutReporter:
    """Deliver every event to each reporter; one reporter failing never stops training."""

    def __init__(self, reporters: list[Reporter]):
        self._reporters = reporters

    def report(self, event: ProgressEvent) -> None:
        for reporter in self._reporters:
            try:
                reporter.report(event)
            except Exception as exc:  # reporting is best effort; training must go on
                print(f"reporter {type(reporter).__name__} failed: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for reporter in self._reporters:
            reporter.close()


def quiet_libraries() -> None:
    """No progress bars and no warnings below errors from transformers, huggingface_hub and datasets.

    A pod's log is read line by line (``kubectl logs``, the termination message's last lines):
    tqdm's carriage-return bars and transformers' per-load reports bury the progress lines. The
    stage's own lines (``LocalReporter``) carry progress instead. Errors still print.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        import datasets
    except ImportError:  # not a dependency: trainer.data reads the files itself
        return
    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()


def write_termination_message(path: str | Path, reason: str) -> None:
    """Write the failure reason where Kubernetes reads the termination message (max 4 KiB)."""
    try:
        Path(path).write_text(reason[-4000:])
    except OSError:
        pass  # no such file outside a pod; the reason is also on stderr
