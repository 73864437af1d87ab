"""Self-Instruct's ROUGE-L pool check: instructions screened per second at pools of 1k and 10k.

instructkit's :class:`RougePool` (inverted-index upper bound + bit-parallel exact LCS, branch and
bound) against the peer: the reference implementation's loop, ``rouge_score``'s
``RougeScorer(["rougeL"]).score`` for every pool entry (single process; the reference spreads the
same loop over a process pool, which divides its time by the worker count at best). Both return the
maximum ROUGE-L F; the script checks they agree on every query the peer scores.

Pool texts: the 175 Self-Instruct seeds and the 252 user-oriented instructions from ../shared/data,
then synthetic instructions sampled from their vocabulary with their length distribution (and 30%
near copies of earlier entries, so the 0.7 threshold is really exercised). Queries are drawn the
same way. Median of ``--runs`` timings.

    .venv/bin/python bench/self_instruct_rouge.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "self_instruct"

from instructkit.synth.rouge import RougePool  # noqa: E402


def corpus(n: int, seed: int) -> list[str]:
    base = [json.loads(x)["instruction"] for f in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl")
            for x in (DATA / f).read_text().splitlines()]
    words = " ".join(base).split()
    lengths = [len(b.split()) for b in base]
    rng = random.Random(seed)
    out = list(base)
    while len(out) < n:
        if rng.random() < 0.3:
            w = rng.choice(out).split()
            for _ in range(rng.randint(1, 4)):
                w[rng.randrange(len(w))] = rng.choice(words)
            out.append(" ".join(w))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.choice(lengths))))
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=500, help="queries for instructkit per pool size")
    ap.add_argument("--peer-queries", type=int, default=20, help="queries for rouge_score (slow) per pool size")
    args = ap.parse_args()
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rows = []
    for n in (1000, 10000):
        texts = corpus(n, seed=0)
        queries = corpus(n + args.queries, seed=1)[-args.queries:]
        t = time.perf_counter()
        pool = RougePool(texts)
        build = time.perf_counter() - t
        ours, peer = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            got = [pool.max_similarity(q)[0] for q in queries]
            ours.append(len(queries) / (time.perf_counter() - t))
            t = time.perf_counter()
            ref = [max(scorer.score(q, x)["rougeL"].fmeasure for x in texts) for q in queries[:args.peer_queries]]
            peer.append(args.peer_queries / (time.perf_counter() - t))
            assert got[:args.peer_queries] == ref, "instructkit and rouge_score disagree"
        dropped = sum(g > 0.7 for g in got)
        row = {"pool": n, "instructkit_per_s": statistics.median(ours), "rouge_score_per_s": statistics.median(peer),
               "build_s": build, "queries_over_0.7": f"{dropped}/{len(got)}"}
        row["speedup"] = row["instructkit_per_s"] / row["rouge_score_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    print("| pool | instructkit (instructions/s) | rouge_score loop (instructions/s) | speedup | pool build | queries > 0.7 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pool']:,} | {r['instructkit_per_s']:,.0f} | {r['rouge_score_per_s']:,.2f} | "
              f"{r['speedup']:,.0f}x | {r['build_s']:.2f}s | {r['queries_over_0.7']} |")


if __name__ == "__main__":
    main()
