"""Operator-wide settings that shape pods and validation (set from the command line)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str | None = None
    """Image of stage pods whose run sets no spec.image."""
    max_gpus_per_stage: int | None = None
    """Admission rejects a stage asking for more GPUs than this; None: no limit."""
    trainer_metrics_port: int | None = 9400
    """Port of the trainer's Prometheus endpoint (named containerPort "metrics"); None disables it."""
    report_interval_seconds: float = 2.0
    """Minimum seconds between two progress updates a trainer sends."""
    stage_command_override: str | None = None
    """BENCHMARK HOOK, not a user feature: run this shell command instead of the trainer in every
    stage pod (it gets FINETUNE_OUTPUT_DIR and friends in its environment)."""
