"""The PPO arithmetic, as small pure functions on tensors.

Everything here is side-effect free and unit tested (tests/trainer/test_ppo_math.py)
against values worked out by hand.  Shapes use b = batch (sequences),
t = response tokens, v = vocabulary.  ``mask`` is always a (b, t) tensor of
0/1 (or bool) marking real response tokens; padding after the stop token is 0.

References:
- Schulman et al. 2017, PPO: https://arxiv.org/abs/1707.06347
- Schulman et al. 2015, GAE: https://arxiv.org/abs/1506.02438
- Ziegler et al. 2019 (per-token KL penalty, adaptive KL): https://arxiv.org/abs/1909.08593
- Huang et al., "The N Implementation Details of RLHF with PPO":
  https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo
- KL estimators k1/k3: http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------
# masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; over everything (dim=None) or along ``dim``.

    An all-zero mask gives 0 rather than NaN (the denominator is clamped to 1).
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; Bessel-corrected (n / (n - 1)) when ``unbiased``.

    Returns 0 when fewer than two entries are unmasked (no spread to measure).
    """
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if n < 2:
            return torch.zeros((), dtype=values.dtype, device=values.device)
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries; masked-out entries come back as 0.

    ``shift_mean=False`` rescales to unit variance but keeps the mean (used for
    reward whitening, Huang et al. detail "reward whitening without mean shift",
    so a positive reward stays mostly positive).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ---------------------------------------------------------------------------
# log-probabilities and entropy


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position.

    logits: (b, t, v) already divided by the sampling temperature; tokens: (b, t) ints.
    Returns (b, t).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (b, t, v)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact entropy of softmax(logits) per position: logsumexp(z) - sum p z. (b, t, v) -> (b, t)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# ---------------------------------------------------------------------------
# KL penalty and rewards


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    With log r = ref_logprob - logprob (http://joschu.net/blog/kl-approx.html):
      k1 = -log r            unbiased, can be negative per token;
      k3 = (r - 1) - log r   unbiased, never negative, lower variance when the two are close.
    Shapes (b, t) -> (b, t).
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"klEstimator must be k1 or k3, got {estimator!r}")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards the agent sees at each token: -beta * KL everywhere, plus the score at the last token.

    scores: (b,) sequence scores; kl: (b, t); mask: (b, t) with at least one 1 per row.
    Returns (rewards, non_score_rewards), both (b, t) and 0 on padding.

    The score goes on the last *real* response token (the stop token when there
    is one).  TRL puts it one position later (``sequence_length + 1``); on that
    position the value is masked out, so we keep it inside the mask instead.
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (b,)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, eq. 16), one episode per row.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    with V and A taken as 0 after the last real token (the episode ends there).
    rewards, values, mask: (b, t).  Returns (advantages, returns), (b, t), 0 on padding;
    returns = advantages + values are the value-function targets.
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    b, t = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        # mask[:, i] resets the recursion on padding, so padding never leaks into real tokens.
        last_gae = (delta + gamma * lam * last_gae) * mask[:, i]
        advantages[:, i] = last_gae
        next_value = values[:, i]
    return advantages, advantages + values


# ---------------------------------------------------------------------------
# losses


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # share of tokens where the clipped branch was taken
    approx_kl: torch.Tensor  # k3 estimate of KL(old || new) over the minibatch
    ratio_mean: torch.Tensor


def clipped_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, clip_range: float) -> PolicyLoss:
    """PPO's clipped surrogate, as a loss to minimise (PPO paper eq. 7, negated).

    loss = mean over real tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = exp(new - old).
    approx_kl uses the k3 form mean((r - 1) - log r) (as CleanRL; TRL logs 0.5 * mean(log r ^ 2)
    instead, http://joschu.net/blog/kl-approx.html).  All inputs (b, t).
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl, ratio_mean)


def clipped_value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, *, clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean of max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c).

    Returns (loss, clip_fraction): the share of tokens where the clipped error was larger.
    All inputs (b, t).
    """
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_range_value, clip_range_value)
    err_unclipped = (new_values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err_unclipped).float(), mask)
    return loss, clip_fraction


# ---------------------------------------------------------------------------
# KL coefficient controllers


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: move beta toward a target KL.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_episodes / horizon).
    ``current_kl`` is the mean KL per sequence (nats) of the batch just collected and
    ``n_episodes`` the number of sequences in it (over all processes).
    """

    def __init__(self, kl_coef: float, *, target: float, horizon: int):
        self.value = float(kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# ---------------------------------------------------------------------------
# responses


def truncate_at_stop_token(responses: torch.Tensor, *, stop_token_id: int | None,
                           pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token.

    responses: (b, t) generated ids.  Returns (tokens, mask, has_stop):
    tokens (b, t) with everything after the first stop token replaced by ``pad_token_id``;
    mask (b, t) 1 up to and including the stop token; has_stop (b,) bool.
    With ``stop_token_id=None`` every token is kept and has_stop is all True
    (no response is penalised for a missing stop token).
    """
    b, t = responses.shape
    if stop_token_id is None:
        return responses, torch.ones_like(responses), torch.ones(b, dtype=torch.bool, device=responses.device)
    is_stop = responses == stop_token_id
    has_stop = is_stop.any(1)
    # index of the first stop token, or t when there is none
    first = torch.where(has_stop, is_stop.int().argmax(1), torch.full_like(has_stop, t, dtype=torch.long))
    positions = torch.arange(t, device=responses.device).unsqueeze(0)  # (1, t)
    mask = (positions <= first.unsqueeze(1)).long()
    tokens = torch.where(mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return tokens, mask, has_stop


def is_finite(x: torch.Tensor | float) -> bool:
    """True when every element is a finite number."""
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return math.isfinite(x)
