"""Fit `instructkit demo` to a wall-clock budget on the machine it runs on.

The demo's full recipe (a 5-epoch base, 3 epochs of SFT, full and LoRA) takes about 7 minutes from cold on
a 2-core CPU with AMX and about 17 on a 2-core AMD EPYC without it (bench/RESULTS.md): one recipe is either
over the 10-minute budget on some laptops or needlessly weak on others. So the demo times a few real
training steps of its own model on its own data here, counts the steps an epoch of each stage takes, and
trains as many epochs as fit the budget, up to the full recipe. Tuning is sized first, so that a rerun with
the base cached fits its own (3-minute) budget; pretraining gets what is left of the cold budget.

:func:`plan_epochs` is pure arithmetic over measured costs (tested with hand-computed numbers);
:func:`time_train_steps` does the measuring.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

FULL_PRETRAIN_EPOCHS = 5.0  # the demo's recipe with no budget (bench/RESULTS.md, "GPT-style word tokens")
FULL_SFT_EPOCHS = 3.0
PRETRAIN_QUANTUM = 0.5  # epochs are rounded down to these steps, so small timing noise rarely changes a plan
SFT_QUANTUM = 0.25
MIN_PRETRAIN_EPOCHS = 0.5
MIN_SFT_EPOCHS = 0.25


@dataclass(frozen=True)
class StageCosts:
    """Predicted seconds of the demo's stages on this machine.

    Attributes:
        pretrain_epoch_s: One epoch of base pretraining.
        pretrain_fixed_s: Pretraining's once-per-run cost (reading and packing the corpus, saving).
        sft_epoch_s: One epoch of SFT for *both* tuned models (full and LoRA).
        sft_fixed_s: Both SFT runs' once-per-run cost (loading, encoding the data, saving).
        reserve_s: Everything after planning that is not training: evaluating the base and the tuned
            models, writing the report.
    """

    pretrain_epoch_s: float
    pretrain_fixed_s: float
    sft_epoch_s: float
    sft_fixed_s: float
    reserve_s: float


@dataclass(frozen=True)
class DemoPlan:
    """What the demo will train, and what it expects that to cost.

    Attributes:
        pretrain_epochs: Epochs of base pretraining, or None when a cached base is used.
        sft_epochs: Epochs of each SFT run (full and LoRA).
        predicted_total_s: Predicted wall time of the whole run (time already spent included).
        budget_s: The budget this plan was sized for (the tuning budget when the base is cached).
        fits: Whether the prediction is within the budget; False when even the smallest plan is over it.
    """

    pretrain_epochs: float | None
    sft_epochs: float
    predicted_total_s: float
    budget_s: float
    fits: bool


def floor_to(x: float, quantum: float) -> float:
    """``x`` rounded down to a multiple of ``quantum`` (with a little slack for float error)."""
    return math.floor(x / quantum + 1e-9) * quantum


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def plan_epochs(costs: StageCosts, *, budget_s: float, tune_budget_s: float, spent_s: float,
                tune_spent_s: float, pretrain: bool, max_pretrain_epochs: float = FULL_PRETRAIN_EPOCHS,
                max_sft_epochs: float = FULL_SFT_EPOCHS, joint: bool = False, margin: float = 1.0,
                sft_epochs: float | None = None) -> DemoPlan:
    """The largest epochs that fit the budgets, rounded down to the quanta.

    Args:
        costs: Stage costs measured on this machine.
        budget_s: Budget of this whole run when the base must be pretrained (cold).
        tune_budget_s: Budget of a run whose base is cached: tuning is sized to fit it, so that a rerun does.
        spent_s: Seconds this run has spent so far (curriculum, tokenizer, measuring).
        tune_spent_s: Of those, the seconds a run with a cached base spends too (everything but the
            tokenizer).
        pretrain: Whether the base must be pretrained (False: a cached base is used).
        max_pretrain_epochs / max_sft_epochs: The recipe's epochs with no budget; never exceeded.
        joint: ``--quick`` from cold: base and tuning share one budget and get the same epochs.
        margin: Size the epochs for this share of each budget (e.g. 0.95), leaving room for the machine
            to run slower than it did while being timed; ``fits`` is still judged against the full budget.
        sft_epochs: Tuning epochs to use instead of sizing them (to predict a given plan's time), e.g. the
            epochs of the run that built a cached base, so that a rerun repeats that run when it fits.

    Returns:
        The plan. When even the minimum epochs (0.5 of pretraining, 0.25 of tuning) are over budget, the
        minimum is planned with ``fits`` False, so the caller can say so instead of training nothing.
    """
    c = costs
    tune_fixed = c.sft_fixed_s + c.reserve_s
    if joint and pretrain:
        room = margin * budget_s - spent_s - c.pretrain_fixed_s - tune_fixed
        x = _clamp(floor_to(room / (c.pretrain_epoch_s + c.sft_epoch_s), SFT_QUANTUM), MIN_SFT_EPOCHS,
                   min(max_pretrain_epochs, max_sft_epochs))
        pre, sft = x, x
    else:
        tune_room = margin * tune_budget_s - tune_spent_s - tune_fixed
        sft = _clamp(floor_to(tune_room / c.sft_epoch_s, SFT_QUANTUM), MIN_SFT_EPOCHS, max_sft_epochs)
        if sft_epochs is not None:
            sft = min(sft_epochs, max_sft_epochs)
        pre = None
        if pretrain:
            room = margin * budget_s - spent_s - c.pretrain_fixed_s - tune_fixed - sft * c.sft_epoch_s
            pre = _clamp(floor_to(room / c.pretrain_epoch_s, PRETRAIN_QUANTUM), MIN_PRETRAIN_EPOCHS,
                         max_pretrain_epochs)
    if pretrain:
        total = spent_s + c.pretrain_fixed_s + pre * c.pretrain_epoch_s + tune_fixed + sft * c.sft_epoch_s
        budget = budget_s
    else:
        total = tune_spent_s + tune_fixed + sft * c.sft_epoch_s
        budget = tune_budget_s
    return DemoPlan(pretrain_epochs=pre, sft_epochs=sft, predicted_total_s=total, budget_s=budget,
                    fits=total <= budget)


def time_train_steps(model, batches: list[dict], *, optimizer: str, bf16: bool, lr: float = 1e-3,
                     muon_lr: float = 0.02, warmup: int = 1) -> float:
    """Median wall seconds of one optimizer step of ``model`` on real micro-batches, one per step, run by the
    shared training loop itself (same loss, optimizer, autocast, clipping and logging) in a throwaway
    folder. The first ``warmup`` steps are not counted (allocator and kernel warm-up). The model's
    weights are changed: restore them or pass a copy."""
    import json
    import tempfile

    from instructkit.config import TrainConfig
    from instructkit.loop import nll_step, train_loop

    if len(batches) <= warmup:
        raise ValueError(f"time_train_steps needs more than {warmup} batches, got {len(batches)}")
    cfg = TrainConfig(max_steps=len(batches), micro_batch_size=1, optimizer=optimizer, lr=lr, muon_lr=muon_lr,
                      bf16=bf16, schedule="constant", progress=False)
    with tempfile.TemporaryDirectory(prefix="instructkit-timing-") as tmp:
        train_loop(model=model, batches=lambda epoch: batches, micro_per_epoch=len(batches), loss_fn=nll_step,
                   cfg=cfg, out_dir=Path(tmp))
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    seen = [0] + [r["tokens_seen"] for r in records]  # the loop logs each step's target tokens per second
    times = [(seen[k + 1] - seen[k]) / r["target_tokens_per_s"] for k, r in enumerate(records)]
    return statistics.median(times[warmup:])  # one slow step (a page fault, a neighbour) should not resize the run
