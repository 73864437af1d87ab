"""Time and peak memory of `instructkit data dedup` on 1 million short records with planted duplicates.

The generator writes short Alpaca records (instruction of 6-12 words, answer of 18-30 words from a
20,000-word vocabulary) to a temporary file, planting exact duplicates (case, punctuation and spacing
changed) and near duplicates (one answer word replaced, or one word appended) of earlier records.
The dedup command runs in a subprocess; its wall time and peak RSS (``wait4`` rusage of that process)
are measured, and the removal report is checked against the planted truth. With ``--baseline N``,
plain datasketch (``MinHash.bulk`` + ``MinHashLSH``) runs on the first N records for comparison.

Usage:
    python bench/dedup.py                      # 1M records, appends a section to bench/RESULTS.md
    python bench/dedup.py --n 100000 --no-record --baseline 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["Write a short note about {} and {}.", "Explain why {} matters for {}.",
             "List three facts about {} {}.", "Summarize the story of {} and the {}.",
             "Give advice on {} for a {}.", "Translate the phrase {} {} into plain words.",
             "Describe a {} that looks like {}.", "Compare {} with {} in one paragraph."]


def generate(path: Path, n: int, seed: int, p_exact: float, p_near: float) -> dict[int, tuple[str, int]]:
    """Write ``n`` records; return {planted line: (kind, original line)}."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(21000)})[:20000]
    originals: list[tuple[str, str]] = []  # (instruction, output) of clean records, for planting
    truth: dict[int, tuple[str, int]] = {}
    clean_lines: list[int] = []
    with open(path, "w", encoding="utf-8") as fh:
        for line in range(1, n + 1):
            r = rng.random()
            if originals and r < p_exact + p_near:
                k = rng.randrange(len(originals))
                ins, out = originals[k]
                if r < p_exact:
                    rec = {"instruction": ins.upper().replace(".", "!"), "output": "  " + out.replace(" ", "  ", 2)}
                    truth[line] = ("exact", clean_lines[k])
                else:
                    w = out.split()
                    if rng.random() < 0.5:
                        w[rng.randrange(len(w))] = rng.choice(vocab)
                    else:
                        w.append(rng.choice(vocab))
                    rec = {"instruction": ins, "output": " ".join(w)}
                    truth[line] = ("near", clean_lines[k])
            else:
                ins = rng.choice(TEMPLATES).format(*(rng.choice(vocab) for _ in range(2)))
                ins += " " + " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 4)))
                out = " ".join(rng.choice(vocab) for _ in range(rng.randint(18, 30)))
                rec = {"instruction": ins.strip(), "output": out}
                if len(originals) < 200_000:
                    originals.append((rec["instruction"], out))
                    clean_lines.append(line)
            fh.write(json.dumps(rec) + "\n")
    return truth


