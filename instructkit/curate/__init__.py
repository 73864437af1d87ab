"""Data curation: validate, deduplicate, decontaminate, mix, score, select and report.

Each tool is a function here and a command under ``instructkit data``; the dedup and
decontamination rules also run inside training through the ``data.curate`` config block.
``score_file`` and ``select_file`` live in :mod:`instructkit.curate.score` (they import torch).
"""

from instructkit.curate.decontam import EvalIndex, build_index, decontaminate_file
from instructkit.curate.dedup import DedupConfig, Deduplicator, dedup_file, dedup_records
from instructkit.curate.mix import MixConfig, load_mix_config, mix
from instructkit.curate.report import write_report
from instructkit.curate.validate import validate_file

__all__ = ["DedupConfig", "Deduplicator", "EvalIndex", "MixConfig", "build_index", "decontaminate_file",
           "dedup_file", "dedup_records", "load_mix_config", "mix", "validate_file", "write_report"]
