"""Which examples each optimizer step sees, and the learning-rate schedule.

Data order is a pure function of (seed, epoch, step), identical on every
process and every restart. A resumed run therefore needs only the step number
to continue at the exact example where the interrupted run stopped; no sampler
state is saved or trusted.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """Maps optimizer steps to the example indices of each of their micro-batches.

    Micro-batches form one continuous stream across epochs: epoch e is a seeded
    permutation of all examples cut into global batches of
    ``batch_size * world_size``; process r takes slice r of each. The last,
    short global batch of an epoch is filled from the start of the same
    permutation so every process gets a full batch (unequal batches would make
    collective operations hang). Each optimizer step takes
    ``accumulation`` micro-batches; the very last step may take fewer.
    """

    num_examples: int
    batch_size: int
    accumulation: int
    world_size: int
    epochs: int
    seed: int
    max_steps: int | None = None

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError("no training examples")

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / (self.batch_size * self.world_size))

    @property
    def total_micro_batches(self) -> int:
        return self.micro_batches_per_epoch * self.epochs

    @property
    def total_steps(self) -> int:
        steps = math.ceil(self.total_micro_batches / self.accumulation)
        return min(steps, self.max_steps) if self.max_steps else steps

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_examples))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def micro_batch(self, index: int, *, rank: int) -> list[int]:
        """Example indices of micro-batch ``index`` (counted across epochs) for process ``rank``."""
        epoch, within = divmod(index, self.micro_batches_per_epoch)
        order = self.epoch_order(epoch)
        global_size = self.batch_size * self.world_size
        start = within * global_size + rank * self.batch_size
        return [order[(start + k) % self.num_examples] for k in range(self.batch_size)]

    def step_micro_batches(self, step: int, *, rank: int) -> list[list[int]]:
        """Micro-batches of optimizer step ``step`` (0-based) for process ``rank``."""
        first = step * self.accumulation
        last = min(first + self.accumulation, self.total_micro_batches)
        return [self.micro_batch(i, rank=rank) for i in range(first, last)]

    def position(self, step: int) -> dict[int, int]:
        """Where the stream stands after ``step`` steps (for humans reading a checkpoint)."""
        consumed = min(step * self.accumulation, self.total_micro_batches)
        epoch, within = divmod(consumed, self.micro_batches_per_epoch)
        return {"epoch": epoch, "micro_batch_in_epoch": within, "micro_batches_consumed": consumed}


def linear_warmup_decay(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: 0 -> 1 over ``warmup_steps``, then linearly to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


def build_optimizer(model, *, learning_rate: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW (the fused kernel, ``trainer.adamw``) over the trainable parameters and its linear warm-up/decay
    scheduler.

    The scheduler is deliberately not passed to ``accelerator.prepare``:
    accelerate would step it once per process per optimizer step, which
    stretches nothing and shortens the schedule by the number of processes.
    Register it with ``accelerator.register_for_checkpointing`` instead.
    """
    from functools import partial

    import torch

    from trainer.adamw import new_adamw

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = new_adamw(params, learning_rate=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(linear_warmup_decay, warmup_steps=warmup_steps, total_steps=total_steps))
    return optimizer, scheduler


def apply_optimizer_settings(optimizer, scheduler, *, learning_rate: float, weight_decay: float) -> None:
    """Set the peak learning rate and weight decay after a checkpoint restored older ones.

    ``load_state`` restores them from the checkpoint (AdamW keeps both in its param
    groups, LambdaLR keeps the peak as ``base_lrs``), so without this a resume would
    silently go on with the old values. The schedule's position is kept: the current
    rate becomes ``learning_rate * multiplier(step)``. Idempotent when nothing changed.
    """
    scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
    for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * multiplier(scheduler.last_epoch)
        group["weight_decay"] = weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() returns
