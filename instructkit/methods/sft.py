"""Supervised fine-tuning (full or LoRA/QLoRA), read top to bottom.

setup: seed, tokenizer and template, data (validated, encoded, packed), model
train: the shared loop with a token-level NLL on assistant tokens
save:  final/ as a Hugging Face model or peft adapter folder with the training chat template
"""

from __future__ import annotations

import json
import sys
import time

from instructkit.config import RunConfig, dump_config
from instructkit.data.pipeline import load_sft_data, plan_batches, prepare_template
from instructkit.distributed import is_main_process
from instructkit.loop import LoopResult, count_targets, nll_step, start_run, train_loop
from instructkit.models import count_trainable, load_model, load_tokenizer, mean_nll, save_final


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)

    # --- setup: tokenizer, template, data. Data problems surface before the model is loaded.
    tokenizer = load_tokenizer(cfg.model)
    template, n_added = prepare_template(tokenizer, cfg.data)
    data = load_sft_data(cfg.data, tokenizer, template, cfg.seed)
    data.report.save(out_dir / "skipped.json")
    if len(data.report):
        print(data.report.summary(), file=sys.stderr)
    plan = plan_batches(data.train, packing=cfg.data.packing, micro_batch_size=cfg.train.micro_batch_size,
                        max_length=cfg.data.max_length, pad_id=tokenizer.pad_token_id, seed=cfg.seed,
                        shuffle=cfg.data.shuffle)
    eval_batches = plan_batches(data.eval, packing=cfg.data.packing,
                                micro_batch_size=cfg.train.micro_batch_size, max_length=cfg.data.max_length,
                                pad_id=tokenizer.pad_token_id, seed=cfg.seed, shuffle=False).source(0) \
        if data.eval else []
    n_targets = sum(e.n_targets for e in data.train)
    eff = f", packing efficiency {plan.packing_efficiency:.1%}" if plan.packing_efficiency else ""
    print(f"data: {len(data.train)} train / {len(data.eval)} eval examples, {n_targets} target tokens, "
          f"{plan.n_rows} rows{eff}, {data.n_truncated} truncated, {len(data.report)} skipped",
          file=sys.stderr)

    model = load_model(cfg.model, cfg.lora, device, n_tokens=len(tokenizer) if n_added else None)
    trainable, total = count_trainable(model)
    print(f"model: {cfg.model.name_or_path} on {device}, {trainable:,} of {total:,} parameters "
          f"trainable{' (LoRA)' if cfg.lora.enabled else ''}", file=sys.stderr)
    dump_config(cfg, out_dir / "config.yaml")

    # --- train: the shared loop
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=plan.source, micro_per_epoch=plan.micro_per_epoch,
                        loss_fn=nll_step, cfg=cfg.train, out_dir=out_dir,
                        eval_fn=(lambda m: {"eval_loss": mean_nll(m, eval_batches)}) if eval_batches else None,
                        count_fn=count_targets, device=device, run_config=cfg.model_dump(mode="json"),
                        logging_cfg=cfg.logging)
    elapsed = time.perf_counter() - t0

    # --- save
    if result.status == "interrupted":  # the loop has saved a checkpoint and printed how to resume
        return result
    info = {"method": "sft", "base_model": cfg.model.name_or_path, "lora": cfg.lora.enabled,
            "steps": result.global_step, "train_examples": len(data.train),
            "skipped": len(data.report), "seconds": round(elapsed, 2),
            "final_metrics": result.final_metrics}
    final = save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info)
    if not is_main_process():  # under torchrun, rank 0 reports and writes the summary
        return result
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    loss = result.final_metrics.get("loss")
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, final loss "
          f"{loss:.4f}" + (f", eval loss {result.final_metrics['eval_loss']:.4f}"
                           if "eval_loss" in result.final_metrics else "") + f"; saved {final}",
          file=sys.stderr)
    return result
