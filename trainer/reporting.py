"""Progress events and the reporters that deliver them.

A stage emits ``ProgressEvent``s through a ``Reporter``; it never knows where
they go.  ``LocalReporter`` prints a line to stderr and appends JSON Lines;
``trainer.kube_reporter.KubernetesReporter`` forwards to the run's progress
ConfigMap.  ``FanOutReporter`` sends each event to several reporters.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

EventKind = Literal["started", "progress", "checkpoint", "samples", "succeeded", "failed", "interrupted"]


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


class LocalReporter:
    """Human-readable progress on stderr and one JSON object per event in ``jsonl_path``."""

    def __init__(self, *, jsonl_path: str | Path | None, stream: TextIO = sys.stderr):
        self._stream = stream
        self._file = None
        if jsonl_path is not None:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(jsonl_path, "a", encoding="utf-8")

    def report(self, event: ProgressEvent) -> None:
        head = f"[{event.stage}] {event.kind}"
        if event.total_steps:
            head += f" {event.step}/{event.total_steps}"
        parts = [head]
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
                print(f"  sample reward={sample.get('reward', float('nan')):.3f}: {response!r}",
                      file=self._stream, flush=True)
        if self._file is not None:
            self._file.write(json.dumps(event.to_json()) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


def write_termination_message(path: str | Path, reason: str) -> None:
    """Write the failure reason where Kubernetes reads the termination message (max 4 KiB)."""
    try:
        Path(path).write_text(reason[-4000:])
    except OSError:
        pass  # no such file outside a pod; the reason is also on stderr
