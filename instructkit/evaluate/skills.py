"""The skills suite: generate for every prompt of each split, verify, and aggregate.

Metrics per split: verified accuracy, exact match against the reference answer, the fraction of
generations that stop on their own before the length limit (the "never learns to stop" failure),
mean generated length and the held-out loss on the reference answers. Per family: accuracy.
Forgetting: NLL on held-out plain-text corpus lines, compared before and after tuning.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from instructkit.data.encode import encode_messages, encode_prompt
from instructkit.data.errors import DataError
from instructkit.data.formats import normalize
from instructkit.data.readers import read_records
from instructkit.data.text import document_batches
from instructkit.generate import SamplingConfig, generate
from instructkit.models import mean_nll
from instructkit.synth.skills import SPLITS, clean, verify_response


def require_splits(data_dir: str | Path, splits) -> None:
    """Fail before any model is loaded when a split file is missing, naming the fix."""
    for split in splits:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.exists():
            raise DataError(path, None, None, f"the skills data has no '{split}' split",
                            f"generate the suite with `instructkit synth skills --out {data_dir}`",
                            reason="missing_file")


def load_split(data_dir: str | Path, split: str, limit: int | None = None) -> list[dict]:
    """Records of one split, their messages validated like training data (errors name file:line)."""
    require_splits(data_dir, [split])
    path = Path(data_dir) / f"{split}.jsonl"
    records = []
    for line, raw in read_records(path):
        normalize(raw, "messages", path, line)  # raises a DataError with file:line and field
        for key in ("family", "data"):
            if key not in raw:
                raise DataError(path, line, key, "missing (needed to verify answers)",
                                "regenerate with `instructkit synth skills`", reason="missing_field")
        records.append({**raw, "_line": line})
    if limit is not None and limit < len(records):
        # Round-robin over families (file order within each), so a small limit still measures
        # every family instead of whichever happens to come first.
        by_family: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_family[r["family"]].append(r)
        picked: list[dict] = []
        queues = list(by_family.values())
        while len(picked) < limit:
            for q in queues:
                if q and len(picked) < limit:
                    picked.append(q.pop(0))
        records = sorted(picked, key=lambda r: r["_line"])
    return records


def check_chat_template(tokenizer, model_dir: str | Path) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(model_dir, None, "chat_template",
                        "the model's tokenizer has no chat template, so prompts cannot be rendered as in "
                        "training", "evaluate the final/ folder of an instructkit run (it saves the "
                        "template), or pass --template chatml", reason="no_template")


def answer_nll(model, tokenizer, records: list[dict], max_length: int | None = None) -> float:
    """Token-mean NLL of the reference answers given their prompts (the held-out loss).

    ``max_length`` keeps only each conversation's first tokens (None: all of them).
    """
    batches = []
    for rec in records:
        enc = encode_messages(tokenizer, rec["messages"], template=tokenizer.chat_template)
        ids, labels = enc.input_ids[:max_length], enc.labels[:max_length]
        batches.append({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])})
    return mean_nll(model, batches)


def corpus_nll(model, tokenizer, lines: list[str], max_length: int = 256) -> float:
    """Token-mean NLL on plain-text lines (the forgetting probe), each line scored on its own: packed
    rows with block-diagonal attention and positions from 0, so a line never sees the previous one."""
    plan, _ = document_batches(tokenizer, lines, max_length, micro_batch_size=16, seed=0, shuffle=False)
    return mean_nll(model, plan.source(0))


def evaluate_skills(model, tokenizer, data_dir: str | Path, splits: tuple[str, ...] = SPLITS,
                    limit: int | None = None, max_new_tokens: int = 64, batch_size: int = 32,
                    corpus_lines: list[str] | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Score a model on the skills suite.

    Returns:
        ``(metrics, samples)``: metrics per split and family (plus ``corpus_nll`` when lines are
        given); samples with prompt, output, expected answer and correctness.
    """
    model.eval()
    metrics: dict = {"splits": {}, "families": {}}
    samples: list[dict] = []
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    for split in splits:
        recs = load_split(data_dir, split, limit)
        prompts = [encode_prompt(tokenizer, r["messages"][:-1], template=tokenizer.chat_template) for r in recs]
        gens = generate(model, tokenizer, prompts, sampling, batch_size=batch_size)
        per_family: dict[str, list[bool]] = defaultdict(list)
        correct = exact = stopped = 0
        lengths = []
        for r, g in zip(recs, gens):
            ok = bool(verify_response(r, g.text))
            em = clean(g.text) == clean(r["messages"][-1]["content"])
            correct += ok
            exact += em
            stopped += g.finish_reason == "stop"
            lengths.append(len(g.token_ids))
            per_family[r["family"]].append(ok)
            samples.append({"split": split, "family": r["family"], "phrasing": r.get("phrasing"),
                            "prompt": r["messages"][-2]["content"], "output": g.text,
                            "expected": r["messages"][-1]["content"], "correct": ok, "exact_match": em,
                            "stopped": g.finish_reason == "stop"})
        n = max(1, len(recs))
        metrics["splits"][split] = {
            "n": len(recs), "accuracy": correct / n, "exact_match": exact / n, "stop_rate": stopped / n,
            "mean_generated_tokens": sum(lengths) / n, "heldout_loss": answer_nll(model, tokenizer, recs)}
        metrics["families"][split] = {f: sum(v) / len(v) for f, v in sorted(per_family.items())}
        if progress:
            m = metrics["splits"][split]
            print(f"  {split:17s} accuracy {m['accuracy']:6.1%}  stop rate {m['stop_rate']:6.1%}  "
                  f"loss {m['heldout_loss']:.3f}  (n={len(recs)})", file=sys.stderr, flush=True)
    if corpus_lines:
        metrics["corpus_nll"] = corpus_nll(model, tokenizer, corpus_lines)
    return metrics, samples


def write_eval(out_dir: str | Path, metrics: dict, samples: list[dict]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
