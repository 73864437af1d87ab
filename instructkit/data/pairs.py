"""Preference pairs and KTO examples as token batches: read, validate, encode, split, pack.

Every preference-style method trains on *units* of two sequences that share one prompt rendering:

- pairs (dpo, simpo, orpo, reward): ``(chosen, rejected)``;
- KTO: ``(completion, mismatched completion)``, where the second is another example's completion
  after this example's prompt; it estimates the KL reference point z0 and is never a target itself.

Sequence ``2u`` is unit ``u``'s first sequence and ``2u + 1`` its second; batches carry these
global ids in ``example_index`` (per position, -1 on padding) and the units in ``units``, so a
method can sum token log-probabilities per sequence and look up precomputed reference values.
Eval units are numbered after the train units, so one id space covers both.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from instructkit.data.encode import IGNORE_INDEX, EncodedExample, encode_preference
from instructkit.data.errors import DataError, SkipReport
from instructkit.data.formats import load_examples
from instructkit.data.packing import collate_padded, pack_best_fit_decreasing, packing_efficiency
from instructkit.data.pipeline import as_list, epoch_source


@dataclass
class PairData:
    """Encoded units of a preference-style run.

    Attributes:
        units: ``(first, second)`` encoded sequences per unit; train units first, then eval units.
        n_train: How many of ``units`` are training units.
        desirable: KTO labels per unit (None for paired methods).
        report: Skipped records (under ``on_error: skip``).
    """

    units: list[tuple[EncodedExample, EncodedExample]]
    n_train: int
    desirable: list[bool] | None = None
    report: SkipReport = field(default_factory=SkipReport)

    @property
    def n_eval(self) -> int:
        return len(self.units) - self.n_train

    @property
    def sequences(self) -> list[EncodedExample]:
        """All sequences in global-id order (``2u``, ``2u + 1``)."""
        return [s for unit in self.units for s in unit]

    @cached_property
    def layouts(self) -> list:
        """Each unit's shared-prompt layout (see :func:`shared_prompt_layout`), computed once."""
        return [shared_prompt_layout(a, b) for a, b in self.units]

    @property
    def n_truncated(self) -> int:
        """Units with at least one truncated sequence."""
        return sum(a.truncated or b.truncated for a, b in self.units)


def _encode_units(records: list[dict], tokenizer, template: str, data_cfg, truncation: str,
                  report: SkipReport, kto: bool, seed: int) -> tuple[list, list[bool]]:
    """Encode records into units; KTO pairs each prompt with another record's completion."""
    if kto:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        # A cyclic shift of a random order: every record gets a different record's completion.
        partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    units, labels = [], []
    for i, rec in enumerate(records):
        if kto:
            first, second = rec["completion"], records[partner[i]]["completion"]
            if len(records) == 1:
                second = first
        else:
            first, second = rec["chosen"], rec["rejected"]
        try:
            units.append(encode_preference(tokenizer, rec["prompt"], first, second, template=template,
                                           max_length=data_cfg.max_length, truncation=truncation,
                                           file=rec.get("_file"), line=rec.get("_line")))
        except DataError as e:
            if data_cfg.on_error == "raise":
                raise
            report.add(e)
            continue
        labels.append(bool(rec.get("label", True)))
    return units, labels


