"""Decontamination: find training records that contain text of an evaluation set.

Both sides are normalised (:func:`~instructkit.curate.text.normalize_text`) and cut into word
n-grams. Each evaluation *text* (one string of an evaluation record: a prompt, one MT-Bench turn, a
reference answer) gets its own n-gram size:

* ``N = 8`` when it has fewer than ``long_words`` (64) words: instructions and questions are short
  (IFEval prompts have a median of 34 words), and one changed word removes up to N of their
  n-grams, so a shorter N keeps light paraphrases detectable;
* ``N = 13`` for longer texts (reference answers, passages), as in the GPT-3 contamination study:
  long texts have plenty of 13-grams, and 13 words rarely match by chance or through boilerplate;
* a text shorter than its N (but with at least ``min_words`` words) is matched as a whole.

``ngram=N`` forces one size everywhere. A training record's score against an evaluation text is
the fraction of that text's distinct n-grams found in the record (training prompts and responses,
each turn separately); the record's score is its best one, and the record is contaminated when
that reaches ``threshold``. Scoring by coverage of the evaluation text (not of the training record)
means a long training answer that quotes a whole evaluation prompt still scores 1.0, while one
shared boilerplate phrase among dozens of n-grams stays far below the threshold.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructkit.curate.text import (Example, finish_result, iter_examples, preview, record_text, words,
                                     write_invalid_rows)
from instructkit.data.errors import DataError, SkipReport
from instructkit.data.readers import read_records

#: Record keys that name an evaluation item, in order of preference.
ID_KEYS = ("id", "key", "question_id", "uid", "idx", "task_id", "prompt_id", "example_id")
#: Keys whose strings are parameters or labels, not text a model reads (IFEval's checker ``kwargs``
#: hold phrases such as "Is there anything else I can help with?"); skipped unless named in ``fields``.
SKIP_KEYS = frozenset(ID_KEYS + ("kwargs", "instruction_id_list", "metadata", "category", "model_id",
                                 "answer_id", "motivation_app", "name", "label", "source"))


@dataclass
class EvalText:
    """One evaluation string and where it is."""

    file: str
    line: int
    item_id: object
    field: str
    n: int
    n_grams: int
    n_words: int


@dataclass
class Contamination:
    """The best match of a training record against the evaluation texts.

    Attributes:
        score: Fraction of the evaluation text's distinct n-grams present in the record.
        matched: How many of its n-grams are present.
        eval: The evaluation text (file, line, id, field).
        ngram: One overlapping n-gram, as normalised words (the evidence).
    """

    score: float
    matched: int
    eval: EvalText
    ngram: str

    def to_dict(self) -> dict:
        e = self.eval
        return {"score": round(self.score, 4), "matched_ngrams": self.matched, "eval_ngrams": e.n_grams,
                "n": e.n, "ngram": self.ngram,
                "eval": {"file": e.file, "line": e.line, "id": e.item_id, "field": e.field}}


def string_leaves(value, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string inside a JSON value with its path, e.g. ``choices[0].turns[1]``."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from string_leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from string_leaves(v, f"{path}[{i}]")


_KEY = re.compile(r"[^.\[\]]+")


def _field_matches(path: str, fields: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f + ".") or path.startswith(f + "[") for f in fields)


class EvalIndex:
    """The n-grams of evaluation texts, mapped to the texts that contain them.

    Args:
        ngram: Force one n-gram size; None chooses 8 or 13 per text (see the module docstring).
        long_words: Texts with at least this many words use ``long_n``.
        short_n: N for short texts.
        long_n: N for long texts.
        min_words: Texts with fewer words are not indexed (too generic to mean contamination);
            they are counted in :attr:`too_short`.
    """

    def __init__(self, ngram: int | None = None, long_words: int = 64, short_n: int = 8,
                 long_n: int = 13, min_words: int = 6):
        if ngram is not None and ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        self.ngram, self.long_words, self.short_n, self.long_n = ngram, long_words, short_n, long_n
        self.min_words = min_words
        self.texts: list[EvalText] = []
        self.too_short = 0
        self.files: dict[str, int] = {}
        self._grams: dict[int, dict[int, list[int]]] = {}

    def _size(self, n_words: int) -> int:
        if self.ngram is not None:
            return self.ngram
        return self.short_n if n_words < self.long_words else self.long_n

    def add_text(self, text: str, file: str, line: int, item_id=None, field: str = "") -> bool:
        """Index one evaluation string; False when it is too short."""
        w = words(text)
        if len(w) < self.min_words:
            self.too_short += len(w) >= 3  # one- and two-word strings are labels and ids, not text
            return False
        n = min(self._size(len(w)), len(w))
        grams = {hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1)}
        tid = len(self.texts)
        self.texts.append(EvalText(file, line, item_id, field, n, len(grams), len(w)))
        table = self._grams.setdefault(n, {})
        for g in grams:
            table.setdefault(g, []).append(tid)
        return True

    def add_file(self, path: str | Path, fields: Sequence[str] | None = None) -> int:
        """Index every string of an evaluation file (or only ``fields``); returns texts indexed.

        Any JSON/JSONL/Parquet file works: the strings are found wherever they are (``prompt``,
        ``turns[1]``, ``instances[0].output``, ``choices[0].turns[0]``), except under
        :data:`SKIP_KEYS`. ``fields`` names top-level keys or paths to use instead.
        """
        before = len(self.texts)
        seen_fields: set[str] = set()
        for line, rec in read_records(path):
            item_id = next((rec[k] for k in ID_KEYS if rec.get(k) is not None), None)
            for fpath, text in string_leaves(rec):
                top = fpath.split(".")[0].split("[")[0]
                seen_fields.add(top)
                if fields:
                    if not _field_matches(fpath, fields):
                        continue
                elif SKIP_KEYS.intersection(_KEY.findall(fpath)):
                    continue
                self.add_text(text, str(path), line, item_id, fpath)
        added = len(self.texts) - before
        if fields and not added:
            raise DataError(path, None, "--field", f"no text found in the fields {list(fields)}; the "
                            f"records have the string fields {sorted(seen_fields)}",
                            "name one of those fields (or a path such as turns or instances), or leave "
                            "--field out to use every string", reason="no_eval_text")
        self.files[str(path)] = added
        return added

    def match(self, texts: Sequence[str]) -> Contamination | None:
        """The evaluation text a record's texts cover most, or None when nothing overlaps."""
        hits: dict[int, set[int]] = {}
        evidence: dict[int, str] = {}
        for text in texts:
            w = words(text)
            for n, table in self._grams.items():
                for i in range(len(w) - n + 1):
                    g = hash(tuple(w[i:i + n]))
                    ids = table.get(g)
                    if ids:
                        for t in ids:
                            hits.setdefault(t, set()).add(g)
                            if t not in evidence:
                                evidence[t] = " ".join(w[i:i + n])
        if not hits:
            return None
        best = max(hits, key=lambda t: (len(hits[t]) / self.texts[t].n_grams, len(hits[t]), -t))
        return Contamination(len(hits[best]) / self.texts[best].n_grams, len(hits[best]),
                             self.texts[best], evidence[best])

    def summary(self) -> dict:
        return {"eval_texts": len(self.texts), "eval_files": self.files, "too_short_texts": self.too_short,
                "min_words": self.min_words, "ngram_sizes": sorted({t.n for t in self.texts})}


