"""DPO / IPO arithmetic against values worked out by hand (the derivation is in each test's comments)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import dpo_math as dm


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_completion_logprobs_sum_only_masked_tokens_each_predicted_by_the_position_before():
    # vocabulary of 2. Position 0 has logits (0, 0): p = 1/2 each. Position 1 has (ln 3, 0): p = 3/4, 1/4.
    # Sequence [0, 1, 0]: token 1 is predicted at position 0 (log 1/2), token 2 at position 1 (log 3/4).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]] * 3)
    ids = torch.tensor([[0, 1, 0]] * 3)
    mask = torch.tensor([[0, 1, 1],    # both completion tokens
                         [0, 0, 1],    # only the last
                         [1, 0, 0]])   # only the first token, which nothing predicts
    sums, counts = dm.completion_logprobs(logits, ids, mask)
    assert sums.tolist() == pytest.approx([math.log(0.5) + math.log(0.75), math.log(0.75), 0.0])
    assert counts.tolist() == [2.0, 1.0, 0.0]
    # IPO compares means: (log 1/2 + log 3/4) / 2; sigmoid the sums as they are.
    means = dm.sequence_logprobs(sums, counts, loss_type="ipo")
    assert means[0].item() == pytest.approx((math.log(0.5) + math.log(0.75)) / 2)
    assert dm.sequence_logprobs(sums, counts, loss_type="sigmoid") is sums


def test_gathered_logprobs_score_tokens_at_the_given_source_positions():
    # The same logits as above. Row 0 scores token 0 from position 1 (log 3/4) and token 1 from
    # position 0 (log 1/2): the order of the sources is free. Row 1 masks its second token out.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]] * 2)
    sources = torch.tensor([[1, 0], [1, 2]])
    tokens = torch.tensor([[0, 1], [1, 0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    sums, counts = dm.gathered_logprobs(logits, sources, tokens, mask)
    assert sums.tolist() == pytest.approx([math.log(0.75) + math.log(0.5), math.log(0.25)])
    assert counts.tolist() == [2.0, 1.0]


def test_sigmoid_loss_rewards_margin_and_accuracy_of_a_pair():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1, so h = 2 and beta h = 1 (beta 0.5).
    # loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617; rewards 0.5 * 1 and 0.5 * -1; margin 1.
    terms = dm.preference_terms(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, loss_type="sigmoid")
    assert terms.losses.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert terms.chosen_rewards.item() == 0.5 and terms.rejected_rewards.item() == -0.5
    assert terms.margins.item() == 1.0 and terms.correct.item() == 1.0


def test_label_smoothing_adds_eps_times_beta_h_to_the_sigmoid_loss():
    # -(1 - eps) log s(x) - eps log s(-x), and -log s(-x) = x - log s(x), so the loss is -log s(x) + eps x.
    # x = beta h = 1, eps = 0.1: 0.3132617 + 0.1 = 0.4132617.
    terms = dm.preference_terms(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, loss_type="sigmoid",
                                label_smoothing=0.1)
    assert terms.losses.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.1)
    # At h = 0 every smoothing gives log 2 (a coin flip), and a pair with equal rewards is not correct.
    tie = dm.preference_terms(t(-2.0), t(-2.0), t(-2.0), t(-2.0), beta=0.5, loss_type="sigmoid",
                              label_smoothing=0.3)
    assert tie.losses.item() == pytest.approx(math.log(2)) and tie.correct.item() == 0.0


def test_sigmoid_gradient_pushes_chosen_up_and_rejected_down_by_beta_sigmoid_of_minus_beta_h():
    # d/d log pi_c of -log s(beta h) = -beta s(-beta h); at h = 0 that is -beta / 2 = -0.05 (beta 0.1).
    chosen, rejected = t(-4.0).requires_grad_(), t(-5.0).requires_grad_()
    terms = dm.preference_terms(chosen, rejected, t(-4.0), t(-5.0), beta=0.1, loss_type="sigmoid")
    terms.losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)
    assert not terms.chosen_rewards.requires_grad  # rewards are statistics, not part of the loss


def test_ipo_loss_is_zero_at_the_target_margin_and_penalises_overshooting():
    # Length-averaged: policy chosen -3 over 3 tokens = -1, reference chosen -6 / 3 = -2 -> l_c = 1;
    # policy rejected -8 / 2 = -4, reference rejected -6 / 2 = -3 -> l_r = -1; h = 2.
    # beta 0.25: target 1 / (2 * 0.25) = 2, so the loss is 0; rewards 0.25 and -0.25.
    mean = lambda s, n: dm.sequence_logprobs(t(s), t(n), loss_type="ipo")  # noqa: E731
    terms = dm.preference_terms(mean(-3.0, 3), mean(-8.0, 2), mean(-6.0, 3), mean(-6.0, 2), beta=0.25,
                                loss_type="ipo")
    assert terms.losses.item() == pytest.approx(0.0)
    assert terms.chosen_rewards.item() == pytest.approx(0.25) and terms.rejected_rewards.item() == pytest.approx(-0.25)
    # h = 0 -> (0 - 2)^2 = 4; h = 3 (past the target) -> (3 - 2)^2 = 1: unlike sigmoid, IPO pulls back.
    assert dm.ipo_loss(t(0.0, 3.0), beta=0.25).tolist() == [4.0, 1.0]


def test_an_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss type 'hinge'"):
        dm.preference_terms(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="hinge")
