"""Shared pieces of curation: streaming canonical records, the texts inside them, normalisation.

Every curation tool looks at records through :func:`iter_examples` (read, detect, validate and
normalise one file as a stream, keeping the raw record for output) and :func:`record_text` (which
turns any canonical form, SFT messages, preference pair or KTO example, into prompt and response
texts). Text comparison always goes through :func:`normalize_text`, so that case, Unicode forms,
punctuation and spacing never hide a duplicate or a contaminated item.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from instructkit.data.errors import DataError, SkipReport
from instructkit.data.formats import FORMATS, detect_file_format, iter_normalized

# \w keeps letters and digits of every script; everything else (punctuation, symbols, "_") splits words.
_NON_WORD = re.compile(r"[\W_]+")


def normalize_text(text: str) -> str:
    """Lower-case (casefold), NFKC, punctuation and symbols as spaces, single spaces, stripped."""
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def words(text: str) -> list[str]:
    """The normalised words of a text."""
    return normalize_text(text).split()


@dataclass
class RecordText:
    """The texts of one canonical record.

    Attributes:
        prompt: Texts of the turns before the reply (system, user, earlier assistant turns).
        responses: The reply texts: the last assistant turn; chosen then rejected for a preference
            pair; the completion for a KTO example.
        instruction: The first user turn (the request a person typed), for leading-verb statistics.
    """

    prompt: list[str]
    responses: list[str]
    instruction: str

    @property
    def reply(self) -> str:
        """The reply a model should learn (the chosen one for a pair)."""
        return self.responses[0]

    @property
    def all(self) -> list[str]:
        return self.prompt + self.responses

    def select(self, field: str) -> list[str]:
        """``all``, ``prompt`` or ``response`` texts."""
        if field == "all":
            return self.all
        if field == "prompt":
            return self.prompt
        if field == "response":
            return self.responses
        raise ValueError(f"field must be 'all', 'prompt' or 'response', not {field!r}")


def record_text(example: dict) -> RecordText:
    """Prompt and response texts of a canonical record (see :mod:`instructkit.data.formats`)."""
    if "messages" in example:
        msgs = example["messages"]
        prompt_msgs, replies = msgs[:-1], [msgs[-1]["content"]]
    elif "chosen" in example:
        prompt_msgs = example["prompt"]
        replies = [m["content"] for m in example["chosen"]] + [m["content"] for m in example["rejected"]]
    else:  # kto
        prompt_msgs = example["prompt"]
        replies = [m["content"] for m in example["completion"]]
    first_user = next((m["content"] for m in prompt_msgs if m["role"] == "user"), "")
    return RecordText([m["content"] for m in prompt_msgs], replies, first_user)


def prompt_and_reply(example: dict) -> tuple[list[dict], dict]:
    """The conversation before the reply and the reply message (chosen for a pair)."""
    if "messages" in example:
        return example["messages"][:-1], example["messages"][-1]
    if "chosen" in example:
        return example["prompt"], example["chosen"][0]
    return example["prompt"], example["completion"][0]


@dataclass
class Example:
    """One valid record as read from a file: where it is, the raw record and its canonical form."""

    file: str
    line: int
    raw: dict
    canonical: dict


def resolve_format(path: str | Path, format: str = "auto") -> str:
    """The file's format: detected from its first records, or the forced one checked to exist."""
    if format == "auto":
        return detect_file_format(path)
    if format not in FORMATS:
        raise DataError(path, None, None, f"unknown format {format!r}",
                        f"use 'auto' or one of {', '.join(FORMATS)}", reason="unknown_format")
    return format


def iter_examples(path: str | Path, format: str = "auto", on_error: str = "skip",
                  report: SkipReport | None = None) -> Iterator[Example]:
    """Stream the valid records of one file, validated and normalised, keeping the raw record.

    Args:
        path: A data file or ``save_to_disk`` folder.
        format: ``auto`` or a format name (see :data:`instructkit.data.formats.FORMATS`).
        on_error: ``skip`` adds bad lines and invalid records to ``report`` and goes on; ``raise``
            raises the first one.
        report: Counts every record seen (``total_seen``) and keeps every skipped one.

    Raises:
        DataError: For whole-file problems (missing, unknown format), or any bad record with
            ``on_error="raise"``.
    """
    report = SkipReport() if report is None else report
    fmt = resolve_format(path, format)
    for line, raw, canonical in iter_normalized(path, fmt, on_error, report):
        yield Example(str(path), line, raw, canonical)


def leading_word(instruction: str) -> str | None:
    """The first word of a request, past politeness ("please", "can you", "I want you to")."""
    w = words(instruction)
    while w:
        if w[0] in ("please", "kindly", "now", "hi", "hello", "hey"):
            w = w[1:]
        elif w[:2] in (["can", "you"], ["could", "you"], ["would", "you"], ["will", "you"]):
            w = w[2:]
        elif w[:4] == ["i", "want", "you", "to"] or w[:4] == ["i", "need", "you", "to"]:
            w = w[4:]
        elif w[:3] == ["i", "d", "like"]:
            w = w[3:]
        else:
            break
    return w[0] if w else None


def preview(text: str, n: int = 100) -> str:
    """One line of at most ``n`` characters, for reports."""
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def write_invalid_rows(fh, skips: SkipReport) -> None:
    """One report row per record that failed validation (rule ``invalid``), with its reason and error."""
    for r in skips.records:
        fh.write(json.dumps({"file": r.file, "line": r.line, "rule": "invalid", "reason": r.reason,
                             "field": r.field, "error": r.message}, ensure_ascii=False) + "\n")


def finish_result(res, skips: SkipReport, t0: float):
    """Fill a dedup/decontamination result's counts, skip summary and elapsed seconds; return it."""
    res.seen, res.skipped = skips.total_seen, len(skips)
    res.skip_summary = skips.summary() if len(skips) else ""
    res.seconds = round(time.perf_counter() - t0, 2)
    return res
