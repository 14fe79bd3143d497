"""The arithmetic of DPO and IPO, as small pure functions on tensors.

Side-effect free and unit tested (tests/trainer/test_dpo_math.py) against values worked out by
hand. Shapes: b = preference pairs, n = sequences (2b when chosen and rejected share a forward
pass), t = tokens, v = vocabulary. ``completion_mask`` is (n, t), 1 on the tokens of the
completion (the chosen or rejected reply), 0 on the prompt and on padding.

With log-ratios l_c = log pi(y_c|x) - log pi_ref(y_c|x) and l_r likewise for the rejected
reply, and h = l_c - l_r:

- sigmoid (DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7):
  -log sigmoid(beta h); with label smoothing eps (conservative DPO, Mitchell 2023,
  https://ericmitchell.ai/cdpo.pdf): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
  the expected loss when a share eps of the labels is flipped.
- ipo (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17): (h - 1 / (2 beta))^2, on
  log-probabilities averaged over the completion's tokens (as TRL does), so the target margin
  1 / (2 beta) does not depend on reply length.

Implicit rewards (DPO's section 5): r = beta * (log pi - log pi_ref) of each reply, computed from
the same log-probabilities the loss sees (length-averaged for IPO); margin r_c - r_r; a pair counts
as correct when r_c > r_r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trainer.ppo_math import logprobs_from_logits

LossType = Literal["sigmoid", "ipo"]


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of the completion tokens, number of completion tokens), each (n,).

    logits: (n, t, v) of a causal LM over ``input_ids`` (n, t); position i predicts token i + 1,
    so the first token of a sequence is never scored (a completion starting at position 0 loses
    its first token). Sums are float32 whatever the logits' dtype.
    """
    token_logps = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # (n, t-1)
    mask = completion_mask[:, 1:].to(token_logps.dtype)  # (n, t-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def gathered_logprobs(logits: torch.Tensor, sources: torch.Tensor, tokens: torch.Tensor,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs, number of tokens), each (n,), of the tokens scored at given positions.

    logits: (n, t, v); sources, tokens, mask: (n, k): token j of row i is ``tokens[i, j]``, predicted by
    the logits at position ``sources[i, j]``, and counts where ``mask[i, j]`` is 1. This scores a reply
    whose tokens are not all right after one another, such as a rejected reply that follows the chosen
    one in a shared sequence but continues the prompt. Sums are float32.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]  # (n, 1)
    token_logits = logits[rows, sources]  # (n, k, v)
    token_logps = logprobs_from_logits(token_logits, tokens)  # (n, k)
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def sequence_logprobs(sums: torch.Tensor, counts: torch.Tensor, *, loss_type: LossType) -> torch.Tensor:
    """What the loss compares: sums for sigmoid, means over the completion's tokens for ipo. (n,)."""
    if loss_type == "ipo":
        return sums / counts.clamp(min=1)
    return sums


@dataclass(frozen=True)
class PairTerms:
    """Per-pair results, each (b,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    """beta * (log pi - log pi_ref) of the chosen reply (detached)."""
    rejected_rewards: torch.Tensor
    """The same for the rejected reply (detached)."""

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def correct(self) -> torch.Tensor:
        """1.0 where the chosen reply has the higher implicit reward (a tie counts as wrong), else 0.0."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def sigmoid_loss(logits: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) per pair; ``logits`` is h, (b,)."""
    scaled = beta * logits
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo_loss(logits: torch.Tensor, *, beta: float) -> torch.Tensor:
    """(h - 1 / (2 beta))^2 per pair; ``logits`` is h from length-averaged log-probs, (b,)."""
    return (logits - 1 / (2 * beta)) ** 2


def preference_terms(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                     reference_rejected: torch.Tensor, *, beta: float, loss_type: LossType,
                     label_smoothing: float = 0.0) -> PairTerms:
    """Loss and implicit rewards of each pair from its four sequence log-probs (``sequence_logprobs``), each (b,).

    Only the policy's log-probs carry gradients; the reference ones are constants.
    """
    chosen_ratio = policy_chosen - reference_chosen  # l_c
    rejected_ratio = policy_rejected - reference_rejected  # l_r
    logits = chosen_ratio - rejected_ratio  # h
    if loss_type == "sigmoid":
        losses = sigmoid_loss(logits, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(logits, beta=beta)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected sigmoid or ipo")
    return PairTerms(losses=losses, chosen_rewards=beta * chosen_ratio.detach(),
                     rejected_rewards=beta * rejected_ratio.detach())
