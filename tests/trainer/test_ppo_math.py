"""PPO arithmetic against values worked out by hand (the derivation is in each test's comments)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import ppo_math as pm


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_masked_mean_ignores_masked_entries_and_empty_mask_gives_zero():
    values = t([1.0, 2.0, 100.0], [3.0, 4.0, 100.0])
    mask = t([1, 1, 0], [1, 1, 0])
    assert pm.masked_mean(values, mask).item() == pytest.approx(2.5)
    assert pm.masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 3.5])
    assert pm.masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_is_bessel_corrected_over_unmasked_entries():
    # entries 1, 2, 3, 4: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5; 5/3 unbiased, 5/4 biased
    values = t([1.0, 2.0, 9.0], [3.0, 4.0, 9.0])
    mask = t([1, 1, 0], [1, 1, 0])
    assert pm.masked_var(values, mask).item() == pytest.approx(5 / 3)
    assert pm.masked_var(values, mask, unbiased=False).item() == pytest.approx(5 / 4)


def test_masked_whiten_gives_zero_mean_unit_variance_and_zero_on_padding():
    values = t([1.0, 2.0, 9.0], [3.0, 4.0, 9.0])
    mask = t([1, 1, 0], [1, 1, 0])
    w = pm.masked_whiten(values, mask)
    std = math.sqrt(5 / 3)
    assert w[0, :2].tolist() == pytest.approx([-1.5 / std, -0.5 / std], rel=1e-6)
    assert w[:, 2].tolist() == [0.0, 0.0]
    assert pm.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)


def test_masked_whiten_without_mean_shift_keeps_the_mean():
    values = t([1.0, 2.0, 9.0], [3.0, 4.0, 9.0])
    mask = t([1, 1, 0], [1, 1, 0])
    w = pm.masked_whiten(values, mask, shift_mean=False)
    std = math.sqrt(5 / 3)
    assert w[0, 0].item() == pytest.approx(-1.5 / std + 2.5, rel=1e-6)
    assert pm.masked_mean(w, mask).item() == pytest.approx(2.5)


def test_logprobs_and_entropy_from_logits():
    # logits (0, log 3): probabilities 1/4, 3/4
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    lp = pm.logprobs_from_logits(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75))
    expected_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert pm.entropy_from_logits(logits).item() == pytest.approx(expected_entropy, rel=1e-6)


def test_kl_estimators_k1_and_k3():
    # logprob = log 0.5, ref = log 0.25: log r = log 0.5, k1 = -log r = log 2, k3 = (0.5 - 1) + log 2
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert pm.kl_per_token(lp, ref, estimator="k1").item() == pytest.approx(math.log(2))
    assert pm.kl_per_token(lp, ref, estimator="k3").item() == pytest.approx(-0.5 + math.log(2))
    # k3 is never negative, k1 can be
    assert pm.kl_per_token(ref, lp, estimator="k1").item() < 0
    assert pm.kl_per_token(ref, lp, estimator="k3").item() >= 0
    with pytest.raises(ValueError, match="k1 or k3"):
        pm.kl_per_token(lp, ref, estimator="k2")


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    mask = t([1, 1, 1], [1, 1, 0])  # second response ended at its 2nd token (the EOS)
    rewards, non_score = pm.per_token_rewards(t(1.0, 2.0), kl, mask, kl_coef=0.5)
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, -0.15 + 1.0])
    assert rewards[1].tolist() == pytest.approx([-0.2, -0.25 + 2.0, 0.0])
    assert non_score[1].tolist() == pytest.approx([-0.2, -0.25, 0.0])


def test_gae_three_step_example_by_hand():
    # gamma 0.9, lam 0.5, rewards (0, 0, 1), values (0.5, 0.4, 0.3), episode ends after step 3.
    # deltas: d3 = 1 - 0.3 = 0.7; d2 = 0 + 0.9*0.3 - 0.4 = -0.13; d1 = 0 + 0.9*0.4 - 0.5 = -0.14
    # A3 = 0.7; A2 = -0.13 + 0.45*0.7 = 0.185; A1 = -0.14 + 0.45*0.185 = -0.05675
    rewards, values, mask = t([0.0, 0.0, 1.0]), t([0.5, 0.4, 0.3]), t([1, 1, 1])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05675, 0.185, 0.7])
    assert ret[0].tolist() == pytest.approx([0.44325, 0.585, 1.0])


def test_gae_ignores_padding_after_the_end():
    # Same episode with a padded 4th position holding garbage: results on real tokens are unchanged.
    rewards, values, mask = t([0.0, 0.0, 1.0, 7.0]), t([0.5, 0.4, 0.3, 9.0]), t([1, 1, 1, 0])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05675, 0.185, 0.7, 0.0])
    assert ret[0, 3].item() == 0.0


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([1.0, 2.0, 3.0]), t([0.5, 0.5, 0.5]), t([1, 1, 1])
    adv, ret = pm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([6.0, 5.0, 3.0])
    assert adv[0].tolist() == pytest.approx([5.5, 4.5, 2.5])


def test_clipped_policy_loss_clips_a_ratio_above_one_plus_eps_for_positive_advantage():
    # token 1: ratio e^0.5 = 1.6487, A = +1 -> clipped branch: -1.2 (larger than -1.6487), clipped.
    # token 2: ratio e^-0.1 = 0.9048, A = +1 -> unclipped -0.9048 is larger than -max(0.9048, 0.8) = -0.9048 (tie
    #          -> not counted as clipped).  loss = mean(-1.2, -0.9048) = -1.0524
    new = t([0.5, -0.1])
    old = t([0.0, 0.0])
    adv = t([1.0, 1.0])
    out = pm.clipped_policy_loss(new, old, adv, t([1, 1]), clip_range=0.2)
    assert out.loss.item() == pytest.approx((-1.2 - math.exp(-0.1)) / 2)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.1) - 1 + 0.1)) / 2
    assert out.approx_kl.item() == pytest.approx(k3)
    assert out.ratio_mean.item() == pytest.approx((math.exp(0.5) + math.exp(-0.1)) / 2)


def test_clipped_policy_loss_gradient_vanishes_on_clipped_tokens():
    new = torch.tensor([[0.5, 0.0]], requires_grad=True)
    out = pm.clipped_policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_range=0.2)
    out.loss.backward()
    assert new.grad[0, 0].item() == 0.0  # clipped: no push further
    assert new.grad[0, 1].item() == pytest.approx(-0.5)  # d(-A r / 2)/d new = -r/2 = -0.5


def test_clipped_value_loss_takes_the_larger_error():
    # old 0, new 1, return 2, c = 0.2: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 0.5*3.24 = 1.62, clipped
    # old 0, new 0.1, return 0: unclipped 0.01, clipped 0.01 (within range) -> 0.005, not clipped
    loss, frac = pm.clipped_value_loss(t([1.0, 0.1]), t([0.0, 0.0]), t([2.0, 0.0]), t([1, 1]), clip_range_value=0.2)
    assert loss.item() == pytest.approx((1.62 + 0.005) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_moves_toward_target_and_is_clipped():
    ctl = pm.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error = clip(9/6 - 1 = 0.5) = 0.2; beta *= 1 + 0.2*10/100 = 1.02
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 10)  # error = -0.1; beta *= 0.99
    assert ctl.value == pytest.approx(0.102 * 0.99)
    restored = pm.AdaptiveKLController(0.1, target=6.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = pm.FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}


def test_truncate_at_stop_token_masks_after_the_first_stop_and_flags_missing_ones():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    tokens, mask, has_stop = pm.truncate_at_stop_token(responses, stop_token_id=2, pad_token_id=0)
    assert tokens.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_stop.tolist() == [True, False, True]


def test_truncate_without_stop_token_keeps_everything():
    responses = torch.tensor([[5, 2, 7]])
    tokens, mask, has_stop = pm.truncate_at_stop_token(responses, stop_token_id=None, pad_token_id=0)
    assert tokens.tolist() == [[5, 2, 7]] and mask.tolist() == [[1, 1, 1]] and has_stop.tolist() == [True]


def test_is_finite_detects_nan_and_inf():
    assert pm.is_finite(1.0) and pm.is_finite(torch.ones(3))
    assert not pm.is_finite(float("nan"))
    assert not pm.is_finite(torch.tensor([1.0, float("inf")]))