def load_pair_data(data_cfg, tokenizer, template: str, seed: int, *, kind: str = "preference",
                   truncation: str = "keep_end") -> PairData:
    """Read, validate and encode the train (and eval) data of a preference-style run.

    Args:
        data_cfg: The ``data`` config section.
        tokenizer: Tokenizer carrying the chat template.
        template: Template source (from :func:`instructkit.data.pipeline.prepare_template`).
        seed: Seeds the eval split and KTO's mismatched pairing.
        kind: ``"preference"`` (pairs) or ``"kto"`` (unpaired; preference files are split into a
            desirable and an undesirable example per pair).
        truncation: ``keep_end`` (keep the prompt's end and the responses' starts), ``right`` or
            ``error``.

    Raises:
        DataError: The first bad record under ``on_error: raise``, or no usable training unit.
    """
    report = SkipReport()
    kto = kind == "kto"
    train_recs = load_examples(as_list(data_cfg.train), format=data_cfg.format, on_error=data_cfg.on_error,
                               kind=kind, report=report)
    if data_cfg.curate is not None:
        from instructkit.curate.apply import curate_records  # removals go to the report (skipped.json)

        train_recs = curate_records(train_recs, data_cfg.curate, report)
    eval_recs = load_examples(as_list(data_cfg.eval), format=data_cfg.format, on_error=data_cfg.on_error,
                              kind=kind, report=report) if data_cfg.eval else []
    if not data_cfg.eval and data_cfg.eval_fraction > 0 and len(train_recs) > 1:
        idx = list(range(len(train_recs)))
        random.Random(seed).shuffle(idx)
        held = set(idx[:max(1, int(round(len(train_recs) * data_cfg.eval_fraction)))])
        eval_recs = [r for i, r in enumerate(train_recs) if i in held]
        train_recs = [r for i, r in enumerate(train_recs) if i not in held]
    train, train_labels = _encode_units(train_recs, tokenizer, template, data_cfg, truncation, report, kto, seed)
    evals, eval_labels = _encode_units(eval_recs, tokenizer, template, data_cfg, truncation, report, kto, seed)
    if not train:
        raise DataError(", ".join(as_list(data_cfg.train)), None, None,
                        f"no usable training {'examples' if kto else 'pairs'} ({report.summary()})",
                        "fix the records listed above or point data.train at the right file", reason="empty")
    return PairData(train + evals, len(train), (train_labels + eval_labels) if kto else None, report)


@dataclass
class PairBatchPlan:
    """Micro-batches of units for any epoch, identical for the same epoch (exact resume)."""

    source: Callable[[int], Sequence[dict]]
    micro_per_epoch: int
    packing_efficiency: float | None


def shared_prompt_layout(first: EncodedExample, second: EncodedExample):
    """Split a unit into a shared prompt prefix and two branches, computed once in a packed row.

    Layout ``[shared][branch 1][branch 2]``: ``shared`` is the prompt without its last token; each
    branch starts with its own copy of the prompt's last token (so the usual one-token shift
    predicts each response's first token from it) followed by that side's response. Both branches
    see the shared prefix and themselves, never each other, and take positions after the prefix,
    so every response token gets exactly the logits it would get as a separate sequence while the
    prompt is run once instead of twice. Units whose two sides do not start with the same prompt
    tokens get an empty prefix (two independent sequences).

    Returns:
        ``(shared_ids, (ids_1, labels_1), (ids_2, labels_2))``.
    """
    n1 = next(i for i, t in enumerate(first.labels) if t != IGNORE_INDEX)
    n2 = next(i for i, t in enumerate(second.labels) if t != IGNORE_INDEX)
    p = n1 - 1
    if n1 == n2 and n1 >= 2 and first.input_ids[:n1] == second.input_ids[:n1]:
        return (first.input_ids[:p], (first.input_ids[p:], first.labels[p:]),
                (second.input_ids[p:], second.labels[p:]))
    return [], (first.input_ids, first.labels), (second.input_ids, second.labels)


def _unit_length(data: PairData, u: int) -> int:
    shared, (a, _), (b, _) = data.layouts[u]
    return len(shared) + len(a) + len(b)


