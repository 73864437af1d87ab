"""Packing examples into fixed-capacity rows, and collating packed or padded batches.

Packing puts several short examples into one row so compute is not spent on padding. Examples in a
row must not see each other: the packed batch carries an explicit block-diagonal causal attention
mask (4D, True = may attend) and position ids that restart at 0 for each example. Hugging Face Llama
with SDPA does not infer the blocks from position ids alone, so the mask is what makes a packed row
compute exactly what each example would compute alone. Each example's ``labels[0]`` is -100 (see
:mod:`instructkit.data.encode`), so no position predicts the first token of the next example.

Padding is always identified by the attention mask / ``example_index``, never by comparing ids with
``pad_id``: many tokenizers use their eos token as pad, and eos is a training target.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

from instructkit.data.encode import IGNORE_INDEX, EncodedExample


def pack_best_fit_decreasing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bin-pack example indices into rows of ``max_length`` tokens, best fit decreasing.

    Items are placed longest first (ties: lower index first), each into the open row with the least
    room that still fits it (ties: the older row), else into a new row. Deterministic.

    Rows are found through a sorted list of the distinct remaining capacities (at most
    ``max_length`` values) with a min-heap of row ids per capacity, so each placement costs
    O(log n) plus a short list insert: 100k examples pack in a fraction of a second.

    Args:
        lengths: Token count of each example.
        max_length: Row capacity.

    Returns:
        Rows, each a list of example indices in placement order; every index appears exactly once.

    Raises:
        ValueError: A length is negative or longer than ``max_length``.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for i, n in enumerate(lengths):
        if n < 0 or n > max_length:
            raise ValueError(f"example {i} has length {n}, which does not fit rows of max_length {max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    caps: list[int] = []  # sorted distinct remaining capacities (> 0) that some row has
    rows_with_cap: dict[int, list[int]] = {}  # capacity -> min-heap of row ids
    for i in order:
        n = lengths[i]
        k = bisect_left(caps, n)
        if k < len(caps):
            cap = caps[k]
            heap = rows_with_cap[cap]
            r = heapq.heappop(heap)
            if not heap:
                del rows_with_cap[cap]
                caps.pop(k)
        else:
            r, cap = len(rows), max_length
            rows.append([])
        rows[r].append(i)
        left = cap - n
        if left > 0:
            if left in rows_with_cap:
                heapq.heappush(rows_with_cap[left], r)
            else:
                rows_with_cap[left] = [r]
                insort(caps, left)
    return rows


def packing_efficiency(rows: Sequence[Sequence[int]], lengths: Sequence[int], max_length: int) -> float:
    """Fraction of row capacity filled with real tokens: total tokens / (rows x max_length)."""
    if not rows:
        return 0.0
    used = sum(lengths[i] for row in rows for i in row)
    return used / (len(rows) * max_length)


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return -(-n // multiple) * multiple


def collate_packed(examples: Sequence[EncodedExample], rows: Sequence[Sequence[int]],
                   max_length: int | None = None, *, pad_id: int,
                   pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """Build one batch from packed rows.

    Args:
        examples: All encoded examples; ``rows`` index into it.
        rows: The rows of this batch (lists of example indices), e.g. from
            :func:`pack_best_fit_decreasing`.
        max_length: Row capacity; when given, a longer row is an error and rounding up to
            ``pad_to_multiple_of`` never exceeds it.
        pad_id: Token id written at padding positions (only for the ids; padding is marked by the
            mask and ``example_index``).
        pad_to_multiple_of: Round the batch length up to a multiple of this (tensor-core friendly,
            fewer distinct shapes); None to pad only to the longest row.

    Returns:
        ``input_ids`` (B, L) long; ``labels`` (B, L) long, -100 on padding and ignored positions;
        ``position_ids`` (B, L) long, restarting at 0 for each example (0 on padding);
        ``attention_mask`` (B, 1, L, L) bool, block-diagonal causal, True = may attend, padding
        positions attend only to themselves (so no softmax row is empty and nothing becomes NaN);
        ``example_index`` (B, L) long, the index into ``examples`` of each position's example, -1 on
        padding; ``seq_lens`` (B, K) long, the lengths of the examples of each row in order,
        zero-filled to the most examples in a row (K).
    """
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    row_lens = [sum(len(examples[i].input_ids) for i in row) for row in rows]
    longest = max(row_lens)
    if max_length is not None and longest > max_length:
        raise ValueError(f"a packed row has {longest} tokens, more than max_length {max_length}")
    length = _round_up(longest, pad_to_multiple_of)
    if max_length is not None:
        length = min(length, max_length)
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    example_index = torch.full((b, length), -1, dtype=torch.long)
    seq_lens = torch.zeros((b, max(len(r) for r in rows)), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for k, i in enumerate(row):
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[r, pos:pos + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[r, pos:pos + n] = torch.tensor(ex.labels, dtype=torch.long)
            position_ids[r, pos:pos + n] = torch.arange(n)
            example_index[r, pos:pos + n] = i
            seq_lens[r, k] = n
            pos += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": block_causal_mask(example_index),
        "example_index": example_index,
        "seq_lens": seq_lens,
    }


def block_causal_mask(example_index: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, L, L), True = may attend, from per-position example ids.

    Position i attends to j when both belong to the same example and j <= i. Padding (id -1) attends
    only to itself: a fully masked row would make softmax produce NaN, which would then leak into
    gradients through the (ignored) padding logits.
    """
    length = example_index.shape[1]
    same = example_index[:, :, None] == example_index[:, None, :]
    real = (example_index >= 0)[:, :, None]
    causal = torch.ones(length, length, dtype=torch.bool, device=example_index.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=example_index.device)
    return ((same & real & causal) | eye)[:, None, :, :]


def collate_padded(examples: Sequence[EncodedExample], pad_id: int, *,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Build a right-padded batch, one example per row.

    Args:
        examples: The examples of this batch.
        pad_id: Token id written at padding positions (padding is marked by ``attention_mask``).
        pad_to_multiple_of: Round the batch length up to a multiple of this; None for the longest.

    Returns:
        ``input_ids`` (B, L), ``labels`` (B, L) with -100 on padding, ``attention_mask`` (B, L)
        long (1 = real token), ``position_ids`` (B, L) counting from 0, and ``example_index`` (B, L):
        the row's index within ``examples``, -1 on padding.
    """
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    length = _round_up(max(len(e.input_ids) for e in examples), pad_to_multiple_of)
    b = len(examples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    example_index = torch.full((b, length), -1, dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[r, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[r, :n] = 1
        example_index[r, :n] = r
    # Right padding: real tokens sit at 0..n-1 in every row, so plain arange positions are correct;
    # padding positions get positions too but are masked out and carry no labels.
    position_ids = torch.arange(length, dtype=torch.long).expand(b, length).clone()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "example_index": example_index,
    }
