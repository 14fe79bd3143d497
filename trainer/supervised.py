"""Set-up shared by the stages that train on a fixed list of examples (SFT, reward model).

Both need the same things in the same order, and resume exactness depends on
that order: the step plan, AdamW with its warm-up/decay schedule, accelerate's
wrapping, per-rank seeding, then the restore of the latest checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accelerate.utils import set_seed

from trainer.checkpoint import resume_from_latest
from trainer.config import OptimConfig
from trainer.runtime import StageContext
from trainer.schedule import StepPlan, apply_optimizer_settings, build_optimizer


@dataclass
class SupervisedSetup:
    model: Any  # wrapped by accelerate
    optimizer: Any
    scheduler: Any
    plan: StepPlan
    start_step: int
    """First optimizer step to run: 0, or the step of the checkpoint resumed from."""


def prepare_supervised(ctx: StageContext, model, *, cfg: OptimConfig, epochs: int, max_steps: int | None,
                       num_examples: int) -> SupervisedSetup:
    """Plan, optimizer and schedule for ``model``, prepared by accelerate and resumed if a checkpoint exists.

    A checkpoint written from other inputs or settings is refused
    (``resume_from_latest`` raises PermanentStageFailure saying what changed); a
    changed learning rate or weight decay is applied.
    """
    accelerator = ctx.accelerator
    plan = StepPlan(num_examples=num_examples, batch_size=cfg.batch_size,
                    accumulation=cfg.gradient_accumulation_steps, world_size=accelerator.num_processes,
                    epochs=epochs, seed=cfg.seed, max_steps=max_steps)
    optimizer, scheduler = build_optimizer(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           warmup_steps=cfg.warmup_steps, total_steps=plan.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Registered, not prepared: accelerate would step a prepared scheduler once per process.
    accelerator.register_for_checkpointing(scheduler)

    set_seed(cfg.seed + accelerator.process_index)
    start, _ = resume_from_latest(ctx)
    if start:
        apply_optimizer_settings(optimizer, scheduler, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ctx.report("progress", step=start, total_steps=plan.total_steps)
    return SupervisedSetup(model=model, optimizer=optimizer, scheduler=scheduler, plan=plan, start_step=start)