def build_index(against: Sequence[str | Path], fields: Sequence[str] | None = None,
                ngram: int | None = None, **kw) -> EvalIndex:
    """An :class:`EvalIndex` over evaluation files."""
    index = EvalIndex(ngram=ngram, **kw)
    for path in against:
        index.add_file(path, fields)
    if not index.texts:
        raise DataError(", ".join(map(str, against)), None, None, "the evaluation files hold no text "
                        f"of at least {index.min_words} words", "check the paths, or pass --field",
                        reason="no_eval_text")
    return index


@dataclass
class DecontamResult:
    file: str
    out: str | None
    report: str | None
    threshold: float
    seen: int = 0
    kept: int = 0
    removed: int = 0
    overlapping: int = 0
    skipped: int = 0
    seconds: float = 0.0
    index: dict = field(default_factory=dict)
    by_eval_file: dict = field(default_factory=dict)
    skip_summary: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


#: ``format`` value for prompt-only files (no reply yet), e.g. ``instructkit synth constraints`` output or
#: generation inputs: the texts are ``prompt`` (a string or messages) and every ``messages`` turn.
PROMPTS_FORMAT = "prompts"


def _prompt_texts(rec: dict) -> list[str]:
    prompt = rec.get("prompt")
    turns = (prompt if isinstance(prompt, list) else []) + (rec["messages"] if isinstance(rec.get("messages"), list)
                                                           else [])
    texts = [prompt] if isinstance(prompt, str) else []
    texts += [m["content"] for m in turns if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return [t for t in dict.fromkeys(texts) if t.strip()]


def _training_texts(path: str | Path, format: str, on_error: str,
                    skips: SkipReport) -> Iterator[tuple[Example, list[str]]]:
    """The records of a training file with their texts; ``format="prompts"`` reads prompt-only records."""
    if format != PROMPTS_FORMAT:
        for ex in iter_examples(path, format, on_error, skips):
            yield ex, record_text(ex.canonical).all
        return
    for line, rec in read_records(path, on_error, skips):
        skips.total_seen += 1
        texts = _prompt_texts(rec)
        if not texts:
            err = DataError(path, line, "prompt", "no prompt text: neither a 'prompt' string/messages nor "
                            "'messages' with text", "give each record 'prompt' or 'messages', or drop "
                            "--format prompts for full conversations", reason="missing_field")
            if on_error == "raise":
                raise err
            skips.add(err)
            continue
        yield Example(str(path), line, rec, rec), texts


def decontaminate_file(path: str | Path, against: Sequence[str | Path], out: str | Path | None, *,
                       threshold: float = 0.3, ngram: int | None = None,
                       fields: Sequence[str] | None = None, report_path: str | Path | None = None,
                       format: str = "auto", on_error: str = "skip",
                       index: EvalIndex | None = None) -> DecontamResult:
    """Write the records of ``path`` that do not overlap the evaluation files to ``out``.

    The report (JSON Lines) has a row for every record with any overlap, removed or not: ``line``,
    ``score``, ``removed``, the evaluation item (``eval.file``, ``eval.line``, ``eval.id``,
    ``eval.field``), the overlapping n-gram and a preview; then the invalid records that were skipped.

    Args:
        path: Training data file.
        against: Evaluation files.
        out: Output JSONL for kept records, or None.
        threshold: Remove a record whose score (fraction of an evaluation text's n-grams found in it)
            is at least this.
        ngram: Force the n-gram size (default: 8 for short and 13 for long evaluation texts).
        fields: Restrict the evaluation files to these fields.
        report_path: JSONL report path, or None.
        format: ``auto``, a data format name, or ``prompts`` for prompt-only records
            (:data:`PROMPTS_FORMAT`).
        index: A prebuilt index (then ``against``, ``ngram`` and ``fields`` are ignored).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    t0 = time.perf_counter()
    index = index or build_index(against, fields, ngram)
    res = DecontamResult(str(path), str(out) if out else None, str(report_path) if report_path else None,
                         threshold, index=index.summary())
    skips = SkipReport()
    outs = [Path(p) for p in (out, report_path) if p]
    for p in outs:
        p.parent.mkdir(parents=True, exist_ok=True)
    out_fh = open(out, "w", encoding="utf-8") if out else None
    rep_fh = open(report_path, "w", encoding="utf-8") if report_path else None
    try:
        for ex, texts in _training_texts(path, format, on_error, skips):
            c = index.match(texts)
            removed = c is not None and c.score >= threshold
            if c is not None:
                res.overlapping += 1
                if rep_fh:
                    row = {"file": ex.file, "line": ex.line, "removed": removed, **c.to_dict(),
                           "text": preview(" ".join(texts))}
                    rep_fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            if removed:
                res.removed += 1
                res.by_eval_file[c.eval.file] = res.by_eval_file.get(c.eval.file, 0) + 1
            else:
                res.kept += 1
                if out_fh:
                    out_fh.write(json.dumps(ex.raw, ensure_ascii=False, default=str) + "\n")
        if rep_fh:
            write_invalid_rows(rep_fh, skips)
    finally:
        for fh in (out_fh, rep_fh):
            if fh:
                fh.close()
    return finish_result(res, skips, t0)


def contamination_error(rec: dict, c: Contamination) -> DataError:
    """A removal as a DataError row (for ``skipped.json``), naming the evaluation item and n-gram."""
    e = c.eval
    item = f"{Path(e.file).name}:{e.line}" + (f" (id {e.item_id})" if e.item_id is not None else "")
    return DataError(rec.get("_file", "<data>"), rec.get("_line"), None,
                     f"contains {c.matched} of the {e.n_grams} {e.n}-grams ({c.score:.0%}) of evaluation "
                     f"item {item} field '{e.field}', e.g. \"{c.ngram}\"",
                     "none needed; removed by data.curate.decontaminate_against (remove the file from "
                     "that list to keep it)", reason="contaminated")
