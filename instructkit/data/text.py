"""Plain-text corpora for causal-LM (pre)training: documents -> one token stream -> full rows.

A ``.txt`` file holds one document per line; a ``.jsonl`` file holds objects with a ``text`` field.
Documents are joined with a separator token and cut into rows of exactly ``max_length`` tokens, the
standard layout for language-model training (no padding, every token is a target). For corpora of
short independent documents (one fact per line), :func:`document_examples` keeps each document
whole instead, for packed rows with block-diagonal attention (``data.documents: separate``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from instructkit.data.errors import DataError


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text corpus; blank lines are skipped (they carry no text)."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, None, None, "file not found", "check data.train")
    docs = []
    with open(p, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if p.suffix == ".jsonl":
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(p, n, None, f"invalid JSON ({e.msg})", "one JSON object per line",
                                        reason="invalid_json") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise DataError(p, n, "text", "missing or not a string",
                                        'each line needs {"text": "..."}', reason="missing_field")
                    docs.append(rec["text"])
                else:
                    docs.append(line.rstrip("\n"))
        except UnicodeDecodeError as e:
            raise DataError(p, None, None, f"not UTF-8 ({e.reason} at byte {e.start})",
                            "re-encode the file as UTF-8", reason="invalid_utf8") from None
    return docs


def separator_id(tokenizer) -> int:
    """Document separator: <|endoftext|> when the tokenizer has it, else eos."""
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
        return tid
    return tokenizer.eos_token_id


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    sep = separator_id(tokenizer)
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(sep)
    return ids


def document_examples(tokenizer, docs: list[str], max_length: int) -> list:
    """Each document (plus the separator) as one example, cut into pieces of at most ``max_length``
    tokens; every token is a target except each piece's first (nothing before it to predict it from).
    Packed with :func:`instructkit.data.pipeline.plan_batches`, a document attends only to itself and
    its positions start at 0, as in SFT, instead of running on from the previous document."""
    from instructkit.data.encode import IGNORE_INDEX, EncodedExample

    sep = separator_id(tokenizer)
    out = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids = enc + [sep]
        for s in range(0, len(ids), max_length):
            piece = ids[s:s + max_length]
            if len(piece) > 1:
                out.append(EncodedExample(input_ids=piece, labels=[IGNORE_INDEX] + piece[1:]))
    if not out:
        raise DataError("<corpus>", None, None, "the corpus has no document of two tokens or more",
                        "add text to data.train", reason="empty")
    return out


def document_batches(tokenizer, docs: list[str], max_length: int, micro_batch_size: int, seed: int,
                     shuffle: bool):
    """:func:`document_examples` packed into rows of ``max_length`` (block-diagonal attention, positions
    from 0): ``(BatchPlan, token count)``. Padding uses the pad token, else eos."""
    from instructkit.data.pipeline import plan_batches

    examples = document_examples(tokenizer, docs, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = plan_batches(examples, packing=True, micro_batch_size=micro_batch_size, max_length=max_length,
                        pad_id=pad, seed=seed, shuffle=shuffle)
    return plan, sum(len(e.input_ids) for e in examples)


def chunk_rows(stream: list[int], max_length: int) -> torch.Tensor:
    """(n_rows, max_length) rows; the incomplete tail is dropped (at most max_length-1 tokens)."""
    n = len(stream) // max_length
    if n == 0:
        raise DataError("<corpus>", None, None, f"the corpus has {len(stream)} tokens, fewer than one "
                        f"row of max_length {max_length}", "lower data.max_length or add text",
                        reason="empty")
    return torch.tensor(stream[: n * max_length], dtype=torch.long).view(n, max_length)


def lm_batches(rows: torch.Tensor, micro_batch_size: int, seed: int, shuffle: bool):
    """Per-epoch micro-batches of full rows (labels = inputs; the loss shifts by one)."""

    def source(epoch: int) -> list[dict]:
        order = list(range(rows.shape[0]))
        if shuffle:
            random.Random(seed * 1000003 + epoch).shuffle(order)
        out = []
        for s in range(0, len(order), micro_batch_size):
            x = rows[order[s:s + micro_batch_size]]
            out.append({"input_ids": x, "labels": x.clone()})
        return out

    return source, (rows.shape[0] + micro_batch_size - 1) // micro_batch_size
