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


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token: ``log softmax(logits)[target]`` per row.

    Computed as ``logit[target] - logsumexp(logits)`` so no (N, V) log-softmax tensor is kept.

    Args:
        logits: (..., V) scores.
        targets: (...) token ids.

    Returns:
        (...) float32 log-probabilities.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
