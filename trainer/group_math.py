"""The arithmetic of GRPO and RLOO, as small pure functions on tensors.

Side-effect free and unit tested (tests/trainer/test_group_math.py) against values worked
out by hand.  Shapes: n = sequences = prompts x G, laid out group by group (the G responses
to prompt i are rows i*G .. i*G + G - 1); t = response tokens.  ``mask`` is (n, t), 1 on
real response tokens.

References:
- GRPO: Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300 (eq. 3, outcome supervision)
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", https://arxiv.org/abs/2503.20783
  (no std scaling, constant loss normaliser)
- DAPO: Yu et al. 2025, https://arxiv.org/abs/2503.14476 (clip-higher, token-level normalisation)
- RLOO: Ahmadian et al. 2024, "Back to Basics", https://arxiv.org/abs/2402.14740 (leave-one-out baseline)
- k3 KL estimator: http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trainer.ppo_math import kl_per_token

LossNormalisation = Literal["sequence", "token", "constant"]

STD_EPS = 1e-4
"""Added to the group std before dividing (TRL's value): a group whose rewards are all equal gets advantages 0."""


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"expected a 1-d tensor of groups of {group_size} scores, got shape {tuple(scores.shape)}")
    return scores.view(-1, group_size)  # (prompts, G)


def group_advantages(scores: torch.Tensor, *, group_size: int, scale: bool) -> torch.Tensor:
    """GRPO: A_i = r_i - mean(group), divided by the group's std (Bessel-corrected) + STD_EPS when ``scale``.

    scores: (n,) one per sequence. Returns (n,), the same for every token of a sequence.
    ``scale=False`` is Dr. GRPO, whose authors show the std division up-weights prompts that are
    nearly always (or never) solved.
    """
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + STD_EPS)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, *, group_size: int, scale: bool = False) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(group)).

    The baseline of each sample is the mean reward of the other G - 1 samples of its prompt,
    so it does not depend on the sample itself and the estimator stays unbiased.
    ``scale`` divides by the group std as GRPO does (not in the paper). Returns (n,).
    """
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
    groups = _groups(scores, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    advantages = groups - baseline
    if scale:
        advantages = advantages / (groups.std(1, keepdim=True) + STD_EPS)
    return advantages.reshape(-1)


def token_weights(mask: torch.Tensor, *, normalisation: LossNormalisation, max_response_tokens: int) -> torch.Tensor:
    """(n, t) weights such that loss = sum(weights * per-token loss) over one optimiser step's sequences.

    sequence: 1 / (n * |o_i|): mean over each sequence's tokens, then over sequences (GRPO paper).
    token:    1 / sum_i |o_i|: every token of the batch counts the same (DAPO).
    constant: 1 / (n * max_response_tokens): a constant normaliser, no length bias (Dr. GRPO).
    Computed over the whole minibatch, so gradient accumulation over micro-batches just sums.
    """
    mask = mask.float()
    n = mask.shape[0]
    if normalisation == "sequence":
        return mask / (n * mask.sum(1, keepdim=True).clamp(min=1.0))
    if normalisation == "token":
        return mask / mask.sum().clamp(min=1.0)
    if normalisation == "constant":
        return mask / (n * max_response_tokens)
    raise ValueError(f"unknown loss normalisation {normalisation!r}")


@dataclass
class GroupPolicyLoss:
    loss: torch.Tensor  # scalar: sum(weights * (policy term + klCoef * KL))
    policy_loss: torch.Tensor  # scalar: the policy term alone, same weights
    kl: torch.Tensor  # scalar: weighted mean k3 KL to the reference (0 without one)
    clip_fraction: torch.Tensor  # share of real tokens where the clipped branch was taken
    ratio_mean: torch.Tensor  # masked mean of pi_new / pi_old


def clipped_ratio_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, weights: torch.Tensor, *, clip_low: float, clip_high: float,
                       ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0) -> GroupPolicyLoss:
    """Per token: -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3(pi_ref / pi).

    new/old/ref_logprobs, mask, weights: (n, t); advantages: (n,) one per sequence.
    ``clip_high > clip_low`` is DAPO's clip-higher: a low-probability token may grow more before
    the clip stops it, which keeps entropy from collapsing. The KL term is the k3 estimator of
    KL(pi || pi_ref) (GRPO eq. 4); it is left out when ``ref_logprobs`` is None.
    """
    mask = mask.float()
    ratio = torch.exp(new_logprobs - old_logprobs)  # (n, t)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    policy_loss = (weights * per_token).sum()
    kl = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)
    if ref_logprobs is not None:
        kl = (weights * kl_per_token(new_logprobs, ref_logprobs, estimator="k3")).sum()
    n_tokens = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        clip_fraction = ((clipped < unclipped).float() * mask).sum() / n_tokens
        ratio_mean = (ratio * mask).sum() / n_tokens
    return GroupPolicyLoss(loss=policy_loss + kl_coef * kl, policy_loss=policy_loss, kl=kl,
                           clip_fraction=clip_fraction, ratio_mean=ratio_mean)
