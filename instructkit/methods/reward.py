"""Reward model: a causal-LM backbone with a scalar head trained with a Bradley-Terry loss, top to bottom.

setup: tokenizer and template, preference pairs (same encoding and batching as DPO), and the
       backbone loaded as a Hugging Face sequence-classification model (``num_labels=1``, pad token set)
train: the shared loop; per pair ``-log sigmoid(r_chosen - r_rejected - margin)`` (+ optional centring);
       with ``reward_logprob_coef`` c, r = head(last hidden state) + c * sum log p(reply | prompt), the
       log-probabilities from the backbone's own LM head (tied embeddings, or the causal head kept frozen)
save:  final/ loadable with ``AutoModelForSequenceClassification``; ``instructkit score`` uses it
       (``instructkit.json`` records the coefficient; an untied LM head is saved as ``lm_head.safetensors``)
"""

from __future__ import annotations

import json
import os
import sys
import time


from instructkit.config import ConfigError, RunConfig, dump_config
from instructkit.data.pairs import count_units, load_pair_data, plan_pair_batches
from instructkit.data.pipeline import prepare_template
from instructkit.distributed import is_main_process
from instructkit.loop import LoopResult, StepOutput, evaluate_steps, start_run, train_loop
from instructkit.losses import bradley_terry_loss
from instructkit.models import (count_trainable, load_model, load_tokenizer, output_head_weight, save_final,
                                set_logprob_term, ties_embeddings, unit_rewards)


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)
    p = cfg.preference

    # --- setup
    tokenizer = load_tokenizer(cfg.model)
    template, n_added = prepare_template(tokenizer, cfg.data)
    data = load_pair_data(cfg.data, tokenizer, template, cfg.seed, truncation=p.truncation)
    data.report.save(out_dir / "skipped.json")
    if len(data.report):
        print(data.report.summary(), file=sys.stderr)
    common = dict(packing=cfg.data.packing, micro_batch_size=cfg.train.micro_batch_size,
                  max_length=cfg.data.max_length, pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    plan = plan_pair_batches(data, split="train", shuffle=cfg.data.shuffle, **common)
    eval_batches = plan_pair_batches(data, split="eval", shuffle=False, **common).source(0) if data.n_eval else []
    print(f"data: {data.n_train} train / {data.n_eval} eval pairs, {data.n_truncated} truncated, "
          f"{len(data.report)} skipped", file=sys.stderr)
    model = load_model(cfg.model, cfg.lora, device, n_tokens=len(tokenizer) if n_added else None,
                       reward_head=True, pad_token_id=tokenizer.pad_token_id)
    head_weight = None
    if p.reward_logprob_coef:
        if cfg.distributed.strategy == "fsdp2" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("preference.reward_logprob_coef reads the LM head outside the sharded forward "
                             "pass, which fsdp2 does not support; use distributed.strategy: ddp")
        head_weight = output_head_weight(model, cfg.model, device)
        set_logprob_term(model, p.reward_logprob_coef, head_weight)
    trainable, total = count_trainable(model)
    prior = (f" + {p.reward_logprob_coef:g} x reply log-probability" if p.reward_logprob_coef else "")
    print(f"reward model: {cfg.model.name_or_path} backbone + scalar head{prior} on {device}, {trainable:,} of "
          f"{total:,} parameters trainable", file=sys.stderr)
    dump_config(cfg, out_dir / "config.yaml")

    def loss_fn(m, batch) -> StepOutput:
        r = unit_rewards(m, batch)
        loss = bradley_terry_loss(r[:, 0], r[:, 1], p.reward_margin or None, p.center_rewards)
        rc, rr = r[:, 0].detach(), r[:, 1].detach()
        return StepOutput(loss.sum(), int(loss.numel()),
                          {"accuracy": float((rc > rr).float().mean()), "reward_chosen": float(rc.mean()),
                           "reward_rejected": float(rr.mean()), "reward_margin": float((rc - rr).mean())})

    # --- train
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=plan.source, micro_per_epoch=plan.micro_per_epoch, loss_fn=loss_fn,
                        cfg=cfg.train, out_dir=out_dir,
                        eval_fn=(lambda m: evaluate_steps(m, loss_fn, eval_batches, device)) if eval_batches else None,
                        count_fn=count_units, device=device, run_config=cfg.model_dump(mode="json"),
                        logging_cfg=cfg.logging, unit="pairs")
    elapsed = time.perf_counter() - t0

    # --- save
    if result.status == "interrupted":  # the loop has saved a checkpoint and printed how to resume
        return result
    info = {"method": "reward", "base_model": cfg.model.name_or_path, "lora": cfg.lora.enabled,
            "steps": result.global_step, "train_pairs": data.n_train, "skipped": len(data.report),
            "seconds": round(elapsed, 2), "final_metrics": result.final_metrics,
            "reward_logprob_coef": p.reward_logprob_coef}
    # An untied head is not part of a sequence-classification model's files: store it beside them.
    frozen_head = head_weight is not None and not ties_embeddings(model)
    final = save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info,
                       extra_tensors={"lm_head.safetensors": {"weight": head_weight}} if frozen_head else None)
    if not is_main_process():  # under torchrun, rank 0 reports and writes the summary
        return result
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    fm = result.final_metrics
    acc = f", eval pairwise accuracy {fm['eval_accuracy']:.1%}" if "eval_accuracy" in fm else ""
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, final loss {fm.get('loss', float('nan')):.4f}"
          f"{acc}; saved {final}", file=sys.stderr)
    return result
