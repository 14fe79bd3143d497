"""The loop shared by the stages that train on a fixed list of examples: SFT, reward model, DPO.

``prepare_supervised`` sets up, in the order resume exactness depends on: the step plan,
AdamW with its warm-up/decay schedule, accelerate's wrapping (or, with ``fsdp`` on several
processes, FSDP sharding instead: trainer.sharding), per-rank seeding, then the
restore of the latest checkpoint. ``train_supervised`` runs the steps: for each optimizer
step it accumulates the loss of the step's micro-batches (a stage's ``forward`` computes one),
clips, checks for non-finite values, steps, reports window statistics every
``logEverySteps`` and checkpoints every ``checkpointEverySteps`` (and at the last step, and on
SIGTERM). The examples of every step come from ``StepPlan``, so a resumed run sees exactly
what the lost one would have.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate.utils import set_seed

from trainer import sharding
from trainer.adamw import after_resume
from trainer.checkpoint import resume_from_latest, save_checkpoint
from trainer.config import OptimConfig
from trainer.modeling import checkpoint_trainable_weights_only
from trainer.runtime import StageContext, check_finite, stage_config, step_health
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
    sharded = cfg.fsdp is not None and accelerator.num_processes > 1
    if sharded:  # before the optimizer, which must hold the sharded parameters
        _say_memory(ctx, model, "unsharded")
        sharding.shard(model, cfg.fsdp, device=ctx.device)
        sharding.autocast_forward(model, accelerator)
        _say_memory(ctx, model, "sharded")
    optimizer, scheduler = build_optimizer(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           warmup_steps=cfg.warmup_steps, total_steps=plan.total_steps)
    if sharded:  # not prepared: accelerate's DDP wrapper would replicate the model again (trainer.sharding)
        sharding.register_checkpointing(accelerator, model, optimizer, trainable_only=cfg.lora is not None)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    # Registered, not prepared: accelerate would step a prepared scheduler once per process.
    accelerator.register_for_checkpointing(scheduler)
    if cfg.lora:  # checkpoints hold the adapters (and a reward model's score head), not the frozen base
        checkpoint_trainable_weights_only(accelerator)

    set_seed(cfg.seed + accelerator.process_index)
    start, _ = resume_from_latest(ctx)
    if start:
        apply_optimizer_settings(optimizer, scheduler, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
        after_resume(optimizer, stage=ctx.job.stage, main_process=accelerator.is_main_process)
    ctx.report("progress", step=start, total_steps=plan.total_steps)
    return SupervisedSetup(model=model, optimizer=optimizer, scheduler=scheduler, plan=plan, start_step=start)


def _say_memory(ctx: StageContext, model, what: str) -> None:
    print(f"[{ctx.job.stage}] rank {ctx.accelerator.process_index}: {what} parameters "
          f"{sharding.local_parameter_bytes(model) / 2**20:.2f} MiB", file=sys.stderr, flush=True)


@dataclass
class MicroBatch:
    """What a stage's ``forward`` returns for one micro-batch."""

    loss: torch.Tensor
    """Mean loss of the micro-batch, a scalar with gradients; the loop divides it by the step's micro-batches."""
    tokens: int
    """Tokens the forward pass read (for tokens_per_second and the tokens counter)."""
    samples: int
    """Examples (rows, pairs) in the micro-batch (for the samples counter)."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """Window statistics as sums over the micro-batch's examples (detached scalars, e.g. correct pairs).
    The loop adds them up over the window's micro-batches and all processes and hands the totals to
    the stage's ``summarise``."""


