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
