"""Exact and near-duplicate removal that keeps the first record of each cluster.

Exact duplicates are records whose normalised text (:func:`~instructkit.curate.text.normalize_text`:
case, Unicode form, punctuation and spacing ignored) is identical. Near duplicates are found with
MinHash-LSH over word (or character) shingles: LSH proposes candidates among the records kept so
far, and a candidate counts only if the MinHash estimate of the Jaccard similarity of the two
shingle sets is at least ``threshold``. Comparisons are always against kept records, so a cluster
keeps its first record and every removal names the kept record it matched.

:func:`dedup_file` streams: records are read, hashed and written in batches, and only hashes, LSH
bucket keys (compact numpy arrays) and a temporary file of signatures are kept, so a million short
records fit in a few hundred MB (see ``bench/RESULTS.md``).
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from instructkit.curate.minhash import (MinHasher, SignatureStore, SortedMultimap, band_keys,
                                        colliding_pairs, lsh_params, shingle_hashes)
from instructkit.curate.text import (Example, finish_result, iter_examples, normalize_text, preview, record_text,
                                     write_invalid_rows)
from instructkit.data.errors import DataError, SkipReport


@dataclass(frozen=True)
class DedupConfig:
    """How duplicates are found.

    Attributes:
        exact: Remove records whose normalised text equals an earlier record's.
        near: Remove near duplicates found with MinHash-LSH.
        threshold: Estimated Jaccard similarity of shingle sets at or above which a record is a
            near duplicate.
        num_perm: MinHash permutations (signature length); more = finer estimates, more time.
        shingle_size: Words (or characters with ``unit="char"``) per shingle.
        unit: ``word`` or ``char`` shingles. Character shingles suit very short texts, where one
            changed word removes most word shingles.
        field: Which text to compare: ``all`` (prompt and response), ``prompt`` or ``response``.
        seed: Seed of the MinHash permutations.
        batch_size: Records hashed per numpy batch.
        max_candidates: LSH candidates checked per bucket, oldest first (bounds the work on
            buckets that many distinct records share).
    """

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 3
    unit: str = "word"
    field: str = "all"
    seed: int = 1
    batch_size: int = 4096
    max_candidates: int = 50

    def __post_init__(self):
        problems = []
        if not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            problems.append(f"num_perm must be at least 2, got {self.num_perm}")
        if self.shingle_size < 1:
            problems.append(f"shingle_size must be at least 1, got {self.shingle_size}")
        if self.unit not in ("word", "char"):
            problems.append(f"unit must be 'word' or 'char', got {self.unit!r}")
        if self.field not in ("all", "prompt", "response"):
            problems.append(f"field must be 'all', 'prompt' or 'response', got {self.field!r}")
        if not (self.exact or self.near):
            problems.append("turn on exact or near (or both)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Match:
    """Why a record is a duplicate: the rule, the kept record (its id, 0-based in kept order) and
    the estimated Jaccard similarity (1.0 for exact duplicates)."""

    rule: str
    kept: int
    jaccard: float


class Deduplicator:
    """Stateful duplicate finder: feed texts in order with :meth:`process`; kept ones get ids 0, 1, ..."""

    def __init__(self, config: DedupConfig = DedupConfig(), workdir: str | None = None):
        self.config = config
        self.n_kept = 0
        self._exact = SortedMultimap()
        if config.near:
            self._hasher = MinHasher(config.num_perm, config.seed)
            self.bands, self.rows = lsh_params(config.threshold, config.num_perm)
            self._buckets = SortedMultimap()
            self._store = SignatureStore(config.num_perm, workdir)

    def close(self) -> None:
        if self.config.near:
            self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def process(self, texts: Sequence[str]) -> list[Match | None]:
        """Decide for each text, in order: None (kept, next id) or the :class:`Match` that removes it."""
        out: list[Match | None] = []
        for s in range(0, len(texts), self.config.batch_size):
            out.extend(self._batch(texts[s:s + self.config.batch_size]))
        return out

    def _batch(self, texts: Sequence[str]) -> list[Match | None]:
        cfg = self.config
        norms = [normalize_text(t) for t in texts]
        keys = np.fromiter((xxhash.xxh3_64_intdigest(n.encode()) for n in norms), dtype=np.uint64,
                           count=len(norms))
        prev_exact = self._exact.first(keys) if cfg.exact else None
        # Candidates per row: kept records of earlier batches sharing an LSH bucket, and earlier
        # rows of this batch sharing one (which count only if they end up kept).
        older: dict[int, set[int]] = {}
        earlier: dict[int, set[int]] = {}
        if cfg.near:
            sigs = self._hasher.signatures([shingle_hashes(n, cfg.shingle_size, cfg.unit) for n in norms])
            bkeys = band_keys(sigs, self.bands, self.rows, cfg.seed)
            q, v = self._buckets.pairs(bkeys.ravel(), cfg.max_candidates)
            for qi, kept in zip((q // self.bands).tolist(), v.tolist()):
                older.setdefault(qi, set()).add(kept)
            later, first = colliding_pairs(bkeys, cfg.max_candidates)
            for a, b in zip(later.tolist(), first.tolist()):
                earlier.setdefault(a, set()).add(b)
        local_exact: dict[int, int] = {}
        row_id: dict[int, int] = {}  # row in this batch -> kept id
        local_rows: list[int] = []   # kept id - first kept id of this batch -> row
        out: list[Match | None] = []
        for i in range(len(texts)):
            if cfg.exact:
                hit = int(prev_exact[i]) if prev_exact[i] >= 0 else local_exact.get(int(keys[i]))
                if hit is not None:
                    out.append(Match("exact", hit, 1.0))
                    continue
            if i in older or i in earlier:
                ids = older.get(i, set()) | {row_id[r] for r in earlier.get(i, ()) if r in row_id}
                match = self._best(sigs[i], sorted(ids), sigs, local_rows) if ids else None
                if match is not None:
                    out.append(match)
                    continue
            row_id[i] = self.n_kept
            local_rows.append(i)
            local_exact[int(keys[i])] = self.n_kept
            self.n_kept += 1
            out.append(None)
        rows = np.asarray(local_rows, dtype=np.int64)
        ids = np.arange(self.n_kept - len(rows), self.n_kept, dtype=np.int64)
        if cfg.exact:
            self._exact.add(keys[rows], ids)
        if cfg.near:
            self._buckets.add(bkeys[rows].ravel(), np.repeat(ids, self.bands))
            self._store.append(sigs[rows])
        return out

    def _best(self, sig: np.ndarray, cand: list[int], sigs: np.ndarray, local_rows: list[int]) -> Match | None:
        """The most similar candidate (oldest on ties) if its Jaccard estimate reaches the threshold.

        ``cand`` is sorted; ids from ``n_kept - len(local_rows)`` on are kept rows of this batch.
        """
        start = self.n_kept - len(local_rows)
        n_old = sum(1 for k in cand if k < start)
        stacked = np.concatenate([self._store.get(cand[:n_old]),
                                  sigs[[local_rows[k - start] for k in cand[n_old:]]]])
        est = (stacked == sig[None, :]).mean(axis=1)
        j = int(np.argmax(est))  # ties go to the oldest (ids are sorted, older ones first)
        if est[j] >= self.config.threshold:
            return Match("near", cand[j], float(est[j]))
        return None


# --- Files and record lists ------------------------------------------------------------------------

def dedup_text(example: dict, field: str = "all") -> str:
    """The text compared for a canonical record: its ``field`` texts joined by newlines."""
    return "\n".join(record_text(example).select(field))


@dataclass
class DedupResult:
    """Counts of a dedup run and where its outputs are."""

    file: str
    out: str | None
    report: str | None
    seen: int = 0
    kept: int = 0
    exact: int = 0
    near: int = 0
    skipped: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    skip_summary: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _batched(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def dedup_file(path: str | Path, out: str | Path | None, *, config: DedupConfig = DedupConfig(),
               report_path: str | Path | None = None, format: str = "auto",
               on_error: str = "skip") -> DedupResult:
    """Remove duplicates from a data file, streaming.

    Kept records are written to ``out`` as JSON Lines, unchanged (same fields, same format) and in
    their original order. The report (JSON Lines) has one row per removed record: ``line``, ``rule``
    (``exact`` or ``near``), ``matched_line`` (the kept record), ``jaccard`` and a text preview; then
    one row per invalid record that was skipped (``rule: invalid``, with the error).

    Args:
        path: Input data file (any supported format and container).
        out: Output JSONL, or None to only count and report.
        config: What counts as a duplicate.
        report_path: Where the report goes; None for no report.
        format: ``auto`` or a forced format.
        on_error: ``skip`` invalid records (reported) or ``raise`` on the first.
    """
    t0 = time.perf_counter()
    skips = SkipReport()
    res = DedupResult(str(path), str(out) if out else None, str(report_path) if report_path else None,
                      config=asdict(config))
    kept_lines = array("q")  # kept id -> source line; 8 bytes per kept record
    out_fh = _open_out(out)
    rep_fh = _open_out(report_path)
    try:
        with Deduplicator(config, workdir=str(Path(out).parent) if out else None) as dd:
            for batch in _batched(iter_examples(path, format, on_error, skips), config.batch_size):
                decisions = dd.process([dedup_text(e.canonical, config.field) for e in batch])
                for ex, m in zip(batch, decisions):
                    if m is None:
                        kept_lines.append(ex.line)
                        if out_fh:
                            out_fh.write(json.dumps(ex.raw, ensure_ascii=False, default=str) + "\n")
                        continue
                    res.exact += m.rule == "exact"
                    res.near += m.rule == "near"
                    if rep_fh:
                        rep_fh.write(json.dumps(_removal_row(ex, m, kept_lines[m.kept], config.field),
                                                ensure_ascii=False) + "\n")
            res.kept = dd.n_kept
        if rep_fh:
            write_invalid_rows(rep_fh, skips)
    finally:
        for fh in (out_fh, rep_fh):
            if fh:
                fh.close()
    return finish_result(res, skips, t0)


def _removal_row(ex: Example, m: Match, matched_line: int, field: str) -> dict:
    return {"file": ex.file, "line": ex.line, "rule": m.rule, "matched_file": ex.file,
            "matched_line": matched_line, "jaccard": round(m.jaccard, 4),
            "text": preview(dedup_text(ex.canonical, field))}


def _open_out(path: str | Path | None):
    if path is None:
        return None
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return open(p, "w", encoding="utf-8")


def dedup_records(records: Sequence[dict], config: DedupConfig = DedupConfig()
                  ) -> tuple[list[dict], list[tuple[dict, Match, dict]]]:
    """Deduplicate canonical records in memory.

    Returns:
        ``(kept, removed)`` with ``removed`` as ``(record, match, kept_record_it_matched)``.
    """
    kept: list[dict] = []
    removed = []
    with Deduplicator(config) as dd:
        decisions = dd.process([dedup_text(r, config.field) for r in records])
    for rec, m in zip(records, decisions):
        if m is None:
            kept.append(rec)
        else:
            removed.append((rec, m, kept[m.kept]))
    return kept, removed


def removal_error(rec: dict, m: Match, matched: dict) -> DataError:
    """A removal as a DataError row (for ``skipped.json``): the rule and the kept record it matched."""
    what = "an exact duplicate (same normalised text)" if m.rule == "exact" else \
        f"a near duplicate (estimated Jaccard {m.jaccard:.2f})"
    return DataError(rec.get("_file", "<data>"), rec.get("_line"), None,
                     f"{what} of {Path(str(matched.get('_file'))).name}:{matched.get('_line')}, which is kept",
                     "none needed; removed by data.curate.dedup (set it to false to keep duplicates)",
                     reason=f"{m.rule}_duplicate")
