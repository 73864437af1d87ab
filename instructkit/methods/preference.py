"""Preference optimisation: DPO (cDPO, robust, IPO, hinge; RPO with an NLL term), SimPO, ORPO and KTO, top to bottom.

setup: seed, tokenizer and template, pairs (validated, encoded with one shared prompt rendering,
       truncated keeping the prompt's end), batches of whole pairs (packed or padded), model
reference: DPO and KTO compare against the initial model: precomputed once and cached on disk
       (default), or live (adapter-disabled base under LoRA, else a frozen copy)
train: the shared loop; the loss is summed per pair and normalised by the global number of pairs
save:  final/ as a Hugging Face model or peft adapter folder with the training chat template
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch

from instructkit import losses
from instructkit.config import PreferenceConfig, RunConfig, dump_config
from instructkit.data.pairs import count_units, load_pair_data, plan_pair_batches
from instructkit.data.pipeline import prepare_template
from instructkit.distributed import is_main_process
from instructkit.loop import LoopResult, StepOutput, evaluate_steps, start_run, train_loop
from instructkit.models import count_trainable, load_model, load_tokenizer, save_final, unit_logps
from instructkit.reference import Reference, cache_key, load_or_compute

NEEDS_REFERENCE = {"dpo", "kto"}
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}


def pair_loss(method: str, p: PreferenceConfig, sums: torch.Tensor, counts: torch.Tensor,
              ref: torch.Tensor | None, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-unit losses (P,) and per-batch metrics from policy (and reference) log-prob sums (P, 2)."""
    beta = p.beta or DEFAULT_BETA[method]
    avg = sums / counts.clamp(min=1)
    pc, pr = sums[:, 0], sums[:, 1]
    if method == "dpo":
        rc, rr = ref[:, 0], ref[:, 1]
        if p.loss_type == "ipo" and p.ipo_normalize:
            n = counts.clamp(min=1)
            loss = losses.ipo_loss(pc / n[:, 0], pr / n[:, 1], rc / n[:, 0], rr / n[:, 1], beta)
        elif p.loss_type == "ipo":
            loss = losses.ipo_loss(pc, pr, rc, rr, beta)
        elif p.loss_type == "robust":
            loss = losses.robust_dpo_loss(pc, pr, rc, rr, beta, p.label_smoothing)
        elif p.loss_type == "hinge":
            loss = losses.hinge_loss(pc, pr, rc, rr, beta)
        else:
            loss = losses.dpo_loss(pc, pr, rc, rr, beta, p.label_smoothing)
        if p.rpo_alpha:
            loss = losses.rpo_loss(loss, -avg[:, 0], p.rpo_alpha)
        reward_c, reward_r = losses.dpo_rewards(pc, pr, rc, rr, beta)
    elif method == "simpo":
        loss = losses.simpo_loss(avg[:, 0], avg[:, 1], beta, p.simpo_gamma, p.label_smoothing)
        reward_c, reward_r = (beta * avg[:, 0]).detach(), (beta * avg[:, 1]).detach()
    elif method == "orpo":
        loss = losses.orpo_loss(-avg[:, 0], avg[:, 0], avg[:, 1], p.orpo_lambda)
        reward_c, reward_r = (beta * avg[:, 0]).detach(), (beta * avg[:, 1]).detach()
    else:
        raise ValueError(f"pair_loss does not handle method {method!r}")
    metrics = {"reward_chosen": float(reward_c.mean()), "reward_rejected": float(reward_r.mean()),
               "reward_margin": float((reward_c - reward_r).mean()),
               "accuracy": float((reward_c > reward_r).float().mean()),
               "logp_chosen": float(pc.detach().mean()), "logp_rejected": float(pr.detach().mean())}
    if method == "orpo" or p.rpo_alpha:
        metrics["nll_chosen"] = float(-avg[:, 0].detach().mean())
    return loss, metrics


