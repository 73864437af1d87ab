"""Online-RL losses (GAE, KL estimators, PPO clipping, GRPO advantages and aggregation) against
values derived by hand."""

import math

import pytest
import torch

from instructkit.losses import (AdaptiveKLController, aggregate_token_loss, gae, group_advantages, kl_estimate,
                                masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss,
                                weight_negative_advantages)


def test_gae_three_steps_by_hand():
    # gamma 0.9, lambda 0.8, rewards [1, 0, 2], values [0.5, 1.0, 0.5]:
    # delta_2 = 2 - 0.5 = 1.5                 A_2 = 1.5
    # delta_1 = 0 + 0.9 * 0.5 - 1.0 = -0.55   A_1 = -0.55 + 0.72 * 1.5 = 0.53
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4     A_0 = 1.4 + 0.72 * 0.53 = 1.7816
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 0.5]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[1.7816, 0.53, 1.5]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[2.2816, 1.53, 2.0]]), atol=1e-6)


def test_gae_ignores_padding_and_limits():
    # A padded row equals the same row alone; garbage at padding positions changes nothing.
    r = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 99.0]])
    v = torch.tensor([[0.5, 1.0, 0.5], [0.2, 0.4, 77.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    alone, _ = gae(r[1:, :2], v[1:, :2], torch.ones(1, 2), gamma=0.9, lam=0.8)
    assert torch.allclose(adv[1, :2], alone[0]) and adv[1, 2] == 0 and ret[1, 2] == 0
    # lambda = 1, gamma = 1: A_t = (sum of future rewards) - V_t.
    adv1, ret1 = gae(r[:1], v[:1], torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret1, torch.tensor([[3.0, 2.0, 2.0]]))
    # lambda = 0: one-step TD errors.
    adv0, _ = gae(r[:1], v[:1], torch.ones(1, 3), gamma=0.9, lam=0.0)
    assert torch.allclose(adv0, torch.tensor([[1.4, -0.55, 1.5]]))


def test_whiten_and_masked_mean():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mean(x, mask) == 2.0
    w = masked_whiten(x, mask, eps=0.0)
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]))  # population std 1
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 3.0, 0.0]]))


def test_kl_estimators():
    zero = torch.zeros(4)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(zero, zero, kind), zero)
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    ref = torch.tensor([-2.0, -1.0, -0.5, -0.1])
    k3 = kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all()
    r = ref - logp
    assert torch.allclose(k3, torch.exp(r) - 1 - r)
    assert torch.allclose(kl_estimate(logp, ref, "k1"), logp - ref)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * r ** 2)
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(logp, ref, "k4")
    # Both k1 and k3 are unbiased: averaged over samples from p they approach KL(p || q).
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    true = float((p * (p / q).log()).sum())
    for kind in ("k1", "k3"):
        est = float(kl_estimate(p.log()[x], q.log()[x], kind).mean())
        assert abs(est - true) < 0.01, (kind, est, true)


def test_clipped_policy_loss_equals_pg_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 0.5]])
    loss, clipped = ppo_policy_loss(logp, logp.detach(), adv, clip_eps=0.2)
    assert torch.allclose(loss, -adv) and not clipped.any()
    loss.sum().backward()
    pg = logp.detach().clone().requires_grad_(True)
    (-(adv * pg)).sum().backward()
    assert torch.allclose(logp.grad, pg.grad)


def test_clipped_policy_loss_clips():
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = ppo_policy_loss(logp, old, adv, clip_eps=0.2)
    # +A, ratio 1.5: min(1.5, 1.2) = 1.2 (clipped); -A, ratio 1.5: min(-1.5, -1.2) = -1.5 (not);
    # +A, ratio 0.5: min(0.5, 0.8) = 0.5 (not);     -A, ratio 0.5: min(-0.5, -0.8) = -0.8 (clipped).
    assert torch.allclose(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]
    loss.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0 and logp.grad[0, 1] != 0
    # clip-higher: an upper bound of 0.6 leaves ratio 1.5 unclipped.
    loss_hi, _ = ppo_policy_loss(logp.detach(), old, adv, clip_eps=0.2, clip_eps_high=0.6)
    assert math.isclose(float(loss_hi[0, 0]), -1.5, rel_tol=1e-6)


