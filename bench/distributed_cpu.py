"""Tokens/s of the same SFT run with 1 process vs 2 processes (DDP, FSDP2) on this machine's CPU.

Every variant trains on the same global batch (1 process x grad_accum 2 = 2 processes x 1), so the
losses must agree; the table shows that next to the throughput. On a 2-core CPU, expect little or
no speed-up: this checks correctness and overhead, not scaling.

Usage:
    python bench/distributed_cpu.py --runs 3 --steps 30        # prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [  # name, processes, threads per process, extra overrides
    ("1 process, 1 thread", 1, 1, ["train.grad_accum=2"]),
    ("1 process, 2 threads", 1, 2, ["train.grad_accum=2"]),
    ("2 processes DDP, 1 thread each", 2, 1, ["train.grad_accum=1"]),
    ("2 processes FSDP2, 1 thread each", 2, 1, ["train.grad_accum=1", "distributed.strategy=fsdp2"]),
]


def prepare(work: Path, preset: str) -> Path:
    from instructkit.synth.toy import write_toy_dataset
    from instructkit.tiny_model import build_tiny_model

    model = work / f"model-{preset}"
    if not (model / "config.json").exists():
        build_tiny_model(model, preset=preset, seed=0)
    toy = work / "toy"
    if not (toy / "train.jsonl").exists():
        write_toy_dataset(toy, n_train=1200, n_eval=8, seed=0)
    cfg = {"method": "sft", "seed": 0, "output_dir": str(work / "run"),
           "model": {"name_or_path": str(model)},
           "data": {"train": str(toy / "train.jsonl"), "max_length": 512, "packing": True},
           "train": {"micro_batch_size": 4, "lr": 1e-3, "progress": False, "bf16": False}}
    path = work / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg: Path, out: Path, nproc: int, threads: int, extra: list[str], steps: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    args = ["train", str(cfg), f"output_dir={out}", f"train.max_steps={steps}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "instructkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "instructkit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    steady = [r["target_tokens_per_s"] for r in recs[2:]]  # the first steps include warm-up
    return {"tok_s": statistics.median(steady), "train_s": json.loads((out / "summary.json").read_text())["seconds"],
            "wall_s": wall, "losses": [r["loss"] for r in recs]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "bench/out/distributed_cpu"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--preset", default="micro")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = prepare(work, a.preset)
    results: dict[str, list[dict]] = {v[0]: [] for v in VARIANTS}
    for i in range(a.runs):  # interleaved, so load changes on a shared machine hit every variant
        for name, nproc, threads, extra in VARIANTS:
            results[name].append(run(cfg, work / f"run-{nproc}-{threads}-{len(extra)}", nproc, threads, extra, a.steps))
            print(f"run {i + 1} {name}: {results[name][-1]['tok_s']:.0f} target tokens/s", file=sys.stderr)
    ref = results[VARIANTS[0][0]][0]["losses"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; {a.preset} model, {a.steps} steps, global batch "
          f"2 micro-batches of 4 packed rows of 512 tokens; median of {a.runs} runs\n")
    print("| variant | target tokens/s (median of steady steps) | train seconds | wall seconds (incl. start) "
          "| max abs loss diff vs 1 process |")
    print("|---|---|---|---|---|")
    for name, *_ in VARIANTS:
        rs = results[name]
        diff = max(abs(x - y) for r in rs for x, y in zip(r["losses"], ref))
        print(f"| {name} | {statistics.median(r['tok_s'] for r in rs):.0f} | "
              f"{statistics.median(r['train_s'] for r in rs):.1f} | {statistics.median(r['wall_s'] for r in rs):.1f} "
              f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