def kto_unit_loss(p: PreferenceConfig, sums: torch.Tensor, ref: torch.Tensor,
                  batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO per example; column 1 holds the mismatched completions that set the reference point z0."""
    beta = p.beta or DEFAULT_BETA["kto"]
    z0 = losses.kto_kl_estimate(sums[:, 1], ref[:, 1])
    good = batch["desirable"]
    loss = losses.kto_loss(sums[:, 0], ref[:, 0], good, z0, beta, p.kto_desirable_weight,
                           p.kto_undesirable_weight)
    reward = (beta * (sums[:, 0] - ref[:, 0])).detach()
    signed = torch.where(good, reward, -reward)
    right = torch.where(good, reward > beta * z0, reward < beta * z0)
    return loss, {"kl": float(z0), "reward_signed": float(signed.mean()),
                  "accuracy": float(right.float().mean()), "logp": float(sums[:, 0].detach().mean())}


def make_loss_fn(method: str, p: PreferenceConfig, reference: Reference | None) -> Callable:
    def loss_fn(model, batch) -> StepOutput:
        sums, counts = unit_logps(model, batch)
        ref = reference.logps(batch) if reference is not None else None
        if method == "kto":
            loss, metrics = kto_unit_loss(p, sums, ref, batch)
        else:
            loss, metrics = pair_loss(method, p, sums, counts, ref, batch)
        return StepOutput(loss.sum(), int(loss.numel()), metrics)
    return loss_fn


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)
    method, p = cfg.method, cfg.preference

    # --- setup: tokenizer, template, pairs. Data problems surface before the model is loaded.
    tokenizer = load_tokenizer(cfg.model)
    template, n_added = prepare_template(tokenizer, cfg.data)
    data = load_pair_data(cfg.data, tokenizer, template, cfg.seed, kind="kto" if method == "kto" else "preference",
                          truncation=p.truncation)
    data.report.save(out_dir / "skipped.json")
    if len(data.report):
        print(data.report.summary(), file=sys.stderr)
    common = dict(packing=cfg.data.packing, micro_batch_size=cfg.train.micro_batch_size,
                  max_length=cfg.data.max_length, pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    plan = plan_pair_batches(data, split="train", shuffle=cfg.data.shuffle, **common)
    eval_batches = plan_pair_batches(data, split="eval", shuffle=False, **common).source(0) if data.n_eval else []
    unit = "examples" if method == "kto" else "pairs"
    eff = f", packing efficiency {plan.packing_efficiency:.1%}" if plan.packing_efficiency else ""
    print(f"data: {data.n_train} train / {data.n_eval} eval {unit}{eff}, {data.n_truncated} truncated "
          f"(preference.truncation={p.truncation}), {len(data.report)} skipped", file=sys.stderr)

    model = load_model(cfg.model, cfg.lora, device, n_tokens=len(tokenizer) if n_added else None)
    trainable, total = count_trainable(model)
    print(f"model: {cfg.model.name_or_path} on {device}, {trainable:,} of {total:,} parameters "
          f"trainable{' (LoRA)' if cfg.lora.enabled else ''}; method {method}", file=sys.stderr)
    dump_config(cfg, out_dir / "config.yaml")

    # --- reference: the initial model's log-probs (DPO, KTO); SimPO and ORPO need none
    reference = None
    if method in NEEDS_REFERENCE:
        if p.reference == "precompute":
            key = cache_key(cfg.model.name_or_path, cfg.model.revision, data.sequences,
                            {"dtype": cfg.model.dtype, "n_added": n_added})
            table = load_or_compute(model, list(plan.source(0)) + list(eval_batches), 2 * len(data.units),
                                    device, p.reference_cache, key)
            reference = Reference(table=table)
        else:
            reference = Reference(model=model, frozen_copy=not cfg.lora.enabled)
    loss_fn = make_loss_fn(method, p, reference)

    # --- train: the shared loop
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=plan.source, micro_per_epoch=plan.micro_per_epoch, loss_fn=loss_fn,
                        cfg=cfg.train, out_dir=out_dir,
                        eval_fn=(lambda m: evaluate_steps(m, loss_fn, eval_batches, device)) if eval_batches else None,
                        count_fn=count_units, device=device, run_config=cfg.model_dump(mode="json"),
                        logging_cfg=cfg.logging, unit=unit)
    elapsed = time.perf_counter() - t0

    # --- save
    if result.status == "interrupted":  # the loop has saved a checkpoint and printed how to resume
        return result
    info = {"method": method, "base_model": cfg.model.name_or_path, "lora": cfg.lora.enabled,
            "steps": result.global_step, f"train_{unit}": data.n_train, "truncated": data.n_truncated,
            "skipped": len(data.report), "seconds": round(elapsed, 2),
            f"{unit}_per_s": round(result.final_metrics.get("tokens_seen", 0) / max(1e-9, elapsed), 2),
            "final_metrics": result.final_metrics}
    final = save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info)
    if not is_main_process():  # under torchrun, rank 0 reports and writes the summary
        return result
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    fm = result.final_metrics
    extra = f", eval accuracy {fm['eval_accuracy']:.1%}" if "eval_accuracy" in fm else ""
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, final loss {fm.get('loss', float('nan')):.4f}"
          f"{extra}; saved {final}", file=sys.stderr)
    return result