def test_clipped_value_loss():
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.5, 2.0]])
    loss, clipped = ppo_value_loss(v, old, ret, clip_eps=0.2)
    # token 0: (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.5 * 0.64; token 1: (2-1)^2 = 1 vs (0.2-1)^2 = 0.64 -> 0.5
    assert torch.allclose(loss, torch.tensor([[0.32, 0.5]]))
    assert clipped.tolist() == [[True, False]]
    # No movement from the old values: plain squared error.
    same, _ = ppo_value_loss(old, old, ret)
    assert torch.allclose(same, torch.tensor([[0.5, 0.5]]))


def test_group_advantages_by_hand():
    # mean 0.25; sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 -> [1.5, -0.5, -0.5, -0.5]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, eps=0.0)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    with_eps = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    assert torch.allclose(with_eps, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
    # Identical rewards: zero advantage (not NaN); groups are normalised separately.
    two = group_advantages(torch.tensor([3.0, 3.0, 3.0, 0.0, 1.0, 0.0]), group_size=3)
    assert torch.equal(two[:3], torch.zeros(3)) and two[4] > 0 > two[3]
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale=False),
                          torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), group_size=4)


def test_weight_negative_advantages_by_hand():
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5])
    assert torch.allclose(weight_negative_advantages(adv, 0.25), torch.tensor([1.5, -0.125, -0.125, -0.125]))
    assert torch.equal(weight_negative_advantages(adv, 0.0), torch.tensor([1.5, 0.0, 0.0, 0.0]))
    assert weight_negative_advantages(adv, 1.0) is adv  # the plain method: untouched
    # Per token (PPO's (B, T) layout), zeros at padding stay zero.
    tok = torch.tensor([[0.4, -2.0, 0.0], [-1.0, 1.0, 0.0]])
    assert torch.allclose(weight_negative_advantages(tok, 0.5), torch.tensor([[0.4, -1.0, 0.0], [-0.5, 1.0, 0.0]]))
    # With weight 0 the policy-gradient loss at ratio 1 only raises the better completion's log-prob.
    logp = torch.zeros(4, 1, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, logp.detach(), weight_negative_advantages(adv, 0.0)[:, None])
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5], [0.0], [0.0], [0.0]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        weight_negative_advantages(adv, 1.5)


def test_aggregations():
    # Two sequences: lengths 1 and 3, token losses [4] and [1, 1, 1]; max completion length 4.
    per_token = torch.tensor([[4.0, 9.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    s, n = aggregate_token_loss(per_token, mask, "grpo")
    assert (float(s), n) == (5.0, 2) and float(s) / n == 2.5      # mean(4, 1)
    s, n = aggregate_token_loss(per_token, mask, "bnpo")
    assert (float(s), n) == (7.0, 4) and float(s) / n == 1.75     # (4 + 3) / 4 tokens
    s, n = aggregate_token_loss(per_token, mask, "dr_grpo", max_completion_length=4)
    assert (float(s), n) == (7.0, 8) and float(s) / n == 0.875    # 7 / (2 * 4)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_token_loss(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="one of"):
        aggregate_token_loss(per_token, mask, "mean")


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert math.isclose(c.update(3.0, 10), 0.1 * (1 + 0.2 * 0.1))   # error clipped to +0.2
    c2 = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert math.isclose(c2.update(0.5, 10), 0.1 * (1 - 0.2 * 0.1))   # -0.5 clipped to -0.2
    c3 = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert math.isclose(c3.update(1.1, 10), 0.1 * (1 + 0.1 * 0.1))   # inside the band


def test_length_growth_alarm(capsys):
    from instructkit.rollout import LengthTrend

    trend = LengthTrend(0.5, window=2)
    flags = []
    # lengths 10, 10 then 20, 20 (x2) with reward flat: raised at the 4th rollout; then reward rises: not raised.
    for i, (length, reward) in enumerate([(10, 0.5), (10, 0.5), (20, 0.5), (20, 0.4), (30, 0.9), (30, 0.9)]):
        m = {"completion_len_mean": length, "reward_mean": reward}
        trend.check(i, m)
        flags.append(m["alarm_length_growth"])
    assert flags == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert "rose from 10.0 to 20.0 tokens" in capsys.readouterr().err
    off = LengthTrend(None)
    m = {"completion_len_mean": 1, "reward_mean": 0}
    off.check(0, m)
    assert "alarm_length_growth" not in m
