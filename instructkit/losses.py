"""Loss functions: pure tensor functions of their inputs, imported by the methods.

This module imports only torch. Each function documents the quantity it returns; reductions are
sums so the training loop can normalise by the *global* number of target tokens across
micro-batches (and ranks), which keeps gradient accumulation exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` under ``logits``.

    ``-sum_i log softmax(logits_i)[targets_i]``, the cross-entropy of supervised fine-tuning
    (Ouyang et al. 2022, "Training language models to follow instructions", SFT stage).

    Args:
        logits: (N, V) scores for the N target positions only (callers select target positions
            before the output projection, so prompt and padding positions cost nothing here).
        targets: (N,) token ids.
        chunk_size: Rows per chunk; the fp32 log-softmax is materialised for at most this many rows
            at a time, which bounds memory for large vocabularies.

    Returns:
        A scalar tensor: the sum over the N positions (0 when N = 0, still differentiable).
    """
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits has {logits.shape[0]} rows but targets has {targets.shape[0]}")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk_size):
        part = logits[start:start + chunk_size].float()
        total = total + F.cross_entropy(part, targets[start:start + chunk_size], reduction="sum")
    return total


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Log-probability of each target token: ``log softmax(logits)[target]`` per row.

    Computed as ``logit[target] - logsumexp(logits)`` chunk by chunk, so at most ``chunk_size`` rows
    of fp32 vocabulary scores exist at a time and no (N, V) log-softmax tensor is ever built.

    Args:
        logits: (N, V) scores (any float dtype).
        targets: (N,) token ids.
        chunk_size: Rows per chunk.

    Returns:
        (N,) float32 log-probabilities.
    """
    parts = []
    for start in range(0, logits.shape[0], chunk_size):
        part = logits[start:start + chunk_size].float()
        picked = torch.gather(part, -1, targets[start:start + chunk_size].unsqueeze(-1)).squeeze(-1)
        parts.append(picked - torch.logsumexp(part, dim=-1))
    if not parts:
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def sequence_logprob_sums(token_logps: torch.Tensor, seq_ids: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """Sum per-token log-probabilities into per-sequence totals.

    Args:
        token_logps: (N,) log-probabilities of the N target tokens of a batch.
        seq_ids: (N,) the sequence (0..n_seqs-1) each token belongs to.
        n_seqs: Number of sequences.

    Returns:
        (n_seqs,) float32 sums; a sequence with no target token gets 0.
    """
    out = token_logps.new_zeros(n_seqs, dtype=torch.float32)
    return out.index_add(0, seq_ids, token_logps.float())


# ----------------------------------------------------------------------------------------------
# Preference losses. Inputs are per-pair *summed* response log-probabilities (policy and reference)
# unless a docstring says otherwise; outputs are per-pair losses (shape (B,)) so the training loop
# can sum them and normalise by the global number of pairs. Rewards returned next to a loss are
# detached: they are for logging, never for gradients.


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), the DPO log-ratio margin."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Implicit rewards beta * (log pi - log ref) for chosen and rejected, detached."""
    return ((beta * (policy_chosen - ref_chosen)).detach(),
            (beta * (policy_rejected - ref_rejected)).detach())


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (sigmoid) loss; with ``label_smoothing`` = eps > 0 it is conservative DPO (cDPO).

    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` with ``h`` from :func:`dpo_logits`.
    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7; cDPO: Mitchell 2023, "A note on
    DPO with noisy preferences" (eps = probability that a label is flipped).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                    label_smoothing: float = 0.1) -> torch.Tensor:
    """Robust DPO: an unbiased estimate of the clean-label DPO loss under flip rate eps.

    ``((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)``.
    Chowdhury et al. 2024, "Provably Robust DPO", eq. 8. Unlike cDPO it can be negative.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> torch.Tensor:
    """IPO: the squared distance of the log-ratio margin from 1/(2 beta).

    ``(h - 1 / (2 beta))^2``. Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences", eq. 17. The paper uses summed log-probabilities; TRL length-normalises
    them (mean per token). Callers choose by what they pass in (``preference.ipo_normalize``).
    """
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> torch.Tensor:
    """SLiC-style hinge on the DPO margin: ``max(0, 1 - beta h)`` (Zhao et al. 2023, "SLiC-HF")."""
    z = beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.relu(1.0 - z)


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO: reference-free, length-normalised, with a target reward margin gamma.

    ``-log sigmoid(beta * avg_w - beta * avg_l - gamma)`` where ``avg`` is the *mean* log-probability
    per response token. Meng et al. 2024, "SimPO", eq. 6. Here gamma is the margin itself (the paper's
    gamma; TRL's ``simpo_gamma`` is gamma / beta). ``label_smoothing`` applies as in cDPO.
    """
    z = beta * (avg_chosen - avg_rejected) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def orpo_odds_ratio_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor) -> torch.Tensor:
    """ORPO's odds-ratio term ``-log sigmoid(log odds(y_w) - log odds(y_l))``.

    ``odds(y) = P(y) / (1 - P(y))`` with ``log P(y)`` the mean per-token log-probability (< 0).
    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 4-7.
    ``log(1 - P)`` is computed as ``log(-expm1(log P))`` for accuracy near P = 1.
    """
    log_odds = (avg_chosen - avg_rejected) - (torch.log(-torch.expm1(avg_chosen))
                                              - torch.log(-torch.expm1(avg_rejected)))
    return -F.logsigmoid(log_odds)


def orpo_loss(chosen_nll: torch.Tensor, avg_chosen: torch.Tensor, avg_rejected: torch.Tensor,
              lam: float = 0.1) -> torch.Tensor:
    """ORPO total per pair: ``NLL(y_w) + lambda * odds-ratio term`` (reference-free).

    Args:
        chosen_nll: (B,) mean token NLL of the chosen response (the SFT term).
        avg_chosen: (B,) mean token log-probability of the chosen response.
        avg_rejected: (B,) the same for the rejected response.
        lam: Weight of the odds-ratio term (the paper's lambda).
    """
    return chosen_nll + lam * orpo_odds_ratio_loss(avg_chosen, avg_rejected)


def rpo_loss(preference_loss: torch.Tensor, chosen_nll: torch.Tensor, alpha: float) -> torch.Tensor:
    """A DPO-family loss plus ``alpha`` x the chosen reply's mean token NLL, per pair.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization" (Eq. 3: DPO + NLL of the winning
    sequence, normalised by its length); TRL's ``rpo_alpha``. Plain DPO can meet its objective by pushing
    the rejected reply down while the chosen one loses likelihood too, which lowers what greedy decoding
    produces; the NLL term keeps the chosen reply's probability up. ``alpha`` = 0 is the plain loss.

    Args:
        preference_loss: (B,) per-pair loss of the DPO variant.
        chosen_nll: (B,) mean token NLL of the chosen response.
        alpha: Weight of the NLL term.
    """
    return preference_loss + alpha * chosen_nll


def kto_kl_estimate(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch's mean ``log pi - log ref`` on mismatched pairs, >= 0, detached.

    Mismatched pairs (prompt x_i with completion y_j, j != i) estimate KL(pi || ref) without
    depending on how good the matched completions are (Ethayarajh et al. 2024, "KTO", sec. 4).
    """
    if policy_kl.numel() == 0:
        return policy_kl.new_zeros(())
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             z0: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO per example: ``lambda_D (1 - sigmoid(beta (r - z0)))`` for desirable completions and
    ``lambda_U (1 - sigmoid(beta (z0 - r)))`` for undesirable ones, with ``r = log pi - log ref``.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy.
        ref_logps: (B,) the same under the reference.
        desirable: (B,) bool labels.
        z0: Scalar reference point (see :func:`kto_kl_estimate`).
    """
    r = policy_logps - ref_logps
    good = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad)


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """Reward-model loss per pair: ``-log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2``.

    Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT) eq. 1. The optional margin m asks the
    chosen reward to exceed the rejected one by m (Llama 2, Touvron et al. 2023, eq. 2). The centring
    term (Eisenstein et al. 2023) keeps rewards near zero mean, since the loss alone fixes only
    differences.
    """
    diff = reward_chosen - reward_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * (reward_chosen + reward_rejected) ** 2
    return loss


# ----------------------------------------------------------------------------------------------
# Knowledge distillation. Teacher and student share a vocabulary; inputs are (N, V) logits at the N
# target positions (or the teacher's top-k log-probs there). Outputs are sums over positions, like
# token_nll_sum, so the loop normalises by the global target-token count.

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _kl_rows(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities; terms where p = 0 contribute 0 (not NaN)."""
    p = p_logp.exp()
    terms = torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p))
    return terms.sum(-1)


def kd_divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str = "forward_kl",
                  beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher and student distributions given as log-probabilities.

    - ``forward_kl``: KL(p_T || p_S), the classic KD objective (Hinton et al. 2015): mean-seeking,
      the student covers every mode of the teacher.
    - ``reverse_kl``: KL(p_S || p_T) (MiniLLM, Gu et al. 2024): mode-seeking.
    - ``jsd``: generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 3):
      ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)`` with ``M = beta p_T + (1 - beta) p_S``.
      The divergence itself vanishes at both ends; as in GKD/TRL, ``beta = 0`` is defined as forward
      KL and ``beta = 1`` as reverse KL, the limits of ``JSD/beta`` and ``JSD/(1 - beta)``.

    Args:
        teacher_logp: (..., K) log-probabilities (each row sums to 1 in probability).
        student_logp: (..., K) log-probabilities over the same K outcomes.

    Returns:
        (...,) divergences in nats.
    """
    if kind == "forward_kl":
        return _kl_rows(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl_rows(student_logp, teacher_logp)
    if kind != "jsd":
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl_rows(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl_rows(student_logp, teacher_logp)
    mix = torch.logsumexp(torch.stack([teacher_logp + torch.log(torch.tensor(beta)),
                                       student_logp + torch.log(torch.tensor(1.0 - beta))]), dim=0)
    return beta * _kl_rows(teacher_logp, mix) + (1.0 - beta) * _kl_rows(student_logp, mix)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            kind: str = "forward_kl", beta: float = 0.5, chunk_size: int = 1024) -> torch.Tensor:
    """Summed token-level KD loss ``T^2 * sum_i D(softmax(t_i / T), softmax(s_i / T))`` over full vocabularies.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015,
    sec. 2). fp32 log-softmaxes exist for at most ``chunk_size`` rows at a time; the teacher side
    carries no gradient.

    Args:
        student_logits: (N, V) student logits at the target positions.
        teacher_logits: (N, V) teacher logits at the same positions (same vocabulary order).
        temperature: Softening temperature T > 0.
        kind, beta: See :func:`kd_divergence`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: teacher and student must share the vocabulary")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for s in range(0, student_logits.shape[0], chunk_size):
        sl = torch.log_softmax(student_logits[s:s + chunk_size].float() / temperature, dim=-1)
        tl = torch.log_softmax(teacher_logits[s:s + chunk_size].detach().float() / temperature, dim=-1)
        total = total + kd_divergence(tl, sl, kind, beta).sum()
    return total * temperature ** 2


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most likely ids of ``softmax(logits / T)``, their log-probs, and the log of the rest's mass.

    Returns:
        ``(ids (N, k) long, logp (N, k) float32, rest (N,) float32)``; ``rest`` is -inf when k >= V.
    """
    ids, logp, rest = [], [], []
    k = min(k, logits.shape[-1])
    for s in range(0, logits.shape[0], chunk_size):
        lp = torch.log_softmax(logits[s:s + chunk_size].detach().float() / temperature, dim=-1)
        top = torch.topk(lp, k, dim=-1)
        ids.append(top.indices)
        logp.append(top.values)
        rest.append(_log_rest(lp, top.indices))
    if not ids:
        z = logits.new_zeros((0, k))
        return z.long(), z.float(), logits.new_zeros(0).float()
    return torch.cat(ids), torch.cat(logp), torch.cat(rest)


def _log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``ids`` (computed from the complement, not 1 - sum)."""
    return torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)


def kd_loss_topk(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                 teacher_rest: torch.Tensor, temperature: float = 1.0, kind: str = "forward_kl",
                 beta: float = 0.5, chunk_size: int = 1024) -> torch.Tensor:
    """KD against a teacher known only by its top-k: summed ``T^2 * D`` over k + 1 outcomes.

    Both distributions are coarse-grained to the teacher's k tokens plus one "every other token"
    outcome (the teacher's ``rest`` mass; the student's own mass outside those k). This is exact for
    the coarse-grained distributions, is 0 when the two models agree, still pushes student mass off
    tokens the teacher finds unlikely, and is at most the full-vocabulary divergence (data
    processing inequality). ``teacher_logp`` and ``teacher_rest`` must be computed at the same
    temperature (see :func:`topk_logprobs`).

    Args:
        student_logits: (N, V).
        teacher_ids: (N, k) token ids.
        teacher_logp: (N, k) teacher log-probs at temperature T.
        teacher_rest: (N,) log of the teacher's remaining mass at temperature T.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for s in range(0, student_logits.shape[0], chunk_size):
        e = s + chunk_size
        sl = torch.log_softmax(student_logits[s:e].float() / temperature, dim=-1)
        idx = teacher_ids[s:e].long()
        s_top = torch.gather(sl, -1, idx)
        s_rest = _log_rest(sl, idx)
        t_full = torch.cat([teacher_logp[s:e].float(), teacher_rest[s:e].float().unsqueeze(-1)], dim=-1)
        s_full = torch.cat([s_top, s_rest.unsqueeze(-1)], dim=-1)
        total = total + kd_divergence(t_full.detach(), s_full, kind, beta).sum()
    return total * temperature ** 2


# ----------------------------------------------------------------------------------------------
# Online RL (PPO, GRPO). Per-token quantities are (B, T) tensors over the *response* tokens of B
# sequences, right-padded, with a (B, T) mask that is 1 on real response tokens. Padding positions
# never influence a result (they are masked out of sums, means and the GAE recursion).


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked positions; padding positions come back as 0.

    The variance is the population variance (divide by n): whitening is a normalisation, not an
    estimate. With ``shift_mean=False`` the mean is added back (PPO's reward whitening keeps the
    sign of the rewards; Ziegler et al. 2019).
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over per-token rewards (Schulman et al. 2016, eq. 11-16).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lambda A_{t+1}``, with
    ``V_{t+1} = 0`` and ``A_{t+1} = 0`` past a sequence's last real token (the episode ends there).
    Returns ``R_t = A_t + V_t`` are the value targets (lambda-returns).

    Args:
        rewards: (B, T) per-token rewards (for RLHF: -beta * KL each token, plus the score at the last).
        values: (B, T) value estimates V(s_t), detached.
        mask: (B, T) 1 on real response tokens (a contiguous prefix of each row).
        gamma: Discount.
        lam: GAE lambda (1 = Monte-Carlo returns minus V; 0 = one-step TD errors).

    Returns:
        ``(advantages, returns)``, both (B, T) and 0 at padding positions.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values.detach() * m
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * m[:, t + 1] if t + 1 < T else rewards.new_zeros(rewards.shape[0])
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the log-probs of tokens sampled from pi.

    With ``r = ref_logp - logp`` (Schulman 2020, "Approximating KL divergence"):
    ``k1 = -r`` (unbiased, can be negative), ``k2 = r^2 / 2`` (biased, low variance, >= 0),
    ``k3 = exp(r) - 1 - r`` (unbiased and >= 0; the GRPO paper's KL term, Shao et al. 2024, eq. 4).
    """
    r = ref_logp - logp
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r ** 2
    if kind == "k3":
        return torch.expm1(r) - r
    raise ValueError(f"kind must be k1, k2 or k3, got {kind!r}")


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)``.

    ``rho = exp(logp - old_logp)`` (Schulman et al. 2017, "Proximal Policy Optimization", eq. 7).
    When rho = 1 (first pass over fresh rollouts) the value is ``-A`` and the gradient is the plain
    policy gradient ``-A * grad log pi``. ``clip_eps_high`` (DAPO's clip-higher) defaults to
    ``clip_eps``.

    Returns:
        ``(loss, clipped)``: (B, T) per-token losses and a (B, T) bool of tokens where the clipped
        branch was taken (for the clip-fraction metric). Aggregate with a mask.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped_term = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    loss = -torch.minimum(unclipped, clipped_term)
    return loss, (clipped_term < unclipped).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token: ``0.5 * max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = old_V + clip(V - old_V, -eps, eps)`` keeps the value function from moving far from
    the one that produced the advantages (the PPO2 baselines implementation; Ziegler et al. 2019).

    Returns:
        ``(loss, clipped)``, both (B, T); ``clipped`` marks tokens where the clipped branch is larger.
    """
    old, ret = old_values.detach(), returns.detach()
    v_clip = old + torch.clamp(values - old, -clip_eps, clip_eps)
    a, b = (values - ret) ** 2, (v_clip - ret) ** 2
    return 0.5 * torch.maximum(a, b), (b > a).detach()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantages: ``(r_i - mean(r_group)) / (std(r_group) + eps)``.

    Shao et al. 2024, "DeepSeekMath" (GRPO, sec. 4.1.2, outcome supervision). Rewards are laid out
    group by group: ``rewards[k * G:(k + 1) * G]`` are the G completions of prompt k.

    Std convention: the *sample* standard deviation (divide by G - 1), as ``torch.std`` and TRL
    compute it, plus ``eps`` = 1e-4 in the denominator. For rewards [1, 0, 0, 0]: mean 0.25,
    sample std 0.5, advantages [1.5, -0.5, -0.5, -0.5] (up to eps). A group whose rewards are all
    equal gets advantage 0 (no signal; the std is 0 and the numerator is 0). ``scale=False`` skips
    the division (Dr. GRPO, Liu et al. 2025, which argues the std term biases towards easy or
    hopeless prompts).

    Args:
        rewards: (N * G,) scalar rewards.
        group_size: G, completions per prompt (>= 2 for a meaningful baseline).

    Returns:
        (N * G,) float32 advantages.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    g = rewards.float().view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def weight_negative_advantages(advantages: torch.Tensor, weight: float) -> torch.Tensor:
    """Asymmetric advantages: negative entries times ``weight`` (in [0, 1]), positive ones unchanged.

    The policy gradient then pushes the probability of a below-expectation completion down by
    ``weight`` times as much as a plain update would, while above-expectation completions are
    reinforced in full. ``weight`` = 1 is the plain method; 0 learns only from the better completions
    (for 0/1 rewards, rejection-sampling fine-tuning with GRPO's weights). Zhu et al. 2025 ("The
    Surprising Effectiveness of Negative Reinforcement in LLM Reasoning") study both halves: positive
    samples sharpen the greedy answer, negative ones keep the distribution broad. On a model too small
    to spare capacity, pushing down sampled wrong answers spills into other tasks (bench/RESULTS.md).

    Example: ``[1.5, -0.5, -0.5, -0.5]`` with weight 0.25 gives ``[1.5, -0.125, -0.125, -0.125]``.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if weight == 1.0:
        return advantages
    return torch.where(advantages < 0, advantages * weight, advantages)


GRPO_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo")


def aggregate_token_loss(per_token: torch.Tensor, mask: torch.Tensor, kind: str = "grpo",
                         max_completion_length: int | None = None) -> tuple[torch.Tensor, int]:
    """Reduce (B, T) per-token losses to the *sum* the training loop expects, and its unit count.

    The loop divides the summed loss by the step's total unit count, so each aggregation is written
    as ``(sum, units)`` with ``sum / units`` the loss of that micro-batch:

    - ``grpo``: mean over each sequence's tokens, then mean over sequences (the GRPO paper, eq. 3).
      Every sequence weighs the same, so tokens of long sequences weigh less (a length bias).
      Returns ``(sum of per-sequence means, B)``.
    - ``bnpo``: mean over all tokens of the batch (DAPO's token-level loss, Yu et al. 2025):
      every token weighs the same. Returns ``(sum of token losses, number of tokens)``.
    - ``dr_grpo``: ``sum / (B * max_completion_length)`` (Dr. GRPO, Liu et al. 2025): a constant
      normaliser, so neither length nor batch composition re-weights tokens. Returns
      ``(sum of token losses, B * max_completion_length)``.

    Args:
        per_token: (B, T) losses.
        mask: (B, T) 1 on real completion tokens.
        kind: One of ``GRPO_AGGREGATIONS``.
        max_completion_length: Required for ``dr_grpo`` (the sampling limit, not this batch's max).
    """
    m = mask.to(per_token.dtype)
    if kind == "grpo":
        per_seq = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
        return per_seq.sum(), int(per_token.shape[0])
    if kind == "bnpo":
        return (per_token * m).sum(), int(m.sum())
    if kind == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length (the max_new_tokens of sampling)")
        return (per_token * m).sum(), int(per_token.shape[0] * max_completion_length)
    raise ValueError(f"kind must be one of {GRPO_AGGREGATIONS}, got {kind!r}")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2): moves beta so the observed KL tracks a target.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, init_beta: float, target: float, horizon: float = 10000.0):
        self.value, self.target, self.horizon = init_beta, target, horizon

    def update(self, observed_kl: float, n_steps: int) -> float:
        err = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value
