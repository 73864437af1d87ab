"""From data files to deterministic micro-batches: read, validate, template, encode, split, pack.

Shared by every method that trains on conversations. It imports no training code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from instructkit.data.encode import EncodedExample, encode_messages
from instructkit.data.errors import DataError, SkipReport
from instructkit.data.formats import load_examples
from instructkit.data.packing import (collate_packed, collate_padded, pack_best_fit_decreasing,
                                      packing_efficiency)
from instructkit.data.templates import ensure_template_tokens, resolve_template


def as_list(x: str | list[str] | None) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def prepare_template(tokenizer, data_cfg) -> tuple[str, int]:
    """Pick the chat template and make the tokenizer carry it (so the saved tokenizer does too).

    Returns:
        ``(template, n_added_tokens)``; added tokens mean the embeddings must be resized.
    """
    added = 0
    if data_cfg.template != "auto" and data_cfg.add_special_tokens:
        added = ensure_template_tokens(tokenizer, data_cfg.template)
    template = resolve_template(tokenizer, data_cfg.template)
    tokenizer.chat_template = template
    return template, added


@dataclass
class EncodedData:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    report: SkipReport
    template: str

    @property
    def n_truncated(self) -> int:
        return sum(e.truncated for e in self.train + self.eval)


def encode_records(records: list[dict], tokenizer, template: str, data_cfg,
                   report: SkipReport) -> list[EncodedExample]:
    """Encode canonical SFT records; too-long or target-less examples follow ``data.on_error``."""
    out = []
    for rec in records:
        try:
            enc = encode_messages(tokenizer, rec["messages"], template=template, train_on=data_cfg.train_on,
                                  max_length=data_cfg.max_length, truncation=data_cfg.truncation,
                                  file=rec.get("_file"), line=rec.get("_line"))
        except DataError as e:
            if data_cfg.on_error == "raise":
                raise
            report.add(e)
            continue
        out.append(enc)
    return out


def load_sft_data(data_cfg, tokenizer, template: str, seed: int) -> EncodedData:
    """Read, validate and encode the train (and eval) data of an SFT run.

    With ``on_error: raise`` the first bad record raises a DataError naming file, line and field.
    With ``skip``, every skipped record is in the returned report.
    """
    report = SkipReport()
    train_recs = load_examples(as_list(data_cfg.train), format=data_cfg.format,
                               on_error=data_cfg.on_error, kind="sft", report=report)
    if getattr(data_cfg, "curate", None) is not None:
        from instructkit.curate.apply import curate_records  # removals go to report (skipped.json)

        train_recs = curate_records(train_recs, data_cfg.curate, report)
    eval_recs = load_examples(as_list(data_cfg.eval), format=data_cfg.format,
                              on_error=data_cfg.on_error, kind="sft", report=report) if data_cfg.eval else []
    train = encode_records(train_recs, tokenizer, template, data_cfg, report)
    evals = encode_records(eval_recs, tokenizer, template, data_cfg, report)
    if not data_cfg.eval and data_cfg.eval_fraction > 0 and len(train) > 1:
        # A seeded permutation keeps the split identical across runs and resumes.
        idx = list(range(len(train)))
        random.Random(seed).shuffle(idx)
        n_eval = max(1, int(round(len(train) * data_cfg.eval_fraction)))
        held = set(idx[:n_eval])
        evals = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    if not train:
        raise DataError(", ".join(as_list(data_cfg.train)), None, None,
                        f"no usable training examples ({report.summary()})",
                        "fix the records listed above or point data.train at the right file",
                        reason="empty")
    return EncodedData(train, evals, report, template)


@dataclass
class BatchPlan:
    """Micro-batches for any epoch, always identical for the same epoch (exact resume)."""

    source: Callable[[int], Sequence[dict]]
    micro_per_epoch: int
    packing_efficiency: float | None
    n_rows: int


def epoch_source(groups: Sequence, micro_batch_size: int, seed: int, shuffle: bool,
                 collate: Callable[[list], dict]) -> Callable[[int], list[dict]]:
    """``epoch -> micro-batches``: ``groups`` (rows or examples) in a seeded per-epoch order, cut into
    chunks of ``micro_batch_size`` and collated. The same epoch always gives the same list (exact
    resume); only the latest epoch is kept in memory.
    """
    cache: dict[int, list[dict]] = {}

    def source(epoch: int) -> list[dict]:
        if epoch not in cache:
            order = list(range(len(groups)))
            if shuffle:
                random.Random(seed * 1000003 + epoch).shuffle(order)
            batches = [collate([groups[i] for i in order[s:s + micro_batch_size]])
                       for s in range(0, len(order), micro_batch_size)]
            cache.clear()
            cache[epoch] = batches
        return cache[epoch]

    return source


def plan_batches(examples: list[EncodedExample], *, packing: bool, micro_batch_size: int,
                 max_length: int, pad_id: int, seed: int, shuffle: bool) -> BatchPlan:
    """Group examples into micro-batches.

    Packing: best-fit-decreasing rows of ``max_length`` tokens, shuffled per epoch, ``micro_batch_size``
    rows per micro-batch, each with a block-diagonal mask. Padded: ``micro_batch_size`` examples per
    micro-batch, shuffled per epoch.
    """
    if packing:
        lengths = [len(e.input_ids) for e in examples]
        rows = pack_best_fit_decreasing(lengths, max_length)
        eff = packing_efficiency(rows, lengths, max_length)
        units: list = rows
    else:
        units = [[i] for i in range(len(examples))]
        eff = None
    if packing:
        collate = lambda chunk: collate_packed(examples, chunk, pad_id=pad_id)  # noqa: E731
    else:
        collate = lambda chunk: collate_padded([examples[r[0]] for r in chunk], pad_id=pad_id)  # noqa: E731
    source = epoch_source(units, micro_batch_size, seed, shuffle, collate)
    n_micro = (len(units) + micro_batch_size - 1) // micro_batch_size
    return BatchPlan(source, n_micro, eff, len(units))