def train_supervised(ctx: StageContext, setup: SupervisedSetup, *, forward: Callable[[list[int]], MicroBatch],
                     summarise: Callable[[dict[str, float]], dict[str, float]] | None = None,
                     evaluate: Callable[[int], dict[str, float]] | None = None, non_finite_advice: str) -> None:
    """Run the optimizer steps from ``setup.start_step`` to the end of the plan.

    ``forward(indices)`` computes one micro-batch of the examples at ``indices`` (the model's
    forward pass, in train mode, inside the loop's gradient-sync context) and returns a MicroBatch.
    Every ``logEverySteps`` and at the last step the loop reports ``loss`` (mean over the window's
    steps and processes), ``learning_rate``, ``tokens_per_second``, ``grad_norm`` and ``epoch``,
    plus ``summarise(window sums)`` and then ``evaluate(step)`` (called on every process with the
    steps done, the model in eval mode and no gradients; it must reduce across processes itself
    and may report events of its own, such as samples).
    A non-finite loss or gradient norm raises StageFailed with ``non_finite_advice`` before the
    optimizer step. SIGTERM (``ctx.stop``) checkpoints the step just finished and raises
    StageInterrupted.
    """
    accelerator, cfg = ctx.accelerator, stage_config(ctx.job)
    model, optimizer, scheduler, plan = setup.model, setup.optimizer, setup.scheduler, setup.plan
    total = plan.total_steps
    model.train()
    window_loss, window_steps, window_tokens, window_samples = 0.0, 0, 0, 0
    window_sums: dict[str, torch.Tensor] = {}
    window_seconds = {"forward": 0.0, "optimisation": 0.0}
    window_start = time.perf_counter()
    ctx.stop.armed = True
    for step in range(setup.start_step, total):
        micro_batches = plan.step_micro_batches(step, rank=accelerator.process_index)
        step_loss = torch.zeros((), device=ctx.device)
        started = time.perf_counter()
        for i, indices in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            with nullcontext() if last else accelerator.no_sync(model):
                result = forward(indices)
                loss = result.loss / len(micro_batches)
                accelerator.backward(loss)
            step_loss += loss.detach()
            window_tokens += result.tokens
            window_samples += result.samples
            for name, value in result.sums.items():
                window_sums[name] = window_sums.get(name, 0.0) + value.detach().float()
        step_value = float(step_loss)  # waits for the forward and backward passes (a device sync)
        stepping = time.perf_counter()
        if sharding.is_sharded(model):
            grad_norm = sharding.clip_grad_norm(model, cfg.max_grad_norm)
        else:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        check_finite(step_health(accelerator, loss=step_loss, grad_norm=grad_norm), stage=ctx.job.stage,
                     step=step + 1, advice=non_finite_advice)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_seconds["forward"] += stepping - started
        window_seconds["optimisation"] += time.perf_counter() - stepping  # on a GPU: launch time only
        window_loss += step_value
        window_steps += 1
        done = step + 1

        if done % cfg.log_every_steps == 0 or done == total:
            names = sorted(window_sums)
            stats = accelerator.reduce(torch.stack(
                [torch.tensor(v, device=ctx.device, dtype=torch.float32)
                 for v in (window_loss, float(window_tokens), float(window_samples))]
                + [window_sums[n].reshape(()).to(ctx.device) for n in names]), "sum")
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            tokens = int(stats[1])
            ctx.metrics.count(tokens=tokens, samples=int(stats[2]))
            metrics = {
                "loss": float(stats[0]) / (window_steps * accelerator.num_processes),
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_per_second": tokens / elapsed,
                "grad_norm": float(grad_norm),
                "epoch": plan.position(done)["epoch"],
                # Per step, this process: forward and backward passes, then clipping and the optimizer step.
                "forward_seconds": window_seconds["forward"] / window_steps,
                "optimisation_seconds": window_seconds["optimisation"] / window_steps,
            }
            if summarise is not None:
                metrics.update(summarise({n: float(stats[3 + k]) for k, n in enumerate(names)}))
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    metrics.update(evaluate(done))
                model.train()
            ctx.report("progress", step=done, total_steps=total, metrics=metrics)
            window_loss, window_steps, window_tokens, window_samples = 0.0, 0, 0, 0
            window_sums = {}
            window_seconds = {"forward": 0.0, "optimisation": 0.0}
            window_start = time.perf_counter()

        # The last step is checkpointed too: a crash while writing final/ then costs no training.
        stopping = ctx.stop.requested()
        if done % cfg.checkpoint_every_steps == 0 or done == total or stopping:
            path = save_checkpoint(ctx, step=done, extra_state={"examples": plan.num_examples, **plan.position(done)})
            ctx.report("checkpoint", step=done, total_steps=total, checkpoint=str(path))
        if stopping:
            raise ctx.stop.interrupted(step=done, checkpoint=path)
    ctx.stop.armed = False
