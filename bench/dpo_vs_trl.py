"""instructkit DPO vs TRL DPOTrainer: same tiny model, same pairs, same settings, on this CPU.

Every (mode, run) trains in its own subprocess so peak resident memory is measured cleanly. All modes
start from identical weights, train one epoch on the skills curriculum's preference pairs with
DPO (sigmoid, beta 0.1), AdamW with the same lr/betas/eps, constant LR, clipping at 1.0, fp32, the
same number of pairs per optimizer step. Throughput is end to end: from the start of data loading
to the end of training, reference log-probs included (instructkit precomputes them into an empty
cache each run; TRL keeps a reference model and runs it every step by default, or precomputes with
``precompute_ref_log_probs``). Afterwards every trained model is scored by the same function on the
same held-out pairs (DPO loss against the initial model, and preference accuracy), and the training
loss curves are compared in 10 bins.

Usage:
    python bench/dpo_vs_trl.py --runs 3                 # appends a section to bench/RESULTS.md
    python bench/dpo_vs_trl.py --runs 1 --n 200 --no-record   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("instructkit", "instructkit_padded", "trl", "trl_precompute")
BETA = 0.1


def prepare(work: Path, n: int, n_eval: int, preset: str, seed: int) -> dict:
    from instructkit.synth.skills import write_skills
    from instructkit.tiny_model import build_tiny_model

    model_dir = work / f"model-{preset}"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, preset=preset, seed=seed)
    data = write_skills(work / "skills", seed=seed, n_train=n, n_val=n_eval, n_heldout_phrasing=31,
                        n_heldout_family=8, n_corpus=100)
    return {"model": str(model_dir), "train": str(data / "preference.jsonl"),
            "eval": str(data / "preference_validation.jsonl")}


def heldout_scores(model_dir: str, init_dir: str, eval_path: str, max_length: int) -> dict:
    """DPO loss and accuracy of ``model_dir`` against ``init_dir`` on held-out pairs (same code for all)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.config import DataConfig
    from instructkit.data.pairs import load_pair_data, plan_pair_batches
    from instructkit.losses import dpo_loss
    from instructkit.models import unit_logps

    tok = AutoTokenizer.from_pretrained(init_dir)
    data = load_pair_data(DataConfig(train=eval_path, max_length=max_length), tok, tok.chat_template, seed=0)
    batches = plan_pair_batches(data, split="train", packing=False, micro_batch_size=16, max_length=max_length,
                                pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                seed=0, shuffle=False).source(0)
    pol = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(init_dir).eval()
    losses, right = [], 0
    with torch.no_grad():
        for b in batches:
            p, _ = unit_logps(pol, b)
            r, _ = unit_logps(ref, b)
            losses.extend(dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], BETA).tolist())
            right += int(((p[:, 0] - r[:, 0]) > (p[:, 1] - r[:, 1])).sum())
    return {"eval_dpo_loss": sum(losses) / len(losses), "eval_accuracy": right / len(losses)}


def worker_instructkit(a, packed: bool) -> dict:
    from instructkit.config import load_config
    from instructkit.methods import preference

    out = Path(a.out)
    cache = out.parent / f"{out.name}-refcache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = load_config(raw={
        "method": "dpo", "seed": a.seed, "output_dir": str(out),
        "model": {"name_or_path": a.model},
        "data": {"train": a.train, "max_length": a.max_length, "packing": packed},
        "train": {"epochs": 1, "micro_batch_size": a.batch, "lr": a.lr, "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "progress": False},
        "preference": {"beta": BETA, "reference": "precompute", "reference_cache": str(cache)},
    })
    t0 = time.perf_counter()
    preference.main(cfg)
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"seconds": wall, "steps": len(metrics), "pairs": metrics[-1]["tokens_seen"],
            "losses": [m["loss"] for m in metrics], "final": str(out / "final")}