def run_measured(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds and peak RSS (MB) of one subprocess, from its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    # RUSAGE_CHILDREN holds the largest peak of all reaped children: this is the first child, so it is
    # the dedup process's own peak (the baseline child reports its peak itself).
    import resource

    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kb / 1024, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def baseline_child(path: str, n: int, threshold: float, num_perm: int) -> None:
    """datasketch only: MinHash.bulk + MinHashLSH over the first n records (exact dups by text hash)."""
    import resource

    from datasketch import MinHash, MinHashLSH

    from instructkit.curate.minhash import shingles
    from instructkit.curate.text import normalize_text

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    seen, removed, batch = set(), 0, []

    def flush():
        nonlocal removed
        mhs = MinHash.bulk([[s.encode() for s in shingles(t, 3)] for _, t in batch], num_perm=num_perm)
        for (i, t), m in zip(batch, mhs):
            if hash(t) in seen or lsh.query(m):
                removed += 1
                continue
            seen.add(hash(t))
            lsh.insert(i, m)
        batch.clear()

    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= n:
                break
            r = json.loads(line)
            batch.append((i, normalize_text(r["instruction"] + "\n" + r["output"])))
            if len(batch) == 4096:
                flush()
    flush()
    print(json.dumps({"seconds": time.perf_counter() - t0, "removed": removed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact", type=float, default=0.05, help="fraction of planted exact duplicates")
    p.add_argument("--near", type=float, default=0.05, help="fraction of planted near duplicates")
    p.add_argument("--baseline", type=int, default=0, help="also run plain datasketch on this many records")
    p.add_argument("--baseline-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--work", help="folder for the data (default: a temporary folder, removed after)")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    if a.baseline_child:
        path, n, t, perm = a.baseline_child
        return baseline_child(path, int(n), float(t), int(perm))

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        data = Path(tmp) / "records.jsonl"
        t0 = time.perf_counter()
        truth = generate(data, a.n, a.seed, a.exact, a.near)
        print(f"generated {a.n:,} records ({data.stat().st_size / 2**20:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f}s: {sum(k == 'exact' for k, _ in truth.values()):,} exact and "
              f"{sum(k == 'near' for k, _ in truth.values()):,} near duplicates planted")
        cmd = [sys.executable, "-m", "instructkit", "data", "dedup", str(data), "--out", str(Path(tmp) / "kept.jsonl"),
               "--json"]
        wall, peak, proc = run_measured(cmd)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        res = json.loads(proc.stdout)
        removed = {}
        with open(res["report"], encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                removed[r["line"]] = r
        found = {k: sum(1 for line, (kind, orig) in truth.items() if kind == k and line in removed)
                 for k in ("exact", "near")}
        planted = {k: sum(1 for kind, _ in truth.values() if kind == k) for k in ("exact", "near")}
        false_removals = sum(1 for line in removed if line not in truth)
        print(f"dedup: {wall:.1f}s wall, peak RSS {peak:.0f} MB, kept {res['kept']:,}, removed {res['exact']:,} "
              f"exact + {res['near']:,} near; recall exact {found['exact'] / planted['exact']:.4f}, near "
              f"{found['near'] / planted['near']:.4f}; clean records removed: {false_removals}")
        base = None
        if a.baseline:
            bcmd = [sys.executable, __file__, "--baseline-child", str(data), str(a.baseline), "0.8", "128"]
            bproc = subprocess.run(bcmd, capture_output=True, text=True)
            if bproc.returncode != 0:
                raise SystemExit(bproc.stderr[-3000:])
            base = json.loads(bproc.stdout)
            print(f"datasketch MinHash.bulk + MinHashLSH on {a.baseline:,} records: {base['seconds']:.1f}s, "
                  f"peak RSS {base['peak_rss_mb']:.0f} MB, removed {base['removed']:,}")
    if a.no_record:
        return
    lines = ["", f"## Dedup at scale: `instructkit data dedup` on {a.n:,} short records ({time.strftime('%Y-%m-%d')})",
             "", f"- Command: `python bench/dedup.py --n {a.n}" + (f" --baseline {a.baseline}" if a.baseline else "")
             + "` (generates the data, then runs `python -m instructkit data dedup FILE --out OUT --json` "
             "in a subprocess with the defaults: exact + near, Jaccard >= 0.8, 3-word shingles, 128 "
             "permutations, 14 bands x 9 rows)",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs: load average "
             f"{load:.1f} when the run started), Python {platform.python_version()}; one run",
             f"- Data: {a.n:,} Alpaca records of 24-46 words; planted {planted['exact']:,} exact duplicates (case, "
             f"punctuation, spacing) and {planted['near']:,} near duplicates (one answer word replaced or "
             "appended: true Jaccard 0.76-0.98) of earlier records", "",
             "| measure | value |", "|---|---:|",
             f"| wall time (process start to exit) | {wall:.1f} s |",
             f"| throughput | {a.n / wall:,.0f} records/s |",
             f"| peak RSS of the dedup process | {peak:.0f} MB |",
             f"| kept / removed exact / removed near | {res['kept']:,} / {res['exact']:,} / {res['near']:,} |",
             f"| recall of planted exact duplicates | {found['exact'] / planted['exact']:.2%} |",
             f"| recall of planted near duplicates | {found['near'] / planted['near']:.2%} |",
             f"| clean records removed | {false_removals} |"]
    if base:
        lines += [f"| datasketch MinHash.bulk + MinHashLSH, first {a.baseline:,} records | "
                  f"{base['seconds']:.1f} s, peak RSS {base['peak_rss_mb']:.0f} MB |"]
    lines += ["", "Near-duplicate recall is below 100% by construction: replacing one of ~30 words leaves a true "
              "Jaccard near 0.8, and the MinHash estimate falls on either side of the threshold."]
    with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
