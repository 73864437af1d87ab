"""Reward model with and without the backbone's own likelihood as a prior, on the skills pairs.

Three scorers of the same held-out preference pairs, side by side in one invocation:

- ``logprob``: the SFT model alone, ranking chosen over rejected by the reply's summed (and mean)
  log-probability, no training at all;
- ``head``: ``method: reward`` as the demo ran it before (scalar head on the SFT backbone, Bradley-Terry);
- ``head+logprob``: the same training with ``preference.reward_logprob_coef`` c, so the score is
  head + c x summed reply log-probability.

Each training row is one ``instructkit train`` subprocess with the demo's reward-stage config (written by
``instructkit demo --with reward`` to ``DEMO/reward/config.yaml``) and overrides; accuracy is the run's
final ``eval_accuracy`` on the held-out pairs, which ``instructkit score`` reproduces exactly.

Usage:
    instructkit demo --out runs/demo --with reward      # the SFT backbone, the pairs and the config
    python bench/reward_prior.py --demo runs/demo --seeds 0 1 --coefs 0 0.5 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def logprob_ranking(model_dir: Path, pairs: Path) -> tuple[float, float, dict[str, float]]:
    """Accuracy of ranking each pair by the causal LM's summed and mean reply log-prob, and per family."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.config import DataConfig
    from instructkit.data.pairs import load_pair_data, plan_pair_batches
    from instructkit.data.templates import resolve_template
    from instructkit.models import unit_logps

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = load_pair_data(DataConfig(train=str(pairs), max_length=256), tok, resolve_template(tok, "auto"), seed=0)
    sums: dict[int, list[float]] = {}
    means: dict[int, list[float]] = {}
    for batch in plan_pair_batches(data, split="train", packing=False, micro_batch_size=32, max_length=256,
                                   pad_id=tok.pad_token_id, seed=0, shuffle=False).source(0):
        with torch.no_grad():
            s, c = unit_logps(model, batch)
        for u, si, ci in zip(batch["units"].tolist(), s.tolist(), c.tolist()):
            sums[u], means[u] = si, [si[0] / ci[0], si[1] / ci[1]]
    records = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    family: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for u, (chosen, rejected) in sums.items():
        hits = family[records[u].get("family", "all")]
        hits[0] += chosen > rejected
        hits[1] += 1
    n = len(sums)
    return (sum(c > r for c, r in sums.values()) / n, sum(c > r for c, r in means.values()) / n,
            {f: a / t for f, (a, t) in sorted(family.items())})


def train_reward(config: Path, out: Path, seed: int, coef: float) -> tuple[float, float]:
    """One reward run of the demo's config; returns (held-out pairwise accuracy, seconds)."""
    cmd = [sys.executable, "-m", "instructkit", "train", str(config), f"output_dir={out}", f"seed={seed}",
           f"preference.reward_logprob_coef={coef}", "train.progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=ROOT / "runs/demo", help="an `instructkit demo --with reward` folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--coefs", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench/out/reward_prior")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    config, pairs = args.demo / "reward/config.yaml", args.demo / "data/preference_validation.jsonl"
    sft = args.demo / "sft-full/final"
    for needed in (config, pairs, sft):
        if not needed.exists():
            sys.exit(f"{needed} is missing: run `instructkit demo --out {args.demo} --with reward` first")

    lp_sum, lp_mean, per_family = logprob_ranking(sft, pairs)
    print(f"SFT model's own log-prob: sum {lp_sum:.1%}, mean {lp_mean:.1%}")
    rows = []
    for coef in args.coefs:
        for seed in args.seeds:
            acc, secs = train_reward(config, args.work / f"c{coef:g}-s{seed}", seed, coef)
            print(f"coef {coef:g} seed {seed}: {acc:.1%} ({secs:.0f} s)")
            rows.append((coef, seed, acc, secs))
    if args.no_record:
        return

    import torch

    lines = [f"\n## Reward model: the backbone's own likelihood as a prior ({date.today().isoformat()})\n",
             f"- Command: `python bench/reward_prior.py --demo {args.demo} --seeds "
             f"{' '.join(map(str, args.seeds))} --coefs {' '.join(f'{c:g}' for c in args.coefs)}`",
             f"- Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"- Held-out: {pairs} ({sum(1 for _ in pairs.open())} pairs); backbone {sft}; each training row is "
             "the demo's reward stage (1 epoch, lr 3e-4) with the coefficient set.\n",
             "| scorer | seed | held-out pairwise accuracy | train time |", "|---|---:|---:|---:|",
             f"| SFT model's summed reply log-prob, no training | | {lp_sum:.1%} | |",
             f"| SFT model's mean reply log-prob, no training | | {lp_mean:.1%} | |"]
    for coef, seed, acc, secs in rows:
        name = "scalar head (`reward_logprob_coef` 0)" if coef == 0 else f"head + {coef:g} x reply log-prob"
        lines.append(f"| {name} | {seed} | {acc:.1%} | {secs:.0f} s |")
    for coef in args.coefs:
        accs = [a for c, _, a, _ in rows if c == coef]
        lines.append(f"\nMedian over seeds, coef {coef:g}: {statistics.median(accs):.1%}.")
    lines.append("\nLog-prob ranking per family: " + ", ".join(f"{f} {a:.0%}" for f, a in per_family.items()))
    with (ROOT / "bench/RESULTS.md").open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
