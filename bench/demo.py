"""Time `instructkit demo` end to end (cold base, cached base, --quick) and record its numbers.

Usage:
    python bench/demo.py                 # cold + cached runs, appends to bench/RESULTS.md
    python bench/demo.py --only cached   # reuse the cache left by a previous run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, cache: Path, quick: bool) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "instructkit", "demo", "--out", str(out), "--cache", str(cache)]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        raise SystemExit(f"demo failed: {' '.join(cmd)}")
    return wall, json.loads((out / "demo.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "bench/out/demo"))
    p.add_argument("--only", choices=["cold", "cached", "quick"])
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    work = Path(a.work)
    cache = work / "cache"
    rows = []
    # --quick reuses a full base when the cache has one, so its cold run gets a cache of its own.
    plan = [("cold", False), ("cached", False), ("quick (cold: builds its own base)", True)]
    if a.only:
        plan = [x for x in plan if x[0].startswith(a.only)]
    for name, quick in plan:
        run_cache = work / "cache-quick" if quick else cache
        if name != "cached" and run_cache.exists():
            shutil.rmtree(run_cache)
        wall, summary = run(work / name.split()[0], run_cache, quick)
        rows.append((name, wall, summary))
        acc = {m: {s: v["accuracy"] for s, v in r["splits"].items()} for m, r in summary["results"].items()}
        print(f"{name}: {wall:.0f}s  {json.dumps(acc)}")
    lines = ["", f"## `instructkit demo` end to end ({time.strftime('%Y-%m-%d')})", "",
             "- Command: `python bench/demo.py` (each row is one `instructkit demo` run in a subprocess)",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}",
             "", "| run | wall time (s) | predicted (s) | epochs: pretraining, SFT | model | train | validation | "
             "heldout_phrasing | heldout_family | stops on its own | corpus NLL |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, wall, summary in rows:
        plan, ep = summary.get("plan") or {}, summary["epochs"]
        sized = f"{ep['pretrain']:g}{'' if plan.get('pretrain_epochs') is not None else ' (cached)'}, {ep['sft']:g}"
        for model, r in summary["results"].items():
            sp = r["splits"]
            lines.append(f"| {name} | {wall:.0f} | {plan.get('predicted_total_s', float('nan')):.0f} | {sized} | {model} | "
                         + " | ".join(
                f"{sp[s]['accuracy']:.1%}" for s in ("train", "validation", "heldout_phrasing", "heldout_family"))
                + f" | {sp['validation']['stop_rate']:.0%} | {r.get('corpus_nll', float('nan')):.3f} |")
    stage = rows[0][2]["times"]
    lines += ["", "Stage times of the first run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage.items())]
    measured = (rows[0][2].get("plan") or {}).get("measured")
    if measured:
        lines += [f"Measured by the first run before training: a pretraining step {measured['pretrain_step_s']:.3f} s "
                  f"({measured['pretrain_steps_per_epoch']} per epoch), an SFT step {measured['sft_step_s']:.3f} s "
                  f"({measured['sft_steps_per_epoch']} per epoch)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_record:
        with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
