"""instructkit SFT vs TRL SFTTrainer (padded and packed), same model, data and optimiser, on this CPU.

Each (tool, run) trains in its own subprocess so peak resident memory is measured cleanly. All
modes start from identical weights, see the same 2,000+ conversations for one epoch, use AdamW with
the same lr/betas/eps/weight decay, constant LR, clipping at 1.0, and train only assistant tokens.
Afterwards every trained model is scored by the same function (token-mean NLL on the assistant
tokens of a held-out set), so "loss at equal tokens" compares like with like.

Usage:
    python bench/sft_vs_trl.py --runs 3               # appends a section to bench/RESULTS.md
    python bench/sft_vs_trl.py --runs 1 --n 300 --no-record   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("instructkit", "trl_padded", "trl_packed")


# ---------------------------------------------------------------------------------------------- setup


def prepare(work: Path, n: int, preset: str, seed: int) -> dict:
    from instructkit.synth.toy import write_toy_dataset
    from instructkit.tiny_model import build_tiny_model

    model_dir = work / f"model-{preset}"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, preset=preset, seed=seed)
    data_dir = write_toy_dataset(work / "data", n_train=n, n_eval=200, seed=seed)
    return {"model": str(model_dir), "train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl")}


def measure_matmul_peak(seconds: float = 2.0, n: int = 1024) -> float:
    """Sustained fp32 matmul FLOP/s on this machine (the denominator of MFU)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- workers