def collate_shared(data: PairData, rows: Sequence[Sequence[int]], *, pad_id: int,
                   pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """Packed rows of units in the shared-prompt layout (see :func:`shared_prompt_layout`).

    ``attention_mask`` is (B, 1, L, L) bool: position i may attend j when j <= i, both belong to
    the same unit, and j is in the shared prefix or in i's own branch (padding attends to itself).
    """
    length = max(sum(_unit_length(data, u) for u in row) for row in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    example_index = torch.full((b, length), -1, dtype=torch.long)
    unit_of = torch.full((b, length), -1, dtype=torch.long)
    branch = torch.zeros((b, length), dtype=torch.long)  # 0 shared, 1 first side, 2 second side
    for r, row in enumerate(rows):
        pos = 0
        for u in row:
            shared, (ids1, lab1), (ids2, lab2) = data.layouts[u]
            parts = [(shared, [IGNORE_INDEX] * len(shared), 0, 2 * u, 0),
                     (ids1, lab1, 1, 2 * u, len(shared)), (ids2, lab2, 2, 2 * u + 1, len(shared))]
            for ids, labs, br, seq, start in parts:
                n = len(ids)
                input_ids[r, pos:pos + n] = torch.tensor(ids, dtype=torch.long)
                labels[r, pos:pos + n] = torch.tensor(labs, dtype=torch.long)
                position_ids[r, pos:pos + n] = torch.arange(start, start + n)
                example_index[r, pos:pos + n] = seq
                unit_of[r, pos:pos + n] = u
                branch[r, pos:pos + n] = br
                pos += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_unit = (unit_of[:, :, None] == unit_of[:, None, :]) & (unit_of >= 0)[:, :, None]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    eye = torch.eye(length, dtype=torch.bool)
    mask = (causal & same_unit & visible) | eye
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": mask[:, None, :, :], "example_index": example_index}


def collate_units(data: PairData, unit_ids: Sequence[int], rows: Sequence[Sequence[int]] | None, *,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch holding both sequences of every unit in ``unit_ids``.

    Args:
        data: The encoded units.
        unit_ids: Global unit ids of this batch.
        rows: Packed layout: per row, the units it holds, each in the shared-prompt layout of
            :func:`shared_prompt_layout`; None for padded batches (one sequence per row: all first
            sequences, then all seconds).
        pad_id: Padding token id.

    Returns:
        The usual causal-LM batch keys, ``example_index`` holding global sequence ids (-1 on
        padding), ``units`` (P,) and, for KTO, ``desirable`` (P,) bool.
    """
    if rows is not None:
        batch = collate_shared(data, rows, pad_id=pad_id)
    else:
        seqs = data.sequences
        order = [2 * u for u in unit_ids] + [2 * u + 1 for u in unit_ids]
        batch = collate_padded([seqs[i] for i in order], pad_id=pad_id)
        lookup = torch.tensor(order, dtype=torch.long)
        idx = batch["example_index"]
        batch["example_index"] = torch.where(idx >= 0, lookup[idx.clamp(min=0)], idx)
    batch["units"] = torch.tensor(list(unit_ids), dtype=torch.long)
    if data.desirable is not None:
        batch["desirable"] = torch.tensor([data.desirable[u] for u in unit_ids], dtype=torch.bool)
    return batch


def plan_pair_batches(data: PairData, *, split: str, packing: bool, micro_batch_size: int, max_length: int,
                      pad_id: int, seed: int, shuffle: bool) -> PairBatchPlan:
    """Group the train or eval units into micro-batches.

    Packing puts whole units into rows of ``2 * max_length`` tokens (best-fit decreasing) in the
    shared-prompt layout, so a unit's prompt is computed once and its two sides always share a row
    and a micro-batch; ``micro_batch_size`` is rows per micro-batch. Padded batches hold
    ``micro_batch_size`` units (twice as many sequences).
    """
    ids = list(range(data.n_train)) if split == "train" else list(range(data.n_train, len(data.units)))
    if packing:
        lengths = [_unit_length(data, u) for u in ids]
        packed = pack_best_fit_decreasing(lengths, 2 * max_length)
        eff = packing_efficiency(packed, lengths, 2 * max_length) if packed else None
        groups: list[list[int]] = [[ids[i] for i in row] for row in packed]
    else:
        groups, eff = [[u] for u in ids], None
    source = epoch_source(groups, micro_batch_size, seed, shuffle,
                          lambda chunk: collate_units(data, [u for g in chunk for u in g],
                                                      chunk if packing else None, pad_id=pad_id))
    return PairBatchPlan(source, (len(groups) + micro_batch_size - 1) // micro_batch_size, eff)


def count_units(batch: dict) -> int:
    """Units (pairs or KTO examples) in a micro-batch: the loss is normalised per unit."""
    return int(batch["units"].numel())
