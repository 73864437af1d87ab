"""The ``data.curate`` block of a training config, applied to canonical records before encoding.

Removed records are added to the run's :class:`~instructkit.data.errors.SkipReport` with reasons
``exact_duplicate``, ``near_duplicate`` or ``contaminated`` and their evidence (the kept record, or
the evaluation item and n-gram), so they are printed with the skip summary and saved in the run
folder's ``skipped.json`` like every other record that does not reach training.
"""

from __future__ import annotations

from instructkit.curate.decontam import build_index, contamination_error
from instructkit.curate.dedup import DedupConfig, dedup_records, removal_error
from instructkit.curate.text import record_text
from instructkit.data.errors import SkipReport

#: Skip reasons that mean "removed by curation", not "invalid".
CURATION_REASONS = ("exact_duplicate", "near_duplicate", "contaminated")


def curate_records(records: list[dict], cfg, report: SkipReport) -> list[dict]:
    """Decontaminate, then deduplicate, canonical records as ``cfg`` (a ``CurateConfig``) asks.

    Decontamination runs first so that a contaminated record is never the "kept" representative
    that its duplicates point to.
    """
    kept = records
    if cfg.decontaminate_against:
        index = build_index(cfg.decontaminate_against, ngram=cfg.ngram)
        clean = []
        for rec in kept:
            c = index.match(record_text(rec).all)
            if c is not None and c.score >= cfg.contamination_threshold:
                report.add(contamination_error(rec, c))
            else:
                clean.append(rec)
        kept = clean
    if cfg.dedup:
        near = cfg.near_dup_threshold is not None
        kept, removed = dedup_records(kept, DedupConfig(near=near, threshold=cfg.near_dup_threshold or 1.0))
        for rec, m, matched in removed:
            report.add(removal_error(rec, m, matched))
    return kept
