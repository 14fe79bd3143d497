"""PPO stage: optimise the SFT policy against the reward, with a per-token KL penalty to the SFT model.

One loop, in the order of Ziegler et al. 2019 / Huang et al. ("The N Implementation
Details of RLHF with PPO", https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo):

    for step in 1..steps:
        prompts  <- batchSize prompts (seeded order, a pure function of the step)
        rollout  <- sample responses, cut at EOS, score them, log-probs of policy and
                    reference, values, per-token rewards = -beta * KL (+ score at the last token)
        GAE      -> advantages, returns
        update   <- ppoEpochs x miniBatches steps of clipped policy loss + vfCoef * clipped value loss
        beta     <- KL controller (fixed or adaptive)
        report, samples, guardrails, checkpoint

The arithmetic lives in trainer/ppo_math.py (pure, unit tested); this file only
wires models, data and the loop.  docs/ppo.md explains every knob and metric.

Tensor shapes: b = sequences on this process, p = prompt tokens (left-padded),
t = response tokens (right-padded after the stop token), v = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import feedback, ppo_math, runtime, sharding
from trainer.adamw import after_resume, new_adamw
from trainer.checkpoint import resume_from_latest, save_checkpoint
from trainer.config import LoraConfig
from trainer.lean_decoder import LeanDecoder
from trainer.modeling import (AdapterDisabled, checkpoint_trainable_weights_only, disable_dropout,
                              enable_gradient_checkpointing, load_causal_lm, load_reference, load_tokenizer,
                              model_options, prepare_model_source, save_final, with_lora)
from trainer.rewards import CompositeReward
from trainer.rollout import (SAMPLES_FILE, PromptEncoder, PromptRow, SampledBatch, build_reward, load_prompts, now,
                             old_logprobs, positions, reduce_mean, reduce_sum, report_samples, response_logits,
                             response_logprobs, reward_model_source, sample_and_score, sample_held_out, score_responses, split_prompts,
                             step_seed)
from trainer.run_health import RunHealth
from trainer.runtime import PermanentStageFailure, StageContext
from trainer.schedule import StepPlan, apply_optimizer_settings, linear_warmup_decay

__all__ = ["SAMPLES_FILE", "VALUE_HEAD_FILE", "ValueHead", "ValueModel", "check_finite", "check_kl",
           "head_rollout_passes", "policy_pass",
           "reward_model_source", "run", "score_responses", "split_prompts", "step_seed"]
"""Re-exported from trainer.rollout, where the code shared with GRPO/RLOO lives."""


# ---------------------------------------------------------------------------
# models


class ValueModel(torch.nn.Module):
    """A transformer backbone and a linear head giving one value per token.

    The head starts at zero (Huang et al.: value head initialised to 0), so the first
    advantages are the plain discounted rewards and the value loss starts from a known point.
    """

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, source: str, *, dtype: torch.dtype, lora: LoraConfig | None = None,
                        attention: str | None = None, gradient_checkpointing: bool = False) -> "ValueModel":
        """Backbone of any transformers checkpoint (causal LM or sequence classifier); its head is dropped.

        ``dtype`` is the backbone's; the head is always fp32 and trained. With ``lora`` the backbone is
        frozen and gets trainable adapters (a LoRA value model), else every weight is trained.
        ``attention`` and ``gradient_checkpointing`` as in ``trainer.modeling.load_causal_lm``.
        """
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(source, dtype=dtype,
                                             **({"attn_implementation": attention} if attention else {}))
        if gradient_checkpointing:
            enable_gradient_checkpointing(backbone)
        return cls(with_lora(backbone, lora, task_type="FEATURE_EXTRACTION"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        lean = LeanDecoder.of(self.backbone)
        if lean is not None:
            hidden = lean.forward_hidden(input_ids, attention_mask, position_ids)  # (b, s, d)
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids).last_hidden_state  # (b, s, d)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # (b, s)


VALUE_HEAD_FILE = "value_head.safetensors"
"""Beside the final policy with ppo.valueModel: head (keys ``weight`` (1, d) and ``bias`` (1,), fp32)."""


class ValueHead(torch.nn.Module):
    """ppo.valueModel: head. A linear head on the policy's final-norm hidden state, one value per token.

    Initialised as ValueModel's head (zeros, fp32). The backbone is the policy itself, so the head has no
    transformer of its own: the PPO update runs one policy pass for logits and values (``policy_pass``),
    and the value loss's gradient reaches the policy's weights (or its LoRA adapters).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # (b, s, d) -> (b, s)


