"""Causal-LM training on plain text (continued pretraining), read top to bottom.

The demo uses it to give its tiny base model knowledge (the skills stated as plain sentences)
without any instruction format. Same loop and checkpointing as every other method.
"""

from __future__ import annotations

import json
import random
import sys
import time

from instructkit.config import RunConfig, dump_config
from instructkit.data.text import chunk_rows, document_batches, lm_batches, read_documents, token_stream
from instructkit.data.pipeline import as_list
from instructkit.distributed import is_main_process
from instructkit.loop import LoopResult, nll_step, start_run, train_loop
from instructkit.models import count_trainable, load_model, load_tokenizer, mean_nll, save_final


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)

    # --- setup: corpus -> token rows; a seeded slice of documents is held out for eval loss
    tokenizer = load_tokenizer(cfg.model)
    docs = [d for f in as_list(cfg.data.train) for d in read_documents(f)]
    eval_docs: list[str] = []
    if cfg.data.eval:
        eval_docs = [d for f in as_list(cfg.data.eval) for d in read_documents(f)]
    elif cfg.data.eval_fraction > 0:
        idx = list(range(len(docs)))
        random.Random(cfg.seed).shuffle(idx)
        held = set(idx[: max(1, int(len(docs) * cfg.data.eval_fraction))])
        eval_docs = [d for i, d in enumerate(docs) if i in held]
        docs = [d for i, d in enumerate(docs) if i not in held]
    def batches(texts: list[str], shuffle: bool):  # -> (per-epoch source, micro-batches, tokens, rows)
        if cfg.data.documents == "separate":
            plan, n_tokens = document_batches(tokenizer, texts, cfg.data.max_length, cfg.train.micro_batch_size,
                                              cfg.seed, shuffle)
            return plan.source, plan.micro_per_epoch, n_tokens, plan.n_rows
        rows = chunk_rows(token_stream(tokenizer, texts), cfg.data.max_length)
        return (*lm_batches(rows, cfg.train.micro_batch_size, cfg.seed, shuffle), rows.numel(), rows.shape[0])

    source, n_micro, n_tokens, n_rows = batches(docs, cfg.data.shuffle)
    eval_batches = batches(eval_docs, False)[0](0) if eval_docs else []
    print(f"data: {len(docs)} documents, {n_tokens:,} tokens in {n_rows} rows of {cfg.data.max_length} "
          f"({cfg.data.documents}); {len(eval_docs)} held-out documents", file=sys.stderr)

    model = load_model(cfg.model, cfg.lora, device)
    trainable, total = count_trainable(model)
    print(f"model: {cfg.model.name_or_path} on {device}, {trainable:,} of {total:,} parameters trainable",
          file=sys.stderr)
    dump_config(cfg, out_dir / "config.yaml")

    # --- train
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=source, micro_per_epoch=n_micro, loss_fn=nll_step,
                        cfg=cfg.train, out_dir=out_dir,
                        eval_fn=(lambda m: {"eval_loss": mean_nll(m, eval_batches)}) if eval_batches else None,
                        device=device, run_config=cfg.model_dump(mode="json"), logging_cfg=cfg.logging)
    elapsed = time.perf_counter() - t0
    if result.status == "interrupted":
        return result

    # --- save
    info = {"method": "pretrain", "base_model": cfg.model.name_or_path, "steps": result.global_step,
            "tokens": int(n_tokens), "seconds": round(elapsed, 2), "final_metrics": result.final_metrics}
    save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info)
    if not is_main_process():  # under torchrun, rank 0 reports and writes the summary
        return result
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, loss {result.final_metrics.get('loss', 0):.4f}",
          file=sys.stderr)
    return result
