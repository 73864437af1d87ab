"""Causal-LM training on plain text (continued pretraining), read top to bottom.

The demo uses it to give its tiny base model knowledge (the skills stated as plain sentences)
without any instruction format. Same loop and checkpointing as every other method.
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch

from instructkit.config import RunConfig, dump_config
from instructkit.data.text import chunk_rows, lm_batches, read_documents, token_stream
from instructkit.loop import LoopResult, StepOutput, start_run, train_loop
from instructkit.losses import token_nll_sum
from instructkit.models import count_trainable, load_model, load_tokenizer, save_final, target_logits


def lm_step(model, batch: dict) -> StepOutput:
    logits, targets = target_logits(model, batch)
    return StepOutput(token_nll_sum(logits, targets), int(targets.numel()))


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)

    # --- setup: corpus -> token rows; a seeded slice of documents is held out for eval loss
    tokenizer = load_tokenizer(cfg.model)
    files = [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train)
    docs = [d for f in files for d in read_documents(f)]
    eval_docs: list[str] = []
    if cfg.data.eval:
        eval_files = [cfg.data.eval] if isinstance(cfg.data.eval, str) else list(cfg.data.eval)
        eval_docs = [d for f in eval_files for d in read_documents(f)]
    elif cfg.data.eval_fraction > 0:
        idx = list(range(len(docs)))
        random.Random(cfg.seed).shuffle(idx)
        held = set(idx[: max(1, int(len(docs) * cfg.data.eval_fraction))])
        eval_docs = [d for i, d in enumerate(docs) if i in held]
        docs = [d for i, d in enumerate(docs) if i not in held]
    rows = chunk_rows(token_stream(tokenizer, docs), cfg.data.max_length)
    source, n_micro = lm_batches(rows, cfg.train.micro_batch_size, cfg.seed, cfg.data.shuffle)
    eval_batches = []
    if eval_docs:
        erows = chunk_rows(token_stream(tokenizer, eval_docs), cfg.data.max_length)
        eval_batches = lm_batches(erows, cfg.train.micro_batch_size, cfg.seed, False)[0](0)
    print(f"data: {len(docs)} documents, {rows.numel():,} tokens in {rows.shape[0]} rows of "
          f"{cfg.data.max_length}; {len(eval_docs)} held-out documents", file=sys.stderr)

    model = load_model(cfg.model, cfg.lora, device)
    trainable, total = count_trainable(model)
    print(f"model: {cfg.model.name_or_path} on {device}, {trainable:,} of {total:,} parameters trainable",
          file=sys.stderr)
    dump_config(cfg, out_dir / "config.yaml")

    @torch.no_grad()
    def evaluate(m) -> dict[str, float]:
        m.eval()
        tot, n = 0.0, 0
        for b in eval_batches:
            out = lm_step(m, {k: v.to(device) for k, v in b.items()})
            tot, n = tot + float(out.loss_sum), n + out.n_targets
        return {"eval_loss": tot / max(1, n)}

    # --- train
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=source, micro_per_epoch=n_micro, loss_fn=lm_step,
                        cfg=cfg.train, out_dir=out_dir, eval_fn=evaluate if eval_batches else None,
                        device=device, run_config=cfg.model_dump(mode="json"), logging_cfg=cfg.logging)
    elapsed = time.perf_counter() - t0
    if result.status == "interrupted":
        return result

    # --- save
    info = {"method": "pretrain", "base_model": cfg.model.name_or_path, "steps": result.global_step,
            "tokens": int(rows.numel()), "seconds": round(elapsed, 2), "final_metrics": result.final_metrics}
    save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info)
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, loss {result.final_metrics.get('loss', 0):.4f}",
          file=sys.stderr)
    return result
