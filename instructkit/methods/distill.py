"""Knowledge distillation (token level), read top to bottom.

setup:   seed, the student's tokenizer and template, data (the SFT pipeline: validated, encoded,
         packed), the student; the teacher's tokenizer must match the student's
teacher:  live (a frozen copy in eval mode, no grad) or top-k log-probs cached on disk
train:   the shared loop; per micro-batch
         loss = alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * NLL, summed over target tokens,
         with D forward KL, reverse KL or generalised JSD (losses.kd_divergence). With probability
         on_policy_fraction (GKD's lambda) a micro-batch is replaced by the student's own replies to its
         prompts, scored by the teacher's distribution (KD only: there is no reference reply then).
save:    final/ as for SFT (the student, with the training chat template)
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch

from instructkit.config import ModelConfig, RunConfig, dump_config
from instructkit.data.encode import EncodedExample
from instructkit.data.packing import collate_padded
from instructkit.data.pipeline import load_sft_data, plan_batches, prepare_template
from instructkit.distributed import is_main_process
from instructkit.loop import LoopResult, StepOutput, count_targets, start_run, train_loop
from instructkit.losses import token_nll_sum
from instructkit.models import (count_trainable, load_model, load_tokenizer, mean_nll, resolve_dtype, save_final,
                                target_logits)
from instructkit.teacher import Teacher, check_same_vocab, load_or_build_cache, segments


def load_teacher(cfg: RunConfig, device: torch.device):
    """The frozen teacher, in eval mode, with gradients off."""
    from transformers import AutoModelForCausalLM

    from instructkit.gguf import resolve_model_path
    from instructkit.models import ModelError

    try:
        teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.distill.teacher), dtype=resolve_dtype(cfg.model.dtype, device),
                                                       trust_remote_code=cfg.model.trust_remote_code,
                                                       attn_implementation=cfg.model.attn_implementation)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the teacher from distill.teacher='{cfg.distill.teacher}': {e}") from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def on_policy_batch(model, tokenizer, batch: dict, max_new_tokens: int, temperature: float, seed: int) -> dict:
    """The batch's prompts answered by the student itself: a padded batch whose targets are its replies."""
    from instructkit.generate import SamplingConfig, generate

    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    prompts = []
    for r, a, b in segments(batch):
        lab = labels[r, a:b]
        first = int((lab != -100).nonzero()[0]) if (lab != -100).any() else b - a
        prompts.append(ids[r, a:a + first].tolist())
    was_training = model.training
    model.eval()
    gens = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                                              seed=seed), batch_size=len(prompts))
    model.train(was_training)
    examples = [EncodedExample(p + g.token_ids, [-100] * len(p) + g.token_ids) for p, g in zip(prompts, gens)
                if g.token_ids]
    if not examples:
        return {}
    out = collate_padded(examples, pad_id=tokenizer.pad_token_id)
    return {k: v.to(batch["input_ids"].device) for k, v in out.items()}


