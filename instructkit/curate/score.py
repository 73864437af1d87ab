"""Per-example quality signals and selection by them.

Signals (one row per record):

* ``response_words``: words in the reply (whitespace split), and ``response_tokens`` with a model;
* ``loss_given_instruction``: mean NLL of the reply tokens after the conversation rendered with the
  chat template (exactly the tokens SFT trains on with ``train_on: last_assistant``);
* ``loss_response_alone``: mean NLL of *the same reply tokens* after only a start token (BOS, or
  EOS for tokenizers without one, which is how GPT-style models separate documents);
* ``ifd``: instruction-following difficulty, ``loss_given_instruction / loss_response_alone``
  (Li et al. 2024, "From Quantity to Quality", Cherry LLM). Near 1: the instruction barely helps to
  predict the reply (hard, or unrelated); well below 1: the reply follows from the instruction;
  above 1: the instruction misleads the model, which the paper filters out;
* ``ppl``: ``exp(loss_given_instruction)``, the reply's perplexity given its prompt.

Scoring the same token ids in both passes makes the ratio compare like with like; the template is
the model's own (or ``template=``), so the conditioned loss is what training would see.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from instructkit.curate.dedup import DedupConfig, Deduplicator, dedup_text
from instructkit.curate.text import Example, iter_examples, prompt_and_reply, record_text
from instructkit.data.encode import IGNORE_INDEX, encode_messages
from instructkit.data.errors import DataError, SkipReport
from instructkit.models import target_logits

#: Signals ``select`` ranks by, and whether larger values rank first.
SIGNALS = {"response_length": True, "response_words": True, "response_tokens": True, "ifd": True,
           "ppl": False, "loss_given_instruction": False}


def _start_id(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise DataError("<tokenizer>", None, None, "the tokenizer has neither a BOS nor an EOS token, so the "
                    "reply alone has no start token", "use a tokenizer with a bos_token or eos_token",
                    reason="tokenizer")


@torch.no_grad()
def mean_nll_per_example(model, seqs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                         pad_id: int = 0) -> list[float]:
    """Mean NLL over each sequence's labelled tokens (labels as in SFT: -100 = not scored).

    Sequences are batched by length (right padding, attention mask) and run under no_grad.
    """
    device = next(model.parameters()).device
    out = [math.nan] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x, y = seqs[i]
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
        logits, targets = target_logits(model, batch)
        nll = F.cross_entropy(logits.float(), targets, reduction="none")
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        for r, part in enumerate(torch.split(nll, counts)):
            out[idx[r]] = float(part.mean()) if counts[r] else math.nan
    return out


def score_examples(model, tokenizer, examples: Sequence[dict], *, template: str | None = None,
                   batch_size: int = 8, max_length: int = 2048,
                   report: SkipReport | None = None) -> list[dict | None]:
    """Signals for canonical records; None for a record that cannot be scored (added to ``report``).

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its fast tokenizer.
        examples: Canonical records (SFT, preference: the chosen reply, KTO: the completion).
        template: Chat template source or built-in name; default the tokenizer's own.
        batch_size: Sequences per forward pass.
        max_length: Longer conversations are skipped (reason ``too_long``).
        report: Receives the skipped records.
    """
    template = template or tokenizer.chat_template
    start = _start_id(tokenizer)
    cond, alone, replies, keep = [], [], [], []
    for k, ex in enumerate(examples):
        prompt, reply = prompt_and_reply(ex)
        try:
            enc = encode_messages(tokenizer, prompt + [reply], template=template, train_on="last_assistant",
                                  max_length=max_length, truncation="error", file=ex.get("_file"),
                                  line=ex.get("_line"))
        except DataError as err:
            if report is None:
                raise
            report.add(err)
            continue
        targets = [t for t in enc.labels if t != IGNORE_INDEX]
        cond.append((enc.input_ids, enc.labels))
        alone.append(([start] + targets, [IGNORE_INDEX] + targets))
        replies.append((reply["content"], len(targets)))
        keep.append(k)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    lc = mean_nll_per_example(model, cond, batch_size, pad)
    la = mean_nll_per_example(model, alone, batch_size, pad)
    out: list[dict | None] = [None] * len(examples)
    for k, c, a, (text, n_tok) in zip(keep, lc, la, replies):
        out[k] = {"response_words": len(text.split()), "response_tokens": n_tok,
                  "loss_given_instruction": round(c, 6), "loss_response_alone": round(a, 6),
                  "ifd": round(c / a, 6) if a > 0 else math.nan, "ppl": round(math.exp(c), 4)}
    return out


@dataclass
class ScoreResult:
    file: str
    out: str
    model: str
    scored: int = 0
    skipped: int = 0
    seconds: float = 0.0
    means: dict = field(default_factory=dict)
    skip_summary: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def score_file(path: str | Path, model_dir: str | Path, out: str | Path, *, template: str | None = None,
               batch_size: int = 8, max_length: int = 2048, format: str = "auto",
               on_error: str = "skip", chunk: int = 1024) -> ScoreResult:
    """Score every record of a file with a local causal LM; writes one JSON line per record.

    Each row has ``file``, ``line`` and the signals (see the module docstring); a record that
    cannot be scored (too long, no reply tokens) has ``"skipped"`` with the reason instead.
    """
    from instructkit.models import load_for_inference

    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(model_dir, template=template)
    res = ScoreResult(str(path), str(out), str(model_dir))
    skips = SkipReport()
    sums: dict[str, float] = {}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    batch: list[Example] = []

    def flush(fh) -> None:
        local = SkipReport()
        rows = score_examples(model, tokenizer, [e.canonical for e in batch], batch_size=batch_size,
                              max_length=max_length, report=local)
        reasons = {(r.line): r.reason for r in local.records}
        skips.records.extend(local.records)
        for e, row in zip(batch, rows):
            base = {"file": e.file, "line": e.line}
            if row is None:
                fh.write(json.dumps({**base, "skipped": reasons.get(e.line, "unscorable")}) + "\n")
                continue
            res.scored += 1
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
            fh.write(json.dumps({**base, **row}) + "\n")
        batch.clear()

    with open(out, "w", encoding="utf-8") as fh:
        for ex in iter_examples(path, format, on_error, skips):
            batch.append(ex)
            if len(batch) >= chunk:
                flush(fh)
        if batch:
            flush(fh)
    res.skipped = len(skips)
    res.means = {k: round(v / max(1, res.scored), 4) for k, v in sums.items()}
    res.skip_summary = skips.summary() if len(skips) else ""
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


# --- Selection ---------------------------------------------------------------------------------------

@dataclass
class SelectResult:
    file: str
    out: str
    by: str
    top: float
    candidates: int = 0
    target: int = 0
    selected: int = 0
    skipped_for_diversity: int = 0
    excluded: dict = field(default_factory=dict)
    threshold: float | None = None
    report: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _read_scores(path: str | Path, by: str) -> dict[int, float]:
    """``line -> value`` of one signal from a ``score`` output file."""
    values: dict[int, float] = {}
    keys: set[str] = set()
    p = Path(path)
    if not p.exists():
        raise DataError(p, None, None, "scores file not found",
                        "write it with `instructkit data score FILE --model DIR --out SCORES`",
                        reason="missing_file")
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            keys.update(row)
            if row.get(by) is not None:
                values[int(row["line"])] = float(row[by])
    if not values:
        raise DataError(p, None, by, f"no row has the signal '{by}' (rows have {sorted(keys)})",
                        f"pick --by among {sorted(k for k in keys if k in SIGNALS)}", reason="missing_field")
    return values


def select_file(path: str | Path, out: str | Path, *, by: str, top: float,
                scores: str | Path | None = None, model_dir: str | Path | None = None,
                diversity: float | None = 0.7, ascending: bool | None = None,
                report_path: str | Path | None = None, format: str = "auto", on_error: str = "skip",
                batch_size: int = 8, keep_ifd_above_one: bool = False) -> SelectResult:
    """Keep the best ``top`` fraction of records by a signal, skipping near copies of chosen ones.

    Candidates are taken best first; one whose MinHash-estimated Jaccard similarity to an already
    selected record reaches ``diversity`` is skipped (None turns the filter off, leaving only
    exact-duplicate skipping). Selected records are written in file order.

    Args:
        by: A signal of :data:`SIGNALS` (``response_length`` needs no model).
        top: Fraction of the valid records to keep, in (0, 1].
        scores: A ``score`` output to read the signal from; otherwise it is computed (with
            ``model_dir`` for model signals).
        ascending: Rank smallest first (default: per signal, see :data:`SIGNALS`).
        keep_ifd_above_one: IFD >= 1 means the instruction does not help; such records are
            excluded unless this is set (as in the IFD paper).
    """
    if by not in SIGNALS:
        raise DataError(path, None, "--by", f"unknown signal {by!r}", f"use one of {', '.join(SIGNALS)}",
                        reason="bad_argument")
    if not 0.0 < top <= 1.0:
        raise DataError(path, None, "--top", f"top must be a fraction in (0, 1], got {top}",
                        "e.g. --top 0.1 keeps the best 10%", reason="bad_argument")
    skips = SkipReport()
    examples = list(iter_examples(path, format, on_error, skips))
    key = "response_words" if by == "response_length" else by
    if scores:
        by_line = _read_scores(scores, key)
        values = [by_line.get(e.line) for e in examples]
    elif key == "response_words":
        values = [float(len(record_text(e.canonical).reply.split())) for e in examples]
    else:
        if not model_dir:
            raise DataError(path, None, "--model", f"the signal '{by}' needs a model", "pass --model DIR "
                            "or --scores FILE from `instructkit data score`", reason="bad_argument")
        from instructkit.models import load_for_inference

        model, tokenizer = load_for_inference(model_dir)
        rows = score_examples(model, tokenizer, [e.canonical for e in examples], batch_size=batch_size,
                              report=skips)
        values = [r[key] if r else None for r in rows]
    res = SelectResult(str(path), str(out), by, top, threshold=diversity,
                       report=str(report_path) if report_path else None)
    desc = SIGNALS[by] if ascending is None else not ascending
    ranked = []
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            res.excluded["no_value"] = res.excluded.get("no_value", 0) + 1
        elif by == "ifd" and v >= 1.0 and not keep_ifd_above_one:
            res.excluded["ifd_at_least_1"] = res.excluded.get("ifd_at_least_1", 0) + 1
        else:
            ranked.append(i)
    ranked.sort(key=lambda i: (-values[i] if desc else values[i], i))
    res.candidates = len(ranked)
    res.target = min(len(ranked), max(1, round(top * len(examples)))) if examples else 0
    cfg = DedupConfig(near=diversity is not None, threshold=diversity or 1.0, batch_size=512)
    chosen: list[int] = []
    rows = []
    with Deduplicator(cfg) as dd:
        pos = 0
        while len(chosen) < res.target and pos < len(ranked):
            part = ranked[pos:pos + cfg.batch_size]
            pos += len(part)
            for i, m in zip(part, dd.process([dedup_text(examples[i].canonical) for i in part])):
                if len(chosen) >= res.target:
                    break
                if m is None:
                    chosen.append(i)
                    rows.append({"line": examples[i].line, "value": values[i], "rank": len(chosen),
                                 "selected": True})
                else:
                    res.skipped_for_diversity += 1
                    rows.append({"line": examples[i].line, "value": values[i], "selected": False,
                                 "rule": m.rule, "similar_to_line": examples[chosen[m.kept]].line,
                                 "jaccard": round(m.jaccard, 4)})
    res.selected = len(chosen)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for i in sorted(chosen):
            fh.write(json.dumps(examples[i].raw, ensure_ascii=False, default=str) + "\n")
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    if len(skips):
        res.excluded["invalid"] = len(skips)
    return res