def common_eval_nll(model, tokenizer, eval_path: str, max_length: int) -> float:
    """Token-mean NLL on assistant tokens of the eval set, identical for every mode."""
    import torch

    from instructkit.data.encode import encode_messages
    from instructkit.data.formats import load_examples
    from instructkit.models import mean_nll

    batches = []
    for r in load_examples([eval_path], kind="sft"):
        e = encode_messages(tokenizer, r["messages"], template=tokenizer.chat_template,
                            max_length=max_length, truncation="right")
        batches.append({"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])})
    return mean_nll(model, batches)


def count_target_tokens(tokenizer, train_path: str, max_length: int) -> tuple[int, int, int]:
    from instructkit.data.encode import encode_messages
    from instructkit.data.formats import load_examples

    recs = load_examples([train_path], kind="sft")
    enc = [encode_messages(tokenizer, r["messages"], template=tokenizer.chat_template,
                           max_length=max_length, truncation="right") for r in recs]
    return sum(e.n_targets for e in enc), sum(len(e.input_ids) for e in enc), len(enc)


def worker_instructkit(a) -> dict:
    from instructkit.config import load_config
    from instructkit.methods import sft
    from instructkit.models import load_tokenizer

    out = Path(a.out)
    cfg = load_config(raw={
        "method": "sft", "seed": a.seed, "output_dir": str(out),
        "model": {"name_or_path": a.model},
        "data": {"train": a.train, "max_length": a.max_length, "packing": True, "truncation": "right"},
        "train": {"epochs": 1, "micro_batch_size": a.batch, "lr": a.lr, "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "progress": False},
    })
    t0 = time.perf_counter()
    sft.main(cfg)
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Time of the shared loop (batch collation included, model load and final save excluded),
    # the same span that trainer.train() covers for TRL.
    train_s = json.loads((out / "summary.json").read_text())["seconds"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = load_tokenizer(cfg.model)
    return {"train_seconds": train_s, "wall_seconds": wall, "steps": len(metrics),
            "target_tokens": metrics[-1]["tokens_seen"],
            "eval_nll": common_eval_nll(model, tok, a.eval, a.max_length)}


def worker_trl(a, packed: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(x) for x in Path(a.train).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    args = SFTConfig(
        output_dir=a.out, num_train_epochs=1, per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_length=a.max_length, packing=packed, assistant_only_loss=True,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000, seed=a.seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    tt, _, _ = count_target_tokens(tok, a.train, a.max_length)
    return {"train_seconds": train_s, "wall_seconds": train_s, "steps": trainer.state.global_step,
            "target_tokens": tt, "eval_nll": common_eval_nll(model, tok, a.eval, a.max_length)}


def run_worker(a) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    if a.worker == "instructkit":
        res = worker_instructkit(a)
    else:
        res = worker_trl(a, packed=a.worker == "trl_packed")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["target_tokens_per_s"] = res["target_tokens"] / res["train_seconds"]
    Path(a.result).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--n", type=int, default=2000, help="training conversations")
    p.add_argument("--preset", default="micro")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="rows (packed) per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "bench/out/sft"))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-record", action="store_true")
    # internal
    p.add_argument("--worker")
    p.add_argument("--model")
    p.add_argument("--train")
    p.add_argument("--eval")
    p.add_argument("--out")
    p.add_argument("--result")
    a = p.parse_args()
    if a.worker:
        return run_worker(a)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, a.n, a.preset, a.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["model"])
    targets, tokens, n_ex = count_target_tokens(tok, paths["train"], a.max_length)
    m = AutoModelForCausalLM.from_pretrained(paths["model"])
    n_params = sum(q.numel() for q in m.parameters())
    head = m.get_output_embeddings().weight.numel()
    del m
    # Padded TRL gets the same number of optimizer steps as the packed modes: the batch size in
    # examples that matches 8 packed rows of max_length tokens.
    from instructkit.data.packing import pack_best_fit_decreasing
    from instructkit.data.encode import encode_messages
    from instructkit.data.formats import load_examples

    lens = [len(encode_messages(tok, r["messages"], template=tok.chat_template, max_length=a.max_length,
                                truncation="right").input_ids) for r in load_examples([paths["train"]])]
    n_rows = len(pack_best_fit_decreasing(lens, a.max_length))
    padded_batch = max(1, round(a.batch * n_ex / n_rows))
    peak = measure_matmul_peak()
    print(f"model {a.preset}: {n_params:,} params; data: {n_ex} conversations, {tokens} tokens, "
          f"{targets} target tokens, {n_rows} packed rows; matmul peak {peak / 1e9:.1f} GFLOP/s")

    results: dict[str, list[dict]] = {m: [] for m in a.modes.split(",")}
    for r in range(a.runs):
        for mode in results:
            out = work / f"{mode}-run{r}"
            res_file = work / f"{mode}-run{r}.json"
            batch = padded_batch if mode == "trl_padded" else a.batch
            cmd = [sys.executable, __file__, "--worker", mode, "--model", paths["model"], "--train",
                   paths["train"], "--eval", paths["eval"], "--out", str(out), "--result", str(res_file),
                   "--max-length", str(a.max_length), "--batch", str(batch), "--lr", str(a.lr),
                   "--seed", str(a.seed)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:])
                raise SystemExit(f"{mode} run {r} failed")
            res = json.loads(res_file.read_text())
            results[mode].append(res)
            print(f"run {r} {mode:12s} {res['target_tokens_per_s']:9.0f} target tok/s  "
                  f"peak {res['peak_rss_mb']:7.0f} MB  eval NLL {res['eval_nll']:.4f}  "
                  f"steps {res['steps']}  ({time.perf_counter() - t0:.0f}s)")

    # Useful FLOPs per trained epoch: 6 x non-embedding params per input token (forward+backward)
    # plus 6 x head params per target token; identical for every mode, so MFU ranks them fairly.
    flops_epoch = 6 * (n_params - head) * tokens + 6 * head * targets
    summary = {}
    for mode, rs in results.items():
        med = {k: statistics.median(x[k] for x in rs)
               for k in ("target_tokens_per_s", "peak_rss_mb", "eval_nll", "train_seconds", "steps")}
        med["mfu"] = flops_epoch / med["train_seconds"] / peak
        summary[mode] = med
    trl_best = max((m for m in summary if m.startswith("trl")), key=lambda m: summary[m]["target_tokens_per_s"],
                   default=None)
    lines = ["", f"## SFT throughput: instructkit vs TRL SFTTrainer ({time.strftime('%Y-%m-%d')})", "",
             f"- Command: `python bench/sft_vs_trl.py --runs {a.runs} --n {a.n} --preset {a.preset} "
             f"--max-length {a.max_length} --batch {a.batch}`",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{__import__('torch').__version__}, transformers {__import__('transformers').__version__}, "
             f"trl {__import__('trl').__version__}; matmul peak {peak / 1e9:.1f} GFLOP/s (fp32, measured)",
             f"- Model: tiny `{a.preset}` Llama ({n_params:,} params), identical initial weights; data: "
             f"{n_ex} toy conversations (1-3 turns), {tokens:,} tokens, {targets:,} assistant target tokens; "
             f"1 epoch, AdamW lr {a.lr} constant, clip 1.0, fp32. Packed modes: {a.batch} rows x "
             f"{a.max_length} per step; TRL padded: {padded_batch} examples per step (same step count).",
             f"- Median of {a.runs} runs each, all modes in the same invocation.", "",
             "| mode | target tok/s | instructkit speed-up over this mode | peak RSS (MB) | held-out NLL after 1 epoch | steps | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    ik = summary.get("instructkit")
    for mode, s in summary.items():
        ratio = (ik["target_tokens_per_s"] / s["target_tokens_per_s"]) if ik else float("nan")
        lines.append(f"| {mode} | {s['target_tokens_per_s']:.0f} | {ratio:.2f}x | {s['peak_rss_mb']:.0f} | "
                     f"{s['eval_nll']:.4f} | {s['steps']:.0f} | {s['mfu']:.1%} |")
    if ik and trl_best:
        lines.append("")
        lines.append(f"instructkit vs TRL's best mode ({trl_best}): "
                     f"{ik['target_tokens_per_s'] / summary[trl_best]['target_tokens_per_s']:.2f}x target tokens/s, "
                     f"peak memory {ik['peak_rss_mb']:.0f} vs {summary[trl_best]['peak_rss_mb']:.0f} MB, "
                     f"held-out NLL {ik['eval_nll']:.4f} vs {summary[trl_best]['eval_nll']:.4f}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_record:
        res_md = ROOT / "bench/RESULTS.md"
        if not res_md.exists():
            res_md.write_text("# Benchmark results\n\nAppended by the scripts in bench/. Newest last.\n")
        with open(res_md, "a", encoding="utf-8") as f:
            f.write(text)
    if not all(math.isfinite(s["eval_nll"]) for s in summary.values()):
        raise SystemExit("a mode produced a non-finite loss")


if __name__ == "__main__":
    main()
