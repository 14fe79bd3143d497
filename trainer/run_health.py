"""Warnings that catch a silently useless online run (PPO, GRPO, RLOO).

A run can train for hours on batches that teach nothing: an instruct model given raw
prompts answers with an immediate end-of-sequence (every response empty), a response
limit too short cuts every answer (no response ends), a reward that scores every answer
the same gives no direction, or a policy that never leaves the reference (KL zero step
after step) is not being updated. None of these raise an error; they look like a run.

``batch_warnings`` decides from one batch's numbers (pure, unit-tested);
``KlStall`` counts steps with KL at zero; ``RunHealth`` is what a stage's loop calls once
per step: it measures the batch (over all processes, so every rank decides the same),
logs each warning, and stops the stage when ``<stage>.healthChecks`` is ``stop``.
KL here is the k3 estimator, exp(r) - 1 - r with r = log q/p, which is never negative
(http://joschu.net/blog/kl-approx.html), so "zero" means zero and not a cancellation.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from trainer import ppo_math
from trainer.runtime import PermanentStageFailure

EMPTY_SHARE = 0.5
"""Warn when more than this share of a batch's responses are empty."""
ENDLESS_SHARE = 0.9
"""Warn when more than this share of a batch's responses never emit the stop token."""
FLAT_REWARD_STD = 1e-6
"""Warn when the standard deviation of the batch's scores is at most this (every answer scored alike)."""
ZERO_KL = 1e-6
"""A step's mean k3 KL per sequence at or below this counts as zero."""
ZERO_KL_STEPS = 10
"""Warn once KL has been zero for this many consecutive steps."""


@dataclass(frozen=True)
class BatchStats:
    """One batch's numbers, each a mean over all processes."""

    empty_fraction: float
    """Share of responses with no token before the stop token."""
    no_stop_fraction: float
    """Share of responses that never emitted the stop token (cut at responseLengthTokens)."""
    score_std: float
    """Standard deviation of the scores within the batch."""
    kl_k3: float
    """Mean k3 KL to the reference per sequence (nats); NaN when there is no reference model."""


def batch_warnings(stats: BatchStats, *, stop_token: bool, zero_kl_steps: int) -> list[str]:
    """The warnings one batch deserves, each a sentence saying what is wrong and what to check.

    ``stop_token``: whether responses are meant to end at a stop token (``stopToken: eos``);
    without one every response runs to the limit and "never ends" is not a symptom.
    ``zero_kl_steps``: consecutive steps so far with KL at zero (``KlStall.update``).
    """
    warnings = []
    if stats.empty_fraction > EMPTY_SHARE:
        warnings.append(
            f"{stats.empty_fraction:.0%} of responses are empty (the stop token came first): an instruct model "
            "given prompts without its chat template does this; check chatTemplate and the SFT data's format")
    if stop_token and stats.no_stop_fraction > ENDLESS_SHARE:
        warnings.append(
            f"{stats.no_stop_fraction:.0%} of responses never end (no stop token within responseLengthTokens): "
            "they are cut and penalised by missingEosPenalty; raise responseLengthTokens or check that SFT "
            "taught the model to stop")
    if stats.score_std <= FLAT_REWARD_STD:
        warnings.append(
            "the reward does not vary across the batch (every response scored alike): nothing to learn from; "
            "check the reward model and reward functions")
    if zero_kl_steps >= ZERO_KL_STEPS:
        warnings.append(
            f"KL to the reference has been zero for {zero_kl_steps} steps: the policy is not moving; check the "
            "learning rate and that the trained parameters are the policy's")
    return warnings


class KlStall:
    """Counts consecutive steps whose KL is zero (NaN, no reference model, never counts)."""

    def __init__(self) -> None:
        self.steps = 0

    def update(self, kl_k3: float) -> int:
        self.steps = self.steps + 1 if kl_k3 <= ZERO_KL else 0
        return self.steps


def measure(*, mask: torch.Tensor, has_stop: torch.Tensor, scores: torch.Tensor,
            logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """This process's batch as 0-d tensors (mean them over processes before ``BatchStats``).

    mask (b, t) marks the response's tokens, its stop token included (ppo_math.truncate_at_stop_token);
    has_stop (b,); scores (b,); logprobs, ref_logprobs (b, t) of the sampled tokens, or None without
    a reference. A response is empty when its stop token is its first token.
    """
    lengths = mask.sum(1) - has_stop.float()  # (b,) tokens before the stop token
    if logprobs is not None and ref_logprobs is not None:
        kl = (ppo_math.kl_per_token(logprobs, ref_logprobs, estimator="k3") * mask).sum(1).mean()
    else:
        kl = torch.tensor(float("nan"))
    std = scores.float().std(unbiased=False) if scores.numel() > 1 else torch.tensor(0.0)
    return {"empty_fraction": (lengths <= 0).float().mean(), "no_stop_fraction": (~has_stop.bool()).float().mean(),
            "score_std": std, "kl_k3": kl.float()}


class RunHealthStop(PermanentStageFailure):
    """Stops the stage when ``healthChecks`` is ``stop``; the message lists the warnings.

    Permanent: a retry would sample the same useless batches from the same settings."""


class RunHealth:
    """Per-step health of an online stage: ``observe`` once per step after the rollout.

    ``mode``: ``warn`` (log each warning, keep training), ``stop`` (raise RunHealthStop: the stage fails
    permanently with the warnings as its reason) or ``off``.
    """

    def __init__(self, *, mode: str, stage: str, stop_token: bool, stream=None):
        self.mode, self.stage, self.stop_token, self.stream = mode, stage, stop_token, stream
        self.kl_stall = KlStall()

    def observe(self, accelerator, *, step: int, mask, has_stop, scores, logprobs=None,
                ref_logprobs=None) -> dict[str, float]:
        """Metrics for the progress event (kl_k3, empty_fraction, health_warnings); logs or raises on warnings."""
        if self.mode == "off":
            return {}
        local = measure(mask=mask, has_stop=has_stop, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs)
        values = torch.stack([v.to(mask.device).float().reshape(()) for v in local.values()])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "mean")
        stats = BatchStats(**dict(zip(local, (float(v) for v in values))))
        warnings = batch_warnings(stats, stop_token=self.stop_token, zero_kl_steps=self.kl_stall.update(stats.kl_k3))
        if accelerator.is_main_process:
            for warning in warnings:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # as trainer.reporting's lines
                print(f"{stamp} [{self.stage}] WARNING step {step}: {warning}", file=self.stream or sys.stderr,
                      flush=True)
        if warnings and self.mode == "stop":
            raise RunHealthStop(f"{self.stage}: stopped at step {step} ({self.stage}.healthChecks: stop): "
                                   + "; ".join(warnings))
        metrics = {"empty_fraction": stats.empty_fraction, "health_warnings": float(len(warnings))}
        if stats.kl_k3 == stats.kl_k3:  # not NaN
            metrics["kl_k3"] = stats.kl_k3
        return metrics
