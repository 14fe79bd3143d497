"""Operator-wide settings that shape pods and validation (set from the command line)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str | None = None
    """Image of stage pods whose run sets no spec.image."""
    max_gpus_per_stage: int | None = 8
    """Admission rejects a stage asking for more GPUs than this (one pod runs on one node); None: no limit."""
    trainer_metrics_port: int | None = 9400
    """Port of the trainer's Prometheus endpoint (named containerPort "metrics"); None disables it."""
    report_interval_seconds: float = 2.0
    """Minimum seconds between two progress updates a trainer sends."""
    retry_base_seconds: float = 10.0
    """Delay before the attempt after the first failure; it doubles with every further failure."""
    retry_max_seconds: float = 300.0
    """Upper bound of that delay (and of the delay between refused creates)."""
    create_retry_limit: int = 10
    """Creates refused in a row by the API server (quota, admission, Pod Security) before the run fails."""
    image_pull_timeout_seconds: float = 600.0
    """A stage pod whose image cannot be pulled (or whose container cannot be created) for this long fails the stage."""
    stuck_terminating_seconds: float = 300.0
    """A pod still there this long after its deletion was due, on a node that stopped reporting, is force-deleted and replaced."""
    stage_command_override: str | None = None
    """BENCHMARK HOOK, not a user feature: run this shell command instead of the trainer in every
    stage pod (it gets FINETUNE_OUTPUT_DIR and friends in its environment)."""
