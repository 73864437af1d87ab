"""Preference and reward losses against hand-derived values (closed forms in the comments)."""

import math

import pytest
import torch

from instructkit.losses import (bradley_terry_loss, dpo_loss, dpo_rewards, hinge_loss, ipo_loss,
                                kto_kl_estimate, kto_loss, orpo_loss, orpo_odds_ratio_loss, robust_dpo_loss,
                                sequence_logprob_sums, simpo_loss, token_logprobs)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_dpo_equal_log_ratios_is_ln2():
    # h = 0 -> -log sigmoid(0) = ln 2
    loss = dpo_loss(t(-3.0), t(-5.0), t(-3.0), t(-5.0), beta=0.1)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(loss) == pytest.approx(0.693147, abs=1e-6)


def test_cdpo_label_smoothing_closed_form():
    # beta h = 2, eps = 0.1: 0.9 * -log s(2) + 0.1 * -log s(-2) = 0.9*0.126928 + 0.1*2.126928
    beta = 0.5
    loss = dpo_loss(t(4.0), t(0.0), t(0.0), t(0.0), beta=beta, label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.326928, abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), label_smoothing=0.5)


def test_dpo_plain_value_and_direction():
    # beta h = 0.1 * ((-1 - -2) - (-3 - -2)) = 0.2 -> -log sigmoid(0.2) = log(1 + e^-0.2)
    loss = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.1)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    # Preferring the chosen response more lowers the loss.
    better = dpo_loss(t(-0.5), t(-3.0), t(-2.0), t(-2.0), beta=0.1)
    assert float(better) < float(loss)


def test_robust_dpo_closed_form_and_zero_eps_is_dpo():
    # z = 2, eps = 0.1: (0.9 * 0.126928 - 0.1 * 2.126928) / 0.8 = -0.123066
    z = 2.0
    expected = (0.9 * math.log1p(math.exp(-z)) - 0.1 * math.log1p(math.exp(z))) / 0.8
    loss = robust_dpo_loss(t(20.0), t(0.0), t(0.0), t(0.0), beta=0.1, label_smoothing=0.1)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(robust_dpo_loss(t(1.0), t(0.0), t(0.0), t(0.0), label_smoothing=0.0)) == \
        pytest.approx(float(dpo_loss(t(1.0), t(0.0), t(0.0), t(0.0))), abs=1e-7)


def test_ipo_zero_margin_beta_point_one_is_25():
    # (0 - 1/(2*0.1))^2 = 25
    assert float(ipo_loss(t(-2.0), t(-2.0), t(-2.0), t(-2.0), beta=0.1)) == pytest.approx(25.0)
    # h = 5 = 1/(2 beta): the minimum, 0.
    assert float(ipo_loss(t(5.0), t(0.0), t(0.0), t(0.0), beta=0.1)) == pytest.approx(0.0, abs=1e-6)


def test_hinge_closed_form():
    # beta h = 0.1 * 4 = 0.4 -> 0.6 ; beta h = 1.5 -> 0
    assert float(hinge_loss(t(4.0), t(0.0), t(0.0), t(0.0), beta=0.1)) == pytest.approx(0.6)
    assert float(hinge_loss(t(15.0), t(0.0), t(0.0), t(0.0), beta=0.1)) == 0.0


def test_constant_shift_leaves_dpo_ipo_hinge_unchanged():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 3 - 10 for _ in range(4))
    for fn in (dpo_loss, ipo_loss, hinge_loss, robust_dpo_loss):
        a = fn(pc, pr, rc, rr, beta=0.2)
        b = fn(pc + 7.5, pr + 7.5, rc + 7.5, rr + 7.5, beta=0.2)
        assert torch.allclose(a, b, atol=1e-5), fn.__name__


def test_rewards_are_detached_and_scaled():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    rc, rr = dpo_rewards(pc, pr, t(-1.5), t(-1.0), beta=0.1)
    assert not rc.requires_grad and not rr.requires_grad
    assert float(rc) == pytest.approx(0.05) and float(rr) == pytest.approx(-0.1)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    dpo_loss(pc, pr, t(-2.0), t(-2.0), beta=0.1).sum().backward()
    # d/dpc = -beta * sigmoid(-beta h) = -0.05 at h = 0; d/dpr = +0.05
    assert float(pc.grad) == pytest.approx(-0.05) and float(pr.grad) == pytest.approx(0.05)


def test_simpo_closed_form():
    # beta = 2, gamma = 0.5, avg_w = -1, avg_l = -2: z = 2*1 - 0.5 = 1.5 -> log(1 + e^-1.5)
    loss = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    # Reference-free: no reference argument at all, and a larger margin lowers the loss.
    assert float(simpo_loss(t(-0.5), t(-2.0))) < float(loss)