def make_loss_fn(cfg: RunConfig, teacher: Teacher, tokenizer):
    d = cfg.distill

    def loss_fn(model, batch) -> StepOutput:
        n_targets = int((batch["labels"][:, 1:] != -100).sum())
        if d.on_policy_fraction > 0 and "_epoch" in batch:
            draw = random.Random(cfg.seed * 1_000_003 + batch["_epoch"] * 100_003 + batch["_i"]).random()
            if draw < d.on_policy_fraction:
                gen = on_policy_batch(model, tokenizer, batch, d.on_policy_max_new_tokens, d.on_policy_temperature,
                                      seed=cfg.seed + 7919 * batch["_i"] + batch["_epoch"])
                if gen:
                    logits, _ = target_logits(model, gen)
                    kd = teacher.kd_sum(logits, gen, live=True)
                    # Scale to this micro-batch's target count, which the loop normalises by.
                    kd = kd * (n_targets / max(1, logits.shape[0]))
                    return StepOutput(kd, n_targets, {"kd": float(kd.detach()) / max(1, n_targets), "on_policy": 1.0})
        logits, targets = target_logits(model, batch)
        nll = token_nll_sum(logits, targets)
        kd = teacher.kd_sum(logits, batch) if d.alpha > 0 else nll * 0.0
        loss = d.alpha * kd + (1.0 - d.alpha) * nll
        n = max(1, targets.numel())
        return StepOutput(loss, int(targets.numel()), {"kd": float(kd.detach()) / n, "nll": float(nll.detach()) / n,
                                                       "on_policy": 0.0})
    return loss_fn


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)
    d = cfg.distill

    # --- setup: student tokenizer and template; the teacher must share the vocabulary
    tokenizer = load_tokenizer(cfg.model)
    template, n_added = prepare_template(tokenizer, cfg.data)
    check_same_vocab(tokenizer, load_tokenizer(ModelConfig(name_or_path=d.teacher,
                                                           trust_remote_code=cfg.model.trust_remote_code)), d.teacher)
    data = load_sft_data(cfg.data, tokenizer, template, cfg.seed)
    data.report.save(out_dir / "skipped.json")
    if len(data.report):
        print(data.report.summary(), file=sys.stderr)
    common = dict(packing=cfg.data.packing, micro_batch_size=cfg.train.micro_batch_size,
                  max_length=cfg.data.max_length, pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    plan = plan_batches(data.train, shuffle=cfg.data.shuffle, **common)
    eval_batches = plan_batches(data.eval, shuffle=False, **common).source(0) if data.eval else []
    print(f"data: {len(data.train)} train / {len(data.eval)} eval examples, "
          f"{sum(e.n_targets for e in data.train)} target tokens, {plan.n_rows} rows", file=sys.stderr)

    # --- teacher: live, or top-k log-probs cached on disk (then it is only loaded to build the cache)
    live = d.teacher_logits == "live" or d.on_policy_fraction > 0
    teacher_model = load_teacher(cfg, device) if live else None
    cache = None
    if d.teacher_logits == "cache":
        cache = load_or_build_cache(lambda: teacher_model or load_teacher(cfg, device), d.teacher,
                                    data.train + data.eval, k=d.top_k, temperature=d.temperature,
                                    cache_dir=d.cache_dir, device=device, pad_id=tokenizer.pad_token_id)
    teacher = Teacher(d, model=teacher_model, cache=cache)

    model = load_model(cfg.model, cfg.lora, device, n_tokens=len(tokenizer) if n_added else None)
    trainable, total = count_trainable(model)
    print(f"model: {cfg.model.name_or_path} on {device}, {trainable:,} of {total:,} parameters trainable"
          f"{' (LoRA)' if cfg.lora.enabled else ''}; teacher {d.teacher} ({d.teacher_logits}"
          f"{f', top-{d.top_k}' if d.top_k else ''}), {d.kind} at T={d.temperature}, alpha={d.alpha}"
          f"{f', on-policy {d.on_policy_fraction:.0%}' if d.on_policy_fraction else ''}", file=sys.stderr)
    if d.on_policy_fraction > 0:
        from instructkit.generate import add_end_of_turn_stops

        add_end_of_turn_stops(model, tokenizer)
    dump_config(cfg, out_dir / "config.yaml")
    loss_fn = make_loss_fn(cfg, teacher, tokenizer)

    def batches(epoch: int):  # tag micro-batches so the on-policy draw is the same after a resume
        return [{**b, "_epoch": epoch, "_i": i} for i, b in enumerate(plan.source(epoch))]

    @torch.no_grad()
    def evaluate(m) -> dict[str, float]:
        m.eval()
        kd, n = 0.0, 0
        for b in eval_batches:
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            logits, targets = target_logits(m, b)
            kd += float(teacher.kd_sum(logits, b))
            n += targets.numel()
        return {"eval_loss": mean_nll(m, eval_batches), "eval_kd": kd / max(1, n)}

    # --- train: the shared loop
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=batches, micro_per_epoch=plan.micro_per_epoch, loss_fn=loss_fn,
                        cfg=cfg.train, out_dir=out_dir, eval_fn=evaluate if eval_batches else None,
                        count_fn=count_targets, device=device, run_config=cfg.model_dump(mode="json"),
                        logging_cfg=cfg.logging)
    elapsed = time.perf_counter() - t0

    # --- save
    if result.status == "interrupted":  # the loop has saved a checkpoint and printed how to resume
        return result
    info = {"method": "distill", "base_model": cfg.model.name_or_path, "teacher": d.teacher, "lora": cfg.lora.enabled,
            "distill": d.model_dump(mode="json"), "steps": result.global_step, "train_examples": len(data.train),
            "skipped": len(data.report), "seconds": round(elapsed, 2), "final_metrics": result.final_metrics}
    final = save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info)
    if not is_main_process():  # under torchrun, rank 0 reports and writes the summary
        return result
    if not is_main_process():  # under torchrun, rank 0 reports and writes the summary
        return result
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    fm = result.final_metrics
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, final loss {fm.get('loss', float('nan')):.4f}"
          + (f", eval loss {fm['eval_loss']:.4f}, eval KD {fm['eval_kd']:.4f}" if "eval_loss" in fm else "")
          + f"; saved {final}", file=sys.stderr)
    return result
