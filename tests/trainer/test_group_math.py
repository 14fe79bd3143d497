"""GRPO / RLOO arithmetic against values worked out by hand (the derivation is in each test's comments)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import group_math as gm


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_group_advantages_are_centred_per_group_and_scaled_by_the_group_std():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, deviations +-0.5, std (Bessel) sqrt(4*0.25/3) = 0.57735
    # group 2: 3, 3, 3, 3 -> all deviations 0 (std 0: the eps keeps them 0, not NaN)
    scores = t(1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0)
    centred = gm.group_advantages(scores, group_size=4, scale=False)
    assert centred.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    scaled = gm.group_advantages(scores, group_size=4, scale=True)
    std = math.sqrt(1 / 3)
    a = 0.5 / (std + 1e-4)
    assert scaled.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0])


def test_groups_are_consecutive_rows_not_interleaved():
    # rows 0,1 are prompt A (rewards 2, 0), rows 2,3 prompt B (rewards 10, 10)
    assert gm.group_advantages(t(2.0, 0.0, 10.0, 10.0), group_size=2, scale=False).tolist() == [1.0, -1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        gm.group_advantages(t(1.0, 2.0, 3.0, 4.0), group_size=3, scale=False)


def test_leave_one_out_baseline_is_the_mean_of_the_other_samples():
    # rewards 1, 2, 6: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> advantages -3, -1.5, 4.5
    # = G/(G-1) * (r - mean) = 1.5 * (1-3, 2-3, 6-3)
    adv = gm.leave_one_out_advantages(t(1.0, 2.0, 6.0, 5.0, 5.0, 5.0), group_size=3)
    assert adv.tolist() == pytest.approx([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        gm.leave_one_out_advantages(t(1.0), group_size=1)


def test_leave_one_out_with_scaling_divides_by_the_group_std():
    # rewards 0, 2: loo advantages -2, 2; std (Bessel) sqrt(2) -> -2/(sqrt2+eps), 2/(sqrt2+eps)
    adv = gm.leave_one_out_advantages(t(0.0, 2.0), group_size=2, scale=True)
    assert adv.tolist() == pytest.approx([-2 / (math.sqrt(2) + 1e-4), 2 / (math.sqrt(2) + 1e-4)])


def test_token_weights_for_each_normalisation():
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])  # lengths 3 and 1, max 4 tokens
    seq = gm.token_weights(mask, normalisation="sequence", max_response_tokens=4)
    assert seq.flatten().tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0, 1 / 2, 0, 0, 0])  # 1/(2*3), 1/(2*1)
    tok = gm.token_weights(mask, normalisation="token", max_response_tokens=4)
    assert tok.flatten().tolist() == pytest.approx([1 / 4, 1 / 4, 1 / 4, 0, 1 / 4, 0, 0, 0])  # 4 real tokens
    const = gm.token_weights(mask, normalisation="constant", max_response_tokens=4)
    assert const.flatten().tolist() == pytest.approx([1 / 8, 1 / 8, 1 / 8, 0, 1 / 8, 0, 0, 0])  # 1/(2*4)
    assert seq.sum().item() == pytest.approx(1.0) and tok.sum().item() == pytest.approx(1.0)


def test_clipped_ratio_loss_clips_low_and_high_separately():
    # one sequence, two tokens, A = +1 and the other sequence A = -1
    # seq 0 (A=+1): ratios e^0.5 = 1.6487 and e^0.1 = 1.1052; clip_high 0.28 -> min(1.6487, 1.28) = 1.28,
    #   min(1.1052, 1.1052) = 1.1052: per-token losses -1.28, -1.1052
    # seq 1 (A=-1): ratios e^-0.5 = 0.6065, 1.0; clip_low 0.2 -> min(-0.6065, -0.8) = -0.8, -1.0:
    #   per-token losses 0.8, 1.0
    old = t([0.0, 0.0], [0.0, 0.0])
    new = t([0.5, 0.1], [-0.5, 0.0])
    mask = t([1, 1], [1, 1])
    weights = gm.token_weights(mask, normalisation="token", max_response_tokens=2)  # 1/4 each
    out = gm.clipped_ratio_loss(new, old, t(1.0, -1.0), mask, weights, clip_low=0.2, clip_high=0.28)
    expected = (-1.28 - math.exp(0.1) + 0.8 + 1.0) / 4
    assert out.policy_loss.item() == pytest.approx(expected)
    assert out.loss.item() == pytest.approx(expected)
    assert out.kl.item() == 0.0
    assert out.clip_fraction.item() == pytest.approx(2 / 4)  # the first token of each sequence
    assert out.ratio_mean.item() == pytest.approx((math.exp(0.5) + math.exp(0.1) + math.exp(-0.5) + 1) / 4)


def test_clipped_ratio_loss_adds_the_k3_kl_with_its_own_coefficient_and_ignores_padding():
    # ratio 1 (new == old): policy term -A = -2 on the one real token; the padded token is ignored.
    # KL k3 with log r = ref - new = -0.5: e^-0.5 - 1 + 0.5 = 0.106531
    new = t([-1.0, -3.0])
    ref = t([-1.5, 9.0])
    mask = t([1, 0])
    weights = gm.token_weights(mask, normalisation="sequence", max_response_tokens=2)  # [1, 0]
    out = gm.clipped_ratio_loss(new, new.clone(), t(2.0), mask, weights, clip_low=0.2, clip_high=0.2,
                                ref_logprobs=ref, kl_coef=0.1)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert out.policy_loss.item() == pytest.approx(-2.0)
    assert out.kl.item() == pytest.approx(k3)
    assert out.loss.item() == pytest.approx(-2.0 + 0.1 * k3)
    assert out.clip_fraction.item() == 0.0 and out.ratio_mean.item() == pytest.approx(1.0)


def test_at_ratio_one_the_gradient_is_the_advantage_weighted_score_function():
    # d loss / d new_logprob_t = -A * w_t when rho = 1 (no clipping active)
    new = t([0.0, 0.0]).requires_grad_(True)
    mask = t([1, 1])
    weights = gm.token_weights(mask, normalisation="sequence", max_response_tokens=2)  # 0.5 each
    gm.clipped_ratio_loss(new, new.detach(), t(3.0), mask, weights, clip_low=0.2, clip_high=0.2).loss.backward()
    assert new.grad[0].tolist() == pytest.approx([-1.5, -1.5])
