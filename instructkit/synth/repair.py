"""Deterministic repairs of a sampled reply for IFEval constraints that a rewrite can meet without new content.

Rejection sampling only keeps what the model already does now and then. For a small model some
constraints are (almost) never met by chance: all-lowercase or all-capital replies, a reply wrapped
in double quotes, a fixed closing phrase, repeating the request first, paragraphs separated by
``***``. Each of these is a pure formatting change of an otherwise good reply, so the reply can be
rewritten to meet it and then verified like any other sample (``best-of-n --repair``); the kept
record lists which repairs were applied. Constraints that need new content (a title, a postscript,
keywords, counts of bullets or sections) are never repaired.

A repair is applied only when its instruction fails, in a fixed order chosen so later repairs keep
earlier ones intact: paragraphs, then the repeated request (prefix), the closing phrase (suffix),
letter case (the other checks compare case-insensitively), and the quotation marks last.
"""

from __future__ import annotations

from collections.abc import Callable

from instructkit.evaluate.ifeval import text as iftext
from instructkit.evaluate.ifeval.checks import bind


def _paragraphs(reply: str, num_paragraphs: int, **_) -> str | None:
    """Regroup the reply's sentences into ``num_paragraphs`` paragraphs separated by ``***``."""
    flat = " ".join(part.strip() for part in reply.replace("***", "\n").split("\n") if part.strip())
    sentences = iftext.split_sentences(flat)
    if len(sentences) < num_paragraphs:
        return None
    size, extra = divmod(len(sentences), num_paragraphs)
    groups, start = [], 0
    for k in range(num_paragraphs):
        end = start + size + (k < extra)
        groups.append(" ".join(sentences[start:end]))
        start = end
    return "\n\n***\n\n".join(groups)


def _repeat_prompt(reply: str, prompt_to_repeat: str, **_) -> str:
    return f"{prompt_to_repeat.strip()}\n\n{reply.strip()}"


def _end_phrase(reply: str, end_phrase: str, **_) -> str:
    return f"{reply.rstrip()} {end_phrase.strip()}"


def _lower(reply: str, **_) -> str:
    return reply.lower()


def _upper(reply: str, **_) -> str:
    return reply.upper()


def _quote(reply: str, **_) -> str:
    return '"' + reply.strip().strip('"').strip() + '"'


#: Repairable instruction ids, in the order repairs are applied.
REPAIRS: dict[str, Callable[..., str | None]] = {
    "length_constraints:number_paragraphs": _paragraphs,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_phrase,
    "change_case:english_lowercase": _lower,
    "change_case:english_capital": _upper,
    "startend:quotation": _quote,
}


def repair(reply: str, instruction_ids: list[str], kwargs: list[dict]) -> tuple[str, list[str]]:
    """Rewrite ``reply`` to meet the repairable instructions it fails.

    Args:
        reply: The sampled reply.
        instruction_ids, kwargs: The record's IFEval instructions and their arguments.

    Returns:
        ``(text, repaired_ids)``: the (possibly) rewritten reply and the ids whose repair was applied.
        The caller still verifies every instruction on the result.
    """
    if not reply.strip():
        return reply, []
    bound = {iid: (bind(iid, kw), kw) for iid, kw in zip(instruction_ids, kwargs)}
    applied = []
    for iid, fix in REPAIRS.items():
        if iid not in bound:
            continue
        ins, kw = bound[iid]
        if ins.follows(reply):
            continue
        new = fix(reply, **{k: v for k, v in kw.items() if v is not None})
        if new is not None and new != reply:
            reply = new
            applied.append(iid)
    return reply, applied