def policy_pass(policy, input_ids, attention_mask, *, response_length: int,
                temperature: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One policy forward pass: (final-norm hidden states (b, p + t, d), response logits (b, t, v) float32
    divided by ``temperature``, as ``response_logits`` gives them; None when ``temperature`` is None)."""
    lean = LeanDecoder.of(policy)
    if lean is not None:
        hidden = lean.forward_hidden(input_ids, attention_mask, positions(attention_mask))  # (b, s, d)
        logits = lean.logits(hidden[:, -(response_length + 1):]) if temperature is not None else None
    else:  # PEFT, DDP, gradient checkpointing, other architectures: the model's own forward
        out = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                     logits_to_keep=response_length + 1 if temperature is not None else 1, output_hidden_states=True)
        hidden, logits = out.hidden_states[-1], (out.logits if temperature is not None else None)
    if logits is not None:
        logits = logits[:, :-1].float() / temperature
    return hidden, logits


# ---------------------------------------------------------------------------
# rollouts


@dataclass
class Rollouts:
    """One batch of episodes on this process: the sampled batch plus PPO's forward passes; all detached."""

    prompts: list[str]
    responses_text: list[str]
    input_ids: torch.Tensor  # (b, p + t) prompt (left-padded) + response (pad after the stop token)
    attention_mask: torch.Tensor  # (b, p + t)
    prompt_length: int  # p
    responses: torch.Tensor  # (b, t)
    mask: torch.Tensor  # (b, t) 1 on real response tokens, stop token included
    logprobs: torch.Tensor  # (b, t) policy at sampling time ("old" log-probs)
    ref_logprobs: torch.Tensor  # (b, t)
    values: torch.Tensor  # (b, t) V(state before each response token)
    scores: torch.Tensor  # (b,) reward score, missing-EOS penalty applied
    has_stop: torch.Tensor  # (b,) bool
    entropy: torch.Tensor  # (b, t) policy entropy per position


def response_values(value_model, input_ids, attention_mask, *, prompt_length: int) -> torch.Tensor:
    """V(prompt + response[:i]) for each response token i: (b, t) float32."""
    values = value_model(input_ids, attention_mask, positions(attention_mask))  # (b, p + t)
    return values[:, prompt_length - 1:-1].float()


def head_rollout_passes(policy, head: ValueHead, batch: SampledBatch, *, temperature: float,
                        with_logprobs: bool) -> dict[str, torch.Tensor]:
    """valueModel: head. ``values`` (b, t) from one pass of the policy and, ``with_logprobs``, the old
    ``logprobs`` and ``entropy`` (b, t) from the same pass's logits.

    In bf16/fp16 the old log-probs need a policy pass (``old_logprobs``: the sampler's are not used there) and
    the head needs the policy's hidden states: both are outputs of the same forward (``policy_pass``), which
    computes exactly what the two separate passes computed, so one pass replaces two. In fp32 the old
    log-probs are the sampler's and only the values are computed here.
    """
    hidden, logits = policy_pass(policy, batch.input_ids, batch.attention_mask,
                                 response_length=batch.responses.shape[1],
                                 temperature=temperature if with_logprobs else None)
    out = {"values": head(hidden[:, batch.prompt_length - 1:-1]).float()}  # (b, t)
    if with_logprobs:
        out["logprobs"] = ppo_math.logprobs_from_logits(logits, batch.responses)  # (b, t)
        out["entropy"] = ppo_math.entropy_from_logits(logits)  # (b, t)
    return out


@torch.no_grad()
def collect_rollouts(ctx: StageContext, *, prompts: list[PromptRow], policy, reference, value_model,
                     reward: CompositeReward, encoder: PromptEncoder, timings: dict[str, float]) -> Rollouts:
    """Generate, cut at the stop token, score and evaluate one batch (no gradients)."""
    cfg = ctx.job.ppo
    acc = ctx.accelerator
    policy_module = acc.unwrap_model(policy)
    passes: dict[str, torch.Tensor] = {}

    def forward_passes(batch: SampledBatch) -> None:
        # With the head in bf16/fp16 the old log-probs come from the policy pass that gives the values.
        one_pass = cfg.value_model == "head" and ctx.dtype != torch.float32
        if not one_pass:
            passes["logprobs"], passes["entropy"] = old_logprobs(ctx, policy_module, batch,
                                                                 temperature=cfg.temperature)
        with acc.autocast():
            passes["ref_logprobs"] = response_logprobs(reference, batch, temperature=cfg.temperature)
            if cfg.value_model == "head":
                passes.update(head_rollout_passes(policy_module, acc.unwrap_model(value_model), batch,
                                                  temperature=cfg.temperature, with_logprobs=one_pass))
            else:
                passes["values"] = response_values(acc.unwrap_model(value_model), batch.input_ids,
                                                   batch.attention_mask, prompt_length=batch.prompt_length)

    batch = sample_and_score(ctx, cfg=cfg, policy_module=policy_module, encoder=encoder, reward=reward,
                             prompts=prompts, timings=timings, before_scoring=forward_passes)
    return Rollouts(prompts=batch.prompts, responses_text=batch.responses_text, input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask, prompt_length=batch.prompt_length,
                    responses=batch.responses, mask=batch.mask, scores=batch.scores, has_stop=batch.has_stop,
                    **passes)


# ---------------------------------------------------------------------------
# optimisation


def ppo_update(ctx: StageContext, ro: Rollouts, *, advantages, returns, policy, value_model, optimizer,
               params) -> dict[str, float]:
    """ppoEpochs passes of miniBatches clipped-PPO steps over this batch; mean statistics of all of them.

    Advantages are whitened per minibatch (Huang et al. detail; equal to per batch when
    miniBatches = 1).  A minibatch is split into gradientAccumulationSteps micro-batches.
    """
    cfg = ctx.job.ppo
    acc = ctx.accelerator
    b = ro.input_ids.shape[0]
    mb_size = b // cfg.mini_batches
    micro = mb_size // cfg.gradient_accumulation_steps  # PPOConfig checked that it divides
    t = ro.responses.shape[1]
    sums: dict[str, float] = {}
    updates = 0
    policy.train()
    value_model.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(b, device=ctx.device)
        for start in range(0, b, mb_size):
            mb = order[start:start + mb_size]
            mb_adv = ppo_math.masked_whiten(advantages[mb], ro.mask[mb])
            for m_start in range(0, mb_size, micro):
                idx = mb[m_start:m_start + micro]
                local = slice(m_start, m_start + micro)
                with acc.autocast():
                    if cfg.value_model == "head":  # one pass of the shared backbone: logits and values
                        hidden, logits = policy_pass(policy, ro.input_ids[idx], ro.attention_mask[idx],
                                                     response_length=t, temperature=cfg.temperature)
                        new_values = value_model(hidden[:, ro.prompt_length - 1:-1]).float()  # (m, t)
                        del hidden
                        new_logprobs = ppo_math.logprobs_from_logits(logits, ro.responses[idx])  # (m, t)
                        del logits
                    else:
                        logits = response_logits(policy, ro.input_ids[idx], ro.attention_mask[idx],
                                                 response_length=t, temperature=cfg.temperature)
                        new_logprobs = ppo_math.logprobs_from_logits(logits, ro.responses[idx])  # (m, t)
                        del logits
                        new_values = response_values(value_model, ro.input_ids[idx], ro.attention_mask[idx],
                                                     prompt_length=ro.prompt_length)
                pl = ppo_math.clipped_policy_loss(new_logprobs, ro.logprobs[idx], mb_adv[local], ro.mask[idx],
                                                  clip_range=cfg.clip_range)
                vf_loss, vf_clip = ppo_math.clipped_value_loss(new_values, ro.values[idx], returns[idx],
                                                               ro.mask[idx], clip_range_value=cfg.clip_range_value)
                loss = pl.loss + cfg.vf_coef * vf_loss
                acc.backward(loss / cfg.gradient_accumulation_steps)
                for name, value in (("policy_loss", pl.loss), ("value_loss", vf_loss), ("loss", loss),
                                    ("policy_clip_fraction", pl.clip_fraction), ("approx_kl", pl.approx_kl),
                                    ("ratio_mean", pl.ratio_mean), ("value_clip_fraction", vf_clip)):
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                updates += 1
            sharding.clip_gradients(acc, params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {name: total / updates for name, total in sums.items()}


# ---------------------------------------------------------------------------
# guardrails


def check_finite(values: dict[str, float], *, step: int) -> None:
    """Raise StageFailed naming every non-finite value (NaN or inf in a loss, reward, KL ...)."""
    runtime.check_finite(values, stage="ppo", step=step, advice="lower ppo.learningRate, check the reward functions "
                         "and reward model, or use precision fp32")


def check_kl(kl: float, *, max_kl: float | None, step: int) -> None:
    """Raise StageFailed when the mean KL per sequence exceeds ppo.maxKl (the policy ran away from SFT)."""
    runtime.check_kl(kl, max_kl=max_kl, stage="ppo", step=step, advice="the policy is drifting (reward hacking?): "
                     "raise ppo.klCoef, lower ppo.learningRate, or raise ppo.maxKl")


# ---------------------------------------------------------------------------
# the stage


def run(ctx: StageContext) -> Path:
    """Run PPO; return the final policy directory (<outputDir>/final, a plain causal LM)."""
    job, cfg, acc = ctx.job, ctx.job.ppo, ctx.accelerator
    if not job.data.prompts:
        raise PermanentStageFailure("ppo needs data.prompts (a JSON Lines file of {\"prompt\": ...} rows)")
    held_out, train_prompts = split_prompts(load_prompts(job.data.prompts), held_out=cfg.sample_prompts,
                                            source=job.data.prompts)
    model_source = prepare_model_source(ctx, job.model)
    tokenizer = load_tokenizer(model_source)
    encoder = PromptEncoder(tokenizer, max_prompt_tokens=max(1, cfg.max_seq_length_tokens - cfg.response_length_tokens),
                            chat_template=cfg.chat_template)

    # Trained weights are fp32 masters (autocast does the low precision); frozen ones, a LoRA base included,
    # load in ctx.dtype. With LoRA the value model is LoRA too (frozen backbone, adapters and an fp32 head).
    torch.manual_seed(cfg.seed)
    trained_dtype = ctx.dtype if cfg.lora else torch.float32
    policy = load_causal_lm(model_source, dtype=trained_dtype, lora=cfg.lora, **model_options(cfg, trained=True))
    reference, which_reference = load_reference(model_source, policy=policy, lora=cfg.lora, dtype=ctx.dtype,
                                                attention=cfg.attention_implementation)
    reward_source = reward_model_source(job.reward_model)
    if cfg.value_model == "head":
        # Prepared as a model of its own: checkpoints hold its weights (model_1) and the optimizer its state.
        value_model = ValueHead(policy.config.hidden_size)
        value_said = "value head on the policy's last hidden state (valueModel: head; shared backbone)"
    else:
        # Huang et al.: the value model starts from the reward model, which already judges whole responses.
        value_source = reward_source or model_source
        value_model = ValueModel.from_pretrained(value_source, dtype=trained_dtype, lora=cfg.lora,
                                                 **model_options(cfg, trained=True))
        value_said = f"value model initialised from {value_source}" + (", LoRA" if cfg.lora else "")
    if acc.is_main_process:
        print(f"[ppo] {which_reference}", flush=True)
        print(f"[ppo] {value_said}", flush=True)
    for model in (policy, value_model):
        disable_dropout(model)
    if not isinstance(reference, AdapterDisabled):
        reference.to(ctx.device)
    reward = build_reward(ctx, tokenizer, reward_source=reward_source, cfg=cfg)
    # ppo.fsdp: the trained models are sharded (before the optimizer, which holds their shards); the frozen
    # reference and reward model stay whole on every process (docs/sizing.md says why).
    sharded = cfg.fsdp is not None and acc.num_processes > 1
    if sharded:
        sharding.shard_trained(ctx, {"policy": policy, "value model": value_model}, cfg.fsdp)

    params = [p for p in policy.parameters() if p.requires_grad] + \
        [p for p in value_model.parameters() if p.requires_grad]
    # Fused AdamW (a resumed run keeps the implementation its checkpoint was written with: trainer/adamw.py).
    optimizer = new_adamw(params, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(
        s, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps))
    if sharded:  # not prepared: accelerate's DDP wrapper would replicate them again (trainer.sharding)
        sharding.register_checkpointing(acc, torch.nn.ModuleDict({"policy": policy, "value_model": value_model}),
                                        optimizer, trainable_only=cfg.lora is not None)
    else:
        policy, value_model, optimizer = acc.prepare(policy, value_model, optimizer)
    # Not prepared: accelerate's scheduler wrapper steps once per process; ours steps once per PPO iteration.
    acc.register_for_checkpointing(scheduler)
    if cfg.lora:  # checkpoints hold the adapters, the value head and the optimizer state, not the frozen bases
        checkpoint_trainable_weights_only(acc)
    params = [p for p in acc.unwrap_model(policy).parameters() if p.requires_grad] + \
        [p for p in acc.unwrap_model(value_model).parameters() if p.requires_grad]

    if cfg.adaptive_kl is not None:
        kl_ctl = ppo_math.AdaptiveKLController(cfg.kl_coef, target=cfg.adaptive_kl.target_kl,
                                               horizon=cfg.adaptive_kl.horizon)
    else:
        kl_ctl = ppo_math.FixedKLController(cfg.kl_coef)

    world, rank = acc.num_processes, acc.process_index
    global_batch = cfg.batch_size * world
    plan = StepPlan(num_examples=len(train_prompts), batch_size=cfg.batch_size, accumulation=1, world_size=world,
                    epochs=math.ceil(cfg.steps * global_batch / len(train_prompts)) + 1, seed=cfg.seed)

    start, state = resume_from_latest(ctx)
    if start:
        kl_ctl.load_state_dict(state["kl_controller"])
        apply_optimizer_settings(optimizer, scheduler, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
        after_resume(optimizer, stage="ppo", main_process=acc.is_main_process)
    ctx.report("progress", step=start, total_steps=cfg.steps)
    if start == 0:  # the SFT model's samples: the baseline to compare with
        with sharding.gathered(policy):  # every process gathers a sharded policy; the main one samples
            if acc.is_main_process:
                samples = sample_held_out(ctx, cfg=cfg, step=0, prompts=held_out, policy=policy, reference=reference,
                                          reward=reward, encoder=encoder, kl_estimator=cfg.kl_estimator)
                report_samples(ctx, samples, step=0, total=cfg.steps)

    health = RunHealth(mode=cfg.health_checks, stage="ppo", stop_token=cfg.stop_token is not None)
    ctx.stop.armed = True
    for step in range(start + 1, cfg.steps + 1):
        torch.manual_seed(step_seed(cfg.seed, rank=rank, step=step))
        indices = plan.step_micro_batches(step - 1, rank=rank)[0]
        timings: dict[str, float] = {}
        with sharding.gathered(policy, value_model):  # sharded: whole while sampling (trainer.sharding.gathered)
            ro = collect_rollouts(ctx, prompts=[train_prompts[i] for i in indices], policy=policy,
                                  reference=reference, value_model=value_model, reward=reward, encoder=encoder,
                                  timings=timings)

        tick = now(ctx.device)
        kl = ppo_math.kl_per_token(ro.logprobs, ro.ref_logprobs, estimator=cfg.kl_estimator) * ro.mask  # (b, t)
        rewards, non_score = ppo_math.per_token_rewards(ro.scores, kl, ro.mask, kl_coef=kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, ro.mask, shift_mean=False)
        advantages, returns = ppo_math.gae(rewards, ro.values, ro.mask, gamma=cfg.gamma, lam=cfg.lam)
        rollout_stats = reduce_mean(acc, {
            "kl": kl.sum(1).mean(), "score_mean": ro.scores.mean(),
            "non_score_reward": non_score.sum(1).mean(),
            "reward_mean": (ro.scores + non_score.sum(1)).mean(),
            "entropy": ppo_math.masked_mean(ro.entropy, ro.mask),
            "response_length": ro.mask.sum(1).mean(), "eos_fraction": ro.has_stop.float().mean(),
            "value_mean": ppo_math.masked_mean(ro.values, ro.mask),
        })
        check_finite(rollout_stats, step=step)
        check_kl(rollout_stats["kl"], max_kl=cfg.max_kl, step=step)
        rollout_stats.update(health.observe(acc, step=step, mask=ro.mask, has_stop=ro.has_stop, scores=ro.scores,
                                            logprobs=ro.logprobs, ref_logprobs=ro.ref_logprobs))

        update_stats = ppo_update(ctx, ro, advantages=advantages, returns=returns, policy=policy,
                                  value_model=value_model, optimizer=optimizer, params=params)
        update_stats = reduce_mean(acc, update_stats)
        check_finite(update_stats, step=step)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()
        # Ziegler et al.: beta follows the KL of the rollouts just collected, over all processes' episodes.
        kl_ctl.update(rollout_stats["kl"], global_batch)
        timings["optimisation"] = now(ctx.device) - tick

        seconds = sum(timings.values())
        tokens = float(reduce_sum(acc, ro.mask.sum()))
        ctx.metrics.count(tokens=int(tokens), episodes=global_batch)
        if step % cfg.log_every_steps == 0 or step == cfg.steps:
            ctx.report("progress", step=step, total_steps=cfg.steps, metrics={
                **rollout_stats, **update_stats, "kl_coef": kl_ctl.value, "learning_rate": learning_rate,
                "episodes_per_second": global_batch / seconds, "tokens_per_second": tokens / seconds,
                "generation_seconds": timings["generation"], "forward_seconds": timings["forward"],
                "scoring_seconds": timings["scoring"],
                "optimisation_seconds": timings["optimisation"],
            })
        if step % cfg.sample_every_steps == 0 or step == cfg.steps:
            with sharding.gathered(policy):
                if acc.is_main_process:
                    samples = sample_held_out(ctx, cfg=cfg, step=step, prompts=held_out, policy=policy,
                                              reference=reference, reward=reward, encoder=encoder,
                                              kl_estimator=cfg.kl_estimator)
                    report_samples(ctx, samples, step=step, total=cfg.steps)
        # The last step too: a crash while writing final/ then costs no rollouts.
        stopping = ctx.stop.requested()
        feedback_round = feedback.round_due(job, step=step, total_steps=cfg.steps)  # human-feedback round boundary
        if step % cfg.checkpoint_every_steps == 0 or step == cfg.steps or stopping or feedback_round:
            path = save_checkpoint(ctx, step=step, extra_state={
                "step": step, "kl_controller": kl_ctl.state_dict(), "data_position": plan.position(step),
            })
            ctx.report("checkpoint", step=step, total_steps=cfg.steps, checkpoint=str(path))
        if stopping:
            raise ctx.stop.interrupted(step=step, checkpoint=path)
        if feedback_round:  # exits the process; the next attempt resumes after this step
            with sharding.gathered(policy):
                feedback.open_round(ctx, cfg=cfg, round_=feedback_round, step=step, prompts=train_prompts,
                                    policy=policy, reference=reference, reward=reward, encoder=encoder)

    ctx.stop.armed = False
    head = acc.unwrap_model(value_model)
    beside = {VALUE_HEAD_FILE: {"weight": sharding.full_tensor(head.head.weight),  # gathered when sharded
                                "bias": sharding.full_tensor(head.head.bias)}} \
        if cfg.value_model == "head" else None
    return save_final(ctx, policy, tokenizer, extra_tensors=beside)