def test_orpo_odds_term_is_ln_4_over_3():
    # P_w = 0.5 -> odds 1; P_l = 0.25 -> odds 1/3; log odds ratio ln 3; -log sigmoid(ln 3) = ln(4/3)
    term = orpo_odds_ratio_loss(t(math.log(0.5)), t(math.log(0.25)))
    assert float(term) == pytest.approx(math.log(4 / 3), abs=1e-6)
    total = orpo_loss(t(0.7), t(math.log(0.5)), t(math.log(0.25)), lam=0.1)
    assert float(total) == pytest.approx(0.7 + 0.1 * math.log(4 / 3), abs=1e-6)


def test_orpo_stable_near_certain_tokens():
    term = orpo_odds_ratio_loss(t(-1e-7), t(-5.0))
    assert torch.isfinite(term).all()


def test_kto_closed_form():
    # r = 1 (desirable), z0 = 0, beta = 1: 1 - sigmoid(1); undesirable r = 1: 1 - sigmoid(-1) = sigmoid(1)
    z0 = torch.tensor(0.0)
    loss = kto_loss(t(0.0, 0.0), t(-1.0, -1.0), torch.tensor([True, False]), z0, beta=1.0,
                    desirable_weight=1.0, undesirable_weight=2.0)
    s1 = 1 / (1 + math.exp(-1))
    assert float(loss[0]) == pytest.approx(1 - s1, abs=1e-6)
    assert float(loss[1]) == pytest.approx(2 * s1, abs=1e-6)


def test_kto_reference_point_is_clamped_mean_and_detached():
    pol = torch.tensor([-1.0, -3.0], requires_grad=True)
    z0 = kto_kl_estimate(pol, t(-2.0, -2.0))  # mean(1, -1) = 0
    assert float(z0) == 0.0 and not z0.requires_grad
    assert float(kto_kl_estimate(t(-1.0, -1.0), t(-2.0, -3.0))) == pytest.approx(1.5)
    assert float(kto_kl_estimate(t(-3.0), t(-1.0))) == 0.0  # negative estimates clamp to 0


def test_bradley_terry_closed_forms():
    # equal rewards -> ln 2; margin 1 with diff 1 -> ln 2; centring adds c (r_w + r_l)^2
    assert float(bradley_terry_loss(t(0.3), t(0.3))) == pytest.approx(math.log(2))
    assert float(bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0))) == pytest.approx(math.log(2))
    loss = bradley_terry_loss(t(1.0), t(0.0), center_coefficient=0.01)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1)) + 0.01, abs=1e-6)
    assert float(bradley_terry_loss(t(3.0), t(0.0))) < float(bradley_terry_loss(t(1.0), t(0.0)))


def test_sequence_sums_and_chunked_logprobs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 50, generator=g)
    targets = torch.randint(0, 50, (10,), generator=g)
    full = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets, chunk_size=3), full, atol=1e-6)
    ids = torch.tensor([0, 0, 2, 2, 2, 1, 1, 0, 2, 2])
    sums = sequence_logprob_sums(full, ids, 4)
    for s in range(3):
        assert float(sums[s]) == pytest.approx(float(full[ids == s].sum()), abs=1e-5)
    assert float(sums[3]) == 0.0


def test_rpo_adds_the_chosen_nll_to_dpo():
    # Equal log-ratios: DPO = ln 2; chosen mean NLL 0.5, alpha 1 -> ln 2 + 0.5 = 1.193147; alpha 0 -> DPO.
    from instructkit.losses import rpo_loss

    dpo = dpo_loss(t(-3.0), t(-5.0), t(-3.0), t(-5.0), beta=0.1)
    assert float(rpo_loss(dpo, t(0.5), 1.0)) == pytest.approx(1.193147, abs=1e-6)
    assert float(rpo_loss(dpo, t(0.5), 0.0)) == pytest.approx(math.log(2), abs=1e-6)
    # Gradient on the chosen mean log-prob (summed = 4 x mean): DPO part at h = 0 is -beta sigmoid(0) 4 = -0.2,
    # the NLL part -alpha = -2: the term pushes the chosen reply's likelihood up on its own.
    avg_c = t(-0.5).requires_grad_()
    rpo_loss(dpo_loss(avg_c * 4, t(-5.0), t(-2.0), t(-5.0), beta=0.1), -avg_c, 2.0).sum().backward()
    assert float(avg_c.grad) == pytest.approx(-0.2 - 2.0, abs=1e-6)