def worker_trl(a, precompute: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(x) for x in Path(a.train).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                      "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = DPOConfig(
        output_dir=a.out, num_train_epochs=1, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, beta=BETA, loss_type=["sigmoid"],
        max_length=a.max_length, precompute_ref_log_probs=precompute, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, seed=a.seed, dataloader_num_workers=0, disable_tqdm=True,
        bf16=False,  # DPOConfig defaults to bf16 autocast; instructkit runs fp32 here, so TRL must too
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final = Path(a.out) / "final"
    trainer.model.save_pretrained(final)
    return {"seconds": wall, "steps": trainer.state.global_step, "pairs": len(rows), "losses": losses,
            "final": str(final)}


def run_worker(a) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    if a.worker.startswith("instructkit"):
        res = worker_instructkit(a, packed=a.worker == "instructkit")
    else:
        res = worker_trl(a, precompute=a.worker == "trl_precompute")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["pairs_per_s"] = res["pairs"] / res["seconds"]
    Path(a.result).write_text(json.dumps(res))


def binned(losses: list[float], bins: int = 10) -> list[float]:
    n = len(losses)
    return [statistics.fmean(losses[i * n // bins:max(i * n // bins + 1, (i + 1) * n // bins)]) for i in range(bins)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--n", type=int, default=2000, help="training pairs")
    p.add_argument("--n-eval", type=int, default=300, help="held-out pairs")
    p.add_argument("--preset", default="micro")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "bench/out/dpo"))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-record", action="store_true")
    # internal
    for k in ("--worker", "--model", "--train", "--out", "--result"):
        p.add_argument(k)
    a = p.parse_args()
    if a.worker:
        return run_worker(a)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, a.n, a.n_eval, a.preset, a.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.config import DataConfig
    from instructkit.data.pairs import load_pair_data, plan_pair_batches

    tok = AutoTokenizer.from_pretrained(paths["model"])
    n_params = sum(q.numel() for q in AutoModelForCausalLM.from_pretrained(paths["model"]).parameters())
    data = load_pair_data(DataConfig(train=paths["train"], max_length=a.max_length), tok, tok.chat_template, seed=0)
    tokens = sum(len(s.input_ids) for s in data.sequences)
    # Packed rows per step chosen so a packed step holds about as many pairs as the padded modes.
    plan = plan_pair_batches(data, split="train", packing=True, micro_batch_size=1, max_length=a.max_length,
                             pad_id=tok.eos_token_id, seed=0, shuffle=False)
    rows = plan.micro_per_epoch
    packed_rows = max(1, round(a.batch * rows / data.n_train))
    print(f"model {a.preset}: {n_params:,} params; {data.n_train} pairs, {tokens:,} tokens; "
          f"{rows} packed rows -> {packed_rows} rows per packed step")

    results: dict[str, list[dict]] = {m: [] for m in a.modes.split(",")}
    for r in range(a.runs):
        for mode in results:
            out = work / f"{mode}-run{r}"
            res_file = work / f"{mode}-run{r}.json"
            batch = packed_rows if mode == "instructkit" else a.batch
            cmd = [sys.executable, __file__, "--worker", mode, "--model", paths["model"], "--train", paths["train"],
                   "--out", str(out), "--result", str(res_file), "--max-length", str(a.max_length),
                   "--batch", str(batch), "--lr", str(a.lr), "--seed", str(a.seed)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:])
                raise SystemExit(f"{mode} run {r} failed")
            res = json.loads(res_file.read_text())
            res.update(heldout_scores(res["final"], paths["model"], paths["eval"], a.max_length))
            res["load_avg"] = os.getloadavg()[0]
            results[mode].append(res)
            print(f"run {r} {mode:18s} load {res['load_avg']:.1f} {res['pairs_per_s']:7.1f} pairs/s  peak {res['peak_rss_mb']:6.0f} MB  "
                  f"held-out DPO loss {res['eval_dpo_loss']:.4f} acc {res['eval_accuracy']:.1%}  "
                  f"steps {res['steps']}  ({time.perf_counter() - t0:.0f}s)")

    summary = {}
    for mode, rs in results.items():
        med = {k: statistics.median(x[k] for x in rs)
               for k in ("pairs_per_s", "peak_rss_mb", "eval_dpo_loss", "eval_accuracy", "seconds", "steps")}
        med["curve"] = binned(rs[0]["losses"])
        summary[mode] = med
    lines = ["", f"## DPO: instructkit vs TRL DPOTrainer ({time.strftime('%Y-%m-%d')})", "",
             f"- Command: `python bench/dpo_vs_trl.py --runs {a.runs} --n {a.n} --preset {a.preset} "
             f"--max-length {a.max_length} --batch {a.batch} --lr {a.lr}`",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}, "
             f"transformers {__import__('transformers').__version__}, trl {__import__('trl').__version__}",
             f"- Model: tiny `{a.preset}` Llama ({n_params:,} params), identical initial weights; data: {data.n_train} "
             f"skills preference pairs ({tokens:,} tokens incl. both sides); 1 epoch, DPO sigmoid beta {BETA}, AdamW lr "
             f"{a.lr} constant, clip 1.0, fp32, {a.batch} pairs per step (instructkit packed: {packed_rows} rows of "
             f"2x{a.max_length} tokens per step, about the same pairs per step).",
             "- Time is end to end (data preparation, reference log-probs, training), median of "
             f"{a.runs} runs, all modes interleaved in one invocation (1-minute load average during the runs: "
             f"{min(x['load_avg'] for rs in results.values() for x in rs):.1f}-"
             f"{max(x['load_avg'] for rs in results.values() for x in rs):.1f} on {os.cpu_count()} cores). Held-out: the same {a.n_eval}-pair split scored by the same "
             "function for every mode (DPO loss against the initial model, preference accuracy).", "",
             "| mode | pairs/s | instructkit speed-up over this mode | peak RSS (MB) | held-out DPO loss | held-out accuracy | steps |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    ik = summary.get("instructkit")
    for mode, s in summary.items():
        ratio = ik["pairs_per_s"] / s["pairs_per_s"] if ik else float("nan")
        lines.append(f"| {mode} | {s['pairs_per_s']:.1f} | {ratio:.2f}x | {s['peak_rss_mb']:.0f} | "
                     f"{s['eval_dpo_loss']:.4f} | {s['eval_accuracy']:.1%} | {s['steps']:.0f} |")
    lines += ["", "Training loss, mean of each tenth of the epoch (run 0):", "",
              "| mode | " + " | ".join(f"{10 * i}-{10 * (i + 1)}%" for i in range(10)) + " |",
              "|---|" + "---:|" * 10]
    for mode, s in summary.items():
        lines.append(f"| {mode} | " + " | ".join(f"{v:.3f}" for v in s["curve"]) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_record:
        with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
