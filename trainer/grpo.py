"""GRPO / RLOO stage: sample a group of responses per prompt and push each toward the better ones of its group.

One loop, in the order of Shao et al. 2024 (DeepSeekMath, Algorithm 1) with the options of
Dr. GRPO, DAPO and RLOO (docs/grpo.md):

    for step in 1..steps:
        prompts  <- batchSize / groupSize prompts (seeded order, a pure function of the step)
        rollout  <- groupSize responses per prompt, cut at EOS, scored; log-probs of the policy
                    (and of the reference model when klCoef > 0)
        A        <- group-relative (grpo) or leave-one-out (rloo) advantage, one per response
        update   <- iterationsPerBatch x miniBatches steps of the clipped ratio loss (+ klCoef * k3 KL)
        report, samples, guardrails, checkpoint

No value model, and no reference model unless klCoef > 0. The arithmetic lives in
trainer/group_math.py; sampling, scoring and held-out samples in trainer/rollout.py (shared with PPO).

Tensor shapes: n = responses on this process (prompts x G, group by group), p = prompt tokens
(left-padded), t = response tokens (right-padded after the stop token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import feedback, group_math, ppo_math, runtime, sharding
from trainer.adamw import after_resume, new_adamw
from trainer.checkpoint import resume_from_latest, save_checkpoint
from trainer.config import GRPOConfig
from trainer.modeling import (AdapterDisabled, checkpoint_trainable_weights_only, disable_dropout, load_causal_lm,
                              load_reference, load_tokenizer, model_options, prepare_model_source, save_final)
from trainer.rewards import CompositeReward
from trainer.rollout import (PromptEncoder, PromptRow, SampledBatch, build_reward, load_prompts, now, old_logprobs,
                             reduce_mean,
                             reduce_sum, report_samples, response_logits, response_logprobs, reward_model_source,
                             sample_and_score, sample_held_out, split_prompts, step_seed)
from trainer.run_health import RunHealth
from trainer.runtime import PermanentStageFailure, StageContext
from trainer.schedule import StepPlan, apply_optimizer_settings, linear_warmup_decay


@dataclass
class GroupRollouts:
    """One batch of groups on this process; every tensor is detached."""

    batch: SampledBatch  # n = prompts x G sequences, the G responses of a prompt adjacent
    logprobs: torch.Tensor  # (n, t) policy at sampling time ("old" log-probs)
    ref_logprobs: torch.Tensor | None  # (n, t), None without a reference model
    entropy: torch.Tensor  # (n, t)


@torch.no_grad()
def collect_groups(ctx: StageContext, *, prompts: list[PromptRow], policy, reference, reward: CompositeReward,
                   encoder: PromptEncoder, timings: dict[str, float]) -> GroupRollouts:
    """Sample groupSize responses to each prompt, score them, and take the log-probs the loss starts from."""
    cfg: GRPOConfig = ctx.job.grpo
    acc = ctx.accelerator
    policy_module = acc.unwrap_model(policy)
    passes: dict[str, torch.Tensor | None] = {"ref_logprobs": None}

    def forward_passes(batch: SampledBatch) -> None:
        passes["logprobs"], passes["entropy"] = old_logprobs(ctx, policy_module, batch,
                                                             temperature=cfg.temperature)  # (n, t) each
        if reference is not None:
            with acc.autocast():
                passes["ref_logprobs"] = response_logprobs(reference, batch, temperature=cfg.temperature)

    repeated = [row for row in prompts for _ in range(cfg.group_size)]  # group by group
    batch = sample_and_score(ctx, cfg=cfg, policy_module=policy_module, encoder=encoder, reward=reward,
                             prompts=repeated, timings=timings, before_scoring=forward_passes)
    return GroupRollouts(batch=batch, **passes)


def advantages_of(scores: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """(n,) advantage per response: group-relative (grpo) or leave-one-out (rloo), std-scaled as configured."""
    if cfg.algorithm == "rloo":
        return group_math.leave_one_out_advantages(scores, group_size=cfg.group_size, scale=cfg.scales_rewards)
    return group_math.group_advantages(scores, group_size=cfg.group_size, scale=cfg.scales_rewards)


def group_update(ctx: StageContext, ro: GroupRollouts, *, advantages: torch.Tensor, policy, optimizer,
                 params) -> dict[str, float]:
    """iterationsPerBatch passes of miniBatches optimizer steps over this batch; mean statistics of all of them.

    Each minibatch is split into gradientAccumulationSteps micro-batches; the token weights are
    computed over the whole minibatch, so the micro-batch losses simply add up.
    """
    cfg: GRPOConfig = ctx.job.grpo
    acc = ctx.accelerator
    n, t = ro.batch.responses.shape
    mb_size = n // cfg.mini_batches
    micro = mb_size // cfg.gradient_accumulation_steps  # GRPOConfig checked that it divides
    sums: dict[str, float] = {}
    updates = 0
    policy.train()
    for _ in range(cfg.iterations_per_batch):
        order = torch.randperm(n, device=ctx.device)
        for start in range(0, n, mb_size):
            mb = order[start:start + mb_size]
            weights = group_math.token_weights(ro.batch.mask[mb], normalisation=cfg.loss_normalisation,
                                               max_response_tokens=cfg.response_length_tokens)  # (mb, t)
            for m_start in range(0, mb_size, micro):
                idx = mb[m_start:m_start + micro]
                with acc.autocast():
                    logits = response_logits(policy, ro.batch.input_ids[idx], ro.batch.attention_mask[idx],
                                             response_length=t, temperature=cfg.temperature)
                    new_logprobs = ppo_math.logprobs_from_logits(logits, ro.batch.responses[idx])  # (m, t)
                    del logits
                out = group_math.clipped_ratio_loss(
                    new_logprobs, ro.logprobs[idx], advantages[idx], ro.batch.mask[idx],
                    weights[m_start:m_start + micro], clip_low=cfg.clip_range_low, clip_high=cfg.clip_range_high,
                    ref_logprobs=None if ro.ref_logprobs is None else ro.ref_logprobs[idx], kl_coef=cfg.kl_coef)
                acc.backward(out.loss)
                # Each micro-batch's loss is its share of the minibatch's: sum them, per minibatch.
                for name, value in (("loss", out.loss), ("policy_loss", out.policy_loss)):
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                for name, value in (("policy_clip_fraction", out.clip_fraction), ("ratio_mean", out.ratio_mean)):
                    sums[name] = sums.get(name, 0.0) + float(value) / cfg.gradient_accumulation_steps
                updates += 1
            sharding.clip_gradients(acc, params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    steps = updates // cfg.gradient_accumulation_steps
    return {name: total / steps for name, total in sums.items()}


# ---------------------------------------------------------------------------
# guardrails


def check_finite(values: dict[str, float], *, step: int) -> None:
    """Raise StageFailed naming every non-finite value (NaN or inf in a loss, reward, KL ...)."""
    runtime.check_finite(values, stage="grpo", step=step, advice="lower grpo.learningRate, check the reward "
                         "functions and reward model, or use precision fp32")


def check_kl(kl: float, *, max_kl: float | None, step: int) -> None:
    """Raise StageFailed when the mean KL per sequence exceeds grpo.maxKl (only measured with a reference)."""
    runtime.check_kl(kl, max_kl=max_kl, stage="grpo", step=step,
                     advice="raise grpo.klCoef, lower grpo.learningRate, or raise grpo.maxKl")


# ---------------------------------------------------------------------------
# the stage


def run(ctx: StageContext) -> Path:
    """Run GRPO or RLOO; return the final policy directory (<outputDir>/final, a plain causal LM)."""
    job, cfg, acc = ctx.job, ctx.job.grpo, ctx.accelerator
    if not job.data.prompts:
        raise PermanentStageFailure("grpo needs data.prompts (a JSON Lines file of {\"prompt\": ...} rows)")
    held_out, train_prompts = split_prompts(load_prompts(job.data.prompts), held_out=cfg.sample_prompts,
                                            source=job.data.prompts, setting="grpo.samplePrompts")
    model_source = prepare_model_source(ctx, job.model)
    tokenizer = load_tokenizer(model_source)
    encoder = PromptEncoder(tokenizer, max_prompt_tokens=max(1, cfg.max_seq_length_tokens - cfg.response_length_tokens),
                            chat_template=cfg.chat_template)

    torch.manual_seed(cfg.seed)
    # fp32 master weights; a LoRA base is frozen and loads in the compute dtype.
    policy = load_causal_lm(model_source, dtype=ctx.dtype if cfg.lora else torch.float32, lora=cfg.lora,
                            **model_options(cfg, trained=True))
    disable_dropout(policy)
    reference, which_reference = None, "no reference model (klCoef 0)"
    if cfg.kl_coef > 0:  # without a KL term the reference is never needed: do not spend its memory
        reference, which_reference = load_reference(model_source, policy=policy, lora=cfg.lora, dtype=ctx.dtype,
                                                    attention=cfg.attention_implementation)
        if not isinstance(reference, AdapterDisabled):
            reference.to(ctx.device)
    if acc.is_main_process:
        print(f"[grpo] {cfg.algorithm}, {cfg.group_size} responses per prompt, {which_reference}", flush=True)
    reward = build_reward(ctx, tokenizer, reward_source=reward_model_source(job.reward_model), cfg=cfg)
    # grpo.fsdp: the policy is sharded (before the optimizer); reference and reward model stay whole (docs/sizing.md).
    sharded = cfg.fsdp is not None and acc.num_processes > 1
    if sharded:
        sharding.shard_trained(ctx, {"policy": policy}, cfg.fsdp)

    # Fused AdamW, as PPO (a resumed run keeps the implementation its checkpoint was written with: trainer/adamw.py).
    optimizer = new_adamw([p for p in policy.parameters() if p.requires_grad], learning_rate=cfg.learning_rate,
                          weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(
        s, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps))
    if sharded:  # not prepared: accelerate's DDP wrapper would replicate it again (trainer.sharding)
        sharding.register_checkpointing(acc, policy, optimizer, trainable_only=cfg.lora is not None)
    else:
        policy, optimizer = acc.prepare(policy, optimizer)
    acc.register_for_checkpointing(scheduler)  # stepped once per iteration, as in PPO
    if cfg.lora:  # checkpoints hold the adapters and the optimizer state, not the frozen base
        checkpoint_trainable_weights_only(acc)
    params = [p for p in acc.unwrap_model(policy).parameters() if p.requires_grad]

    world, rank = acc.num_processes, acc.process_index
    prompts_per_step = cfg.batch_size // cfg.group_size
    global_batch = cfg.batch_size * world
    plan = StepPlan(num_examples=len(train_prompts), batch_size=prompts_per_step, accumulation=1, world_size=world,
                    epochs=math.ceil(cfg.steps * prompts_per_step * world / len(train_prompts)) + 1, seed=cfg.seed)

    start, _ = resume_from_latest(ctx)
    if start:
        apply_optimizer_settings(optimizer, scheduler, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
        after_resume(optimizer, stage="grpo", main_process=acc.is_main_process)
    ctx.report("progress", step=start, total_steps=cfg.steps)
    if start == 0:  # the SFT model's samples: the baseline to compare with
        _samples(ctx, step=0, held_out=held_out, policy=policy, reference=reference, reward=reward, encoder=encoder)

    health = RunHealth(mode=cfg.health_checks, stage="grpo", stop_token=cfg.stop_token is not None)
    ctx.stop.armed = True
    for step in range(start + 1, cfg.steps + 1):
        torch.manual_seed(step_seed(cfg.seed, rank=rank, step=step))
        indices = plan.step_micro_batches(step - 1, rank=rank)[0]
        timings: dict[str, float] = {}
        with sharding.gathered(policy):  # sharded: whole while sampling (trainer.sharding.gathered)
            ro = collect_groups(ctx, prompts=[train_prompts[i] for i in indices], policy=policy,
                                reference=reference, reward=reward, encoder=encoder, timings=timings)

        tick = now(ctx.device)
        batch = ro.batch
        advantages = advantages_of(batch.scores, cfg)  # (n,)
        groups = batch.scores.view(-1, cfg.group_size)
        stats = {
            "reward_mean": batch.scores.mean(), "reward_std": groups.std(1).mean(),
            "zero_std_fraction": (groups.std(1) == 0).float().mean(),
            "advantage_abs_mean": advantages.abs().mean(),
            "entropy": ppo_math.masked_mean(ro.entropy, batch.mask),
            "response_length": batch.mask.sum(1).mean(), "eos_fraction": batch.has_stop.float().mean(),
        }
        if ro.ref_logprobs is not None:
            stats["kl"] = (ppo_math.kl_per_token(ro.logprobs, ro.ref_logprobs, estimator="k3") * batch.mask).sum(1).mean()
        stats = reduce_mean(acc, stats)
        check_finite(stats, step=step)
        if "kl" in stats:
            check_kl(stats["kl"], max_kl=cfg.max_kl, step=step)
        stats.update(health.observe(acc, step=step, mask=batch.mask, has_stop=batch.has_stop, scores=batch.scores,
                                    logprobs=ro.logprobs, ref_logprobs=ro.ref_logprobs))

        update_stats = reduce_mean(acc, group_update(ctx, ro, advantages=advantages, policy=policy,
                                                     optimizer=optimizer, params=params))
        check_finite(update_stats, step=step)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()
        timings["optimisation"] = now(ctx.device) - tick

        seconds = sum(timings.values())
        tokens = reduce_sum(acc, batch.mask.sum())
        ctx.metrics.count(tokens=int(tokens), episodes=global_batch)
        if step % cfg.log_every_steps == 0 or step == cfg.steps:
            ctx.report("progress", step=step, total_steps=cfg.steps, metrics={
                **stats, **update_stats, "learning_rate": learning_rate,
                "episodes_per_second": global_batch / seconds, "tokens_per_second": tokens / seconds,
                "generation_seconds": timings["generation"], "forward_seconds": timings["forward"],
                "scoring_seconds": timings["scoring"],
                "optimisation_seconds": timings["optimisation"],
            })
        if step % cfg.sample_every_steps == 0 or step == cfg.steps:
            _samples(ctx, step=step, held_out=held_out, policy=policy, reference=reference, reward=reward,
                     encoder=encoder)
        stopping = ctx.stop.requested()
        feedback_round = feedback.round_due(job, step=step, total_steps=cfg.steps)  # human-feedback round boundary
        if step % cfg.checkpoint_every_steps == 0 or step == cfg.steps or stopping or feedback_round:
            path = save_checkpoint(ctx, step=step, extra_state={"step": step, "data_position": plan.position(step)})
            ctx.report("checkpoint", step=step, total_steps=cfg.steps, checkpoint=str(path))
        if stopping:
            raise ctx.stop.interrupted(step=step, checkpoint=path)
        if feedback_round:  # exits the process; the next attempt resumes after this step
            with sharding.gathered(policy):
                feedback.open_round(ctx, cfg=cfg, round_=feedback_round, step=step, prompts=train_prompts,
                                    policy=policy, reference=reference, reward=reward, encoder=encoder)

    ctx.stop.armed = False
    return save_final(ctx, policy, tokenizer)


def _samples(ctx: StageContext, *, step: int, held_out, policy, reference, reward, encoder) -> None:
    """Held-out samples on the main process; called on every process (a sharded policy is gathered by all)."""
    with sharding.gathered(policy):
        if ctx.accelerator.is_main_process:
            samples = sample_held_out(ctx, cfg=ctx.job.grpo, step=step, prompts=held_out, policy=policy,
                                      reference=reference, reward=reward, encoder=encoder, kl_estimator="k3")
            report_samples(ctx, samples, step=step, total=ctx.job.grpo.steps)
