"""Sequence-level distillation data (Kim & Rush 2016): a teacher answers a prompt set, the answers become SFT data.

The teacher is a local model folder or an OpenAI-compatible endpoint (see
:mod:`instructkit.synth.generators`). Prompts are records with ``messages`` (cut before the final
assistant reply, so an SFT file works as a prompt file) or ``prompt``. Each answer passes filters,
in order, each counted: the request failed after retries (retried on the next run, not recorded),
the reply is empty, it hit the token limit (``truncated``; kept with ``keep_truncated``), it repeats
the prompt (``echo``), or an optional verifier scores it <= 0 (``verifier``, e.g. the skills
verifier: only correct teacher answers are distilled).

Outputs: ``OUT`` (messages JSONL: the prompt plus the teacher's reply, the prompt record's other
fields, and ``provenance``: teacher, source file and line, sampling, finish reason, verifier score),
``OUT.rejected.jsonl`` (each filtered prompt and why), ``OUT.meta.json`` (what produced the file) and
``OUT.summary.json``. Re-running the same command skips every prompt already answered or rejected,
so an interrupted run resumes without duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from instructkit.synth.best_of_n import read_prompts
from instructkit.synth.generators import Generator, Sampling


class DistillDataError(RuntimeError):
    """The output belongs to a different teacher, prompt file or sampling setup."""


def _clean_complete_lines(path: Path) -> list[dict]:
    """Records of ``path``, dropping a trailing partial line (a kill mid-write) from the file too."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete, _, partial = raw.rpartition(b"\n")
    if partial:
        with open(path, "wb") as f:
            f.write(complete + b"\n" if complete else b"")
    return [json.loads(x) for x in complete.split(b"\n") if x.strip()] if complete else []


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())


def distill_data(generator: Generator, prompts: str | Path, out: str | Path, *, sampling: Sampling,
                 limit: int | None = None, keep_truncated: bool = False, scorer=None, scorer_name: str | None = None,
                 chunk: int = 64, log=None) -> dict:
    """Answer every prompt with the teacher, filter, write SFT records; resumable. Returns the summary.

    Args:
        generator: The teacher.
        prompts: Prompt file (``messages`` or ``prompt`` per record).
        out: Output JSONL.
        sampling: Teacher sampling (greedy by default at the CLI).
        limit: The first N prompts only.
        keep_truncated: Keep replies cut at ``sampling.max_tokens``.
        scorer: Optional ``scorer(records, texts) -> scores``; replies scoring <= 0 are rejected.
        chunk: Prompts per generation batch (and per commit).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rej_path, meta_path = Path(str(out) + ".rejected.jsonl"), Path(str(out) + ".meta.json")
    records = read_prompts(prompts, limit)
    identity = {"teacher": generator.name, "prompts": str(Path(prompts).resolve()),
                "prompts_sha256": hashlib.sha256(Path(prompts).read_bytes()).hexdigest(),
                "sampling": asdict(sampling), "keep_truncated": keep_truncated, "scorer": scorer_name}
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise DistillDataError(f"{out} was written with a different {', '.join(diff)}; re-run with the same "
                                   f"teacher, prompts and options, or choose another --out")
    elif out.exists() and out.stat().st_size:
        raise DistillDataError(f"{out} exists and was not written by `synth distill-data` (no {meta_path.name}); "
                               f"choose another --out or delete it")
    else:
        meta_path.write_text(json.dumps(identity, indent=2), encoding="utf-8")
    done = {r["provenance"]["source_line"] for r in _clean_complete_lines(out)}
    rejected_before = _clean_complete_lines(rej_path)
    done |= {r["source_line"] for r in rejected_before}
    counts = Counter()
    todo = [r for r in records if r["_line"] not in done]
    if done:
        log(f"resuming {out}: {len(done)} of {len(records)} prompts already answered or rejected")
    t0 = time.perf_counter()
    settings = asdict(sampling)
    for s in range(0, len(todo), chunk):
        batch = todo[s:s + chunk]
        results = generator.generate([r["_prompt"] for r in batch], sampling)
        texts = [r.text.strip() for r in results]
        scores = [None] * len(batch)
        if scorer is not None:
            ok = [i for i, r in enumerate(results) if r.error is None and texts[i]]
            for i, sc in zip(ok, scorer([batch[i] for i in ok], [texts[i] for i in ok])):
                scores[i] = float(sc)
        keep, rejected = [], []
        for rec, res, text, score in zip(batch, results, texts, scores):
            counts["prompts"] += 1
            if res.error is not None:
                counts["request_failed"] += 1
                continue
            last_user = rec["_prompt"][-1]["content"].strip()
            why = ("empty" if not text else
                   "truncated" if res.finish_reason == "length" and not keep_truncated else
                   "echo" if text == last_user else
                   "verifier" if score is not None and score <= 0 else None)
            if why is not None:
                counts[f"rejected_{why}"] += 1
                rejected.append({"source_line": rec["_line"], "reason": why, "response": text[:500],
                                 "finish_reason": res.finish_reason, "score": score})
                continue
            extra = {k: v for k, v in rec.items() if not k.startswith("_") and k not in ("messages", "prompt")}
            prov = {"teacher": generator.describe(), "source_file": rec["_file"], "source_line": rec["_line"],
                    "sampling": settings, "finish_reason": res.finish_reason}
            if score is not None:
                prov.update(scorer=scorer_name, score=score)
            keep.append({"messages": rec["_prompt"] + [{"role": "assistant", "content": text}], **extra,
                         "provenance": prov})
        _append(out, keep)
        _append(rej_path, rejected)
        counts["written"] += len(keep)
        log(f"distill-data: {min(s + chunk, len(todo))}/{len(todo)} prompts, {counts['written']} written, "
            f"{time.perf_counter() - t0:.0f}s")
    total = len(_clean_complete_lines(out))
    summary = {"out": str(out), "teacher": generator.describe(), "prompts_in_file": len(records),
               "already_done": len(done), "answered_now": counts["prompts"], "written_now": counts["written"],
               "records_total": total, "request_failed": counts["request_failed"],
               "rejected": {k: counts[f"rejected_{k}"] for k in ("empty", "truncated", "echo", "verifier")},
               "rejected_total_in_file": len(_clean_complete_lines(rej_path)), "sampling": settings,
               "scorer": scorer_name}
    if isinstance(getattr(generator, "truncated_prompts", None), int):
        summary["prompts_cut_to_context"] = generator.truncated_prompts
    Path(str(out) + ".summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
