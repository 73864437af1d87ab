"""Instruction-data formats: detect them, convert records to one canonical form, validate, load.

Every format people keep instruction data in is turned into one of three plain-dict forms, so that
the rest of instructkit never looks at a source format again:

* SFT: ``{"messages": [{"role", "content"}, ...]}`` with roles ``system``/``user``/``assistant``,
  ending with an assistant turn.
* Preference: ``{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}``
  where ``prompt`` is the shared conversation, ending with the user turn both replies answer.
* KTO (unpaired): ``{"prompt": [messages], "completion": [assistant message], "label": bool}``.

Each also carries ``_file``, ``_line`` and ``_format`` so later stages (templating, truncation) can
still point at the source line. Validation happens here, once, with errors that name the field as it
is spelled in the user's file (``conversations[3].from``), because that is where the fix is made.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from instructkit.data.errors import DataError, SkipReport
from instructkit.data.readers import json_type_name, read_records

FORMATS = ("alpaca", "sharegpt", "messages", "dolly", "prompt_completion", "preference", "hh_rlhf",
           "kto")
SFT_FORMATS = ("alpaca", "sharegpt", "messages", "dolly", "prompt_completion")
PREFERENCE_FORMATS = ("preference", "hh_rlhf")
# Preference pairs also feed KTO: each pair becomes a desirable and an undesirable example.
KIND_FORMATS = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "kto": ("kto",) + PREFERENCE_FORMATS}

#: Keys a record must have for each format (used to check a forced ``data.format``).
REQUIRED_KEYS = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "dolly": ("instruction", "response"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),  # prompt may be implied by full chosen/rejected conversations
    "hh_rlhf": ("chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
#: One line per format for error messages that list what is supported.
FORMAT_HELP = {
    "alpaca": "instruction + output (optional input, system)",
    "sharegpt": "conversations: [{from, value}, ...] (optional system)",
    "messages": "messages: [{role, content}, ...]",
    "dolly": "instruction + response (optional context, category)",
    "prompt_completion": "prompt + completion",
    "preference": "prompt + chosen + rejected (strings or message lists)",
    "hh_rlhf": "chosen + rejected transcripts made of '\\n\\nHuman:' and '\\n\\nAssistant:' turns",
    "kto": "prompt + completion + label (true/false)",
}

#: Speaker names seen in ShareGPT exports and OpenAI-style files, mapped to canonical roles.
ROLE_MAP = {
    "system": "system", "developer": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}
_ALLOWED_ROLES = ("user (or human), assistant (or gpt, chatgpt, bing, bard, model), "
                  "system (or developer)")
_HH_HUMAN, _HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


class _Turn(NamedTuple):
    """A message plus where it came from in the source record, for error messages."""

    role: str
    content: str
    field: str       # the field holding the text, e.g. "conversations[3].value"
    role_field: str  # the field that decided the role, e.g. "conversations[3].from"


class _Ctx(NamedTuple):
    file: str | Path
    line: int | None

    def error(self, field: str | None, problem: str, fix: str, reason: str) -> DataError:
        return DataError(self.file, self.line, field, problem, fix, reason=reason)


# --- Detection ----------------------------------------------------------------------------------

def detect_format(record: dict) -> str | None:
    """Name the format of one record from its keys, or None when no format fits.

    Keys whose value is null count as absent, because Parquet and ``datasets`` fill every column in
    every row. The checks go from the most to the least specific key set, so that e.g. a KTO record
    (prompt, completion, label) is not taken for prompt/completion.

    Args:
        record: One raw record.

    Returns:
        One of :data:`FORMATS`, or None.
    """
    if not isinstance(record, dict):
        return None
    has = {k for k, v in record.items() if v is not None}
    if "chosen" in has or "rejected" in has:
        if "prompt" in has:
            return "preference"
        if not {"chosen", "rejected"} <= has:
            return None
        chosen, rejected = record["chosen"], record["rejected"]
        if isinstance(chosen, list) and isinstance(rejected, list):
            return "preference"  # full conversations; the shared prompt is implied
        text = chosen if isinstance(chosen, str) else rejected
        if isinstance(text, str) and "Human:" in text and "Assistant:" in text:
            return "hh_rlhf"
        return None
    if {"prompt", "completion"} <= has:
        return "kto" if "label" in has else "prompt_completion"
    if "conversations" in has:
        return "sharegpt"
    if "messages" in has:
        return "messages"
    if "instruction" in has:
        if "output" in has:
            return "alpaca"
        if "response" in has:
            return "dolly"
    return None


def _sample(path: str | Path, sample: int) -> list[tuple[int, dict]]:
    """The first ``sample`` readable records; unreadable lines are left for the real pass to report."""
    scratch = SkipReport()
    rows = []
    for line, record in read_records(path, on_error="skip", report=scratch):
        rows.append((line, record))
        if len(rows) >= sample:
            break
    if not rows:
        if len(scratch):
            next(iter(read_records(path)), None)  # re-read strictly: raises the first bad line
        raise DataError(path, None, None, "the file holds no records",
                        "check that this is the right file and that it is not empty",
                        reason="empty_file")
    return rows


def detect_file_format(path: str | Path, sample: int = 50) -> str:
    """Detect a file's format from its first records.

    Records that fit no format are ignored here (normalisation reports them with their line), so
    one odd record does not hide the format of the rest.

    Args:
        path: Data file or ``save_to_disk`` folder.
        sample: How many records to look at.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        DataError: When the records fit no format or several, listing the keys seen, the supported
            formats and how to force one with ``data.format``.
    """
    rows = _sample(path, sample)
    found: dict[str, list[int]] = {}
    for line, record in rows:
        fmt = detect_format(record)
        if fmt is not None:
            found.setdefault(fmt, []).append(line)
    if len(found) == 1:
        return next(iter(found))
    supported = "; ".join(f"{name}: {FORMAT_HELP[name]}" for name in FORMATS)
    if found:
        mix = ", ".join(f"{fmt} ({len(lines)} records, e.g. line {lines[0]})"
                        for fmt, lines in found.items())
        raise DataError(path, None, None, f"the first {len(rows)} records mix formats: {mix}",
                        "keep one format per file (list several files in data.train), or force one "
                        "with the config key data.format", reason="ambiguous_format")
    keys = Counter(k for _, record in rows for k in record)
    seen = ", ".join(f"{k} ({n}x)" for k, n in keys.most_common(20))
    raise DataError(path, None, None,
                    f"cannot tell the data format: the first {len(rows)} records have the keys "
                    f"[{seen}]. Supported formats and their keys: {supported}",
                    "rename the fields to match one of these formats, or force one with the config "
                    "key data.format (e.g. data.format=alpaca)", reason="unknown_format")


# --- Field access -------------------------------------------------------------------------------

def _require(ctx: _Ctx, container: dict, key: str, field: str):
    value = container.get(key)
    if value is None:
        state = "is null" if key in container else "is missing"
        keys = ", ".join(sorted(container)) or "none"
        raise ctx.error(field, f"required field {state} (the record has: {keys})",
                        f"add '{key}' to the record, or check that data.format is right",
                        "missing_field")
    return value


def _as_text(ctx: _Ctx, value, field: str) -> str:
    """A message text; OpenAI-style lists of text parts are joined, anything else is rejected."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for j, part in enumerate(value):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ctx.error(f"{field}[{j}]", f"content part of type {part.get('type')!r} is not "
                                "supported (only text parts are)",
                                'keep only {"type": "text", "text": ...} parts', "wrong_type")
            texts.append(part["text"])
        return "".join(texts)
    raise ctx.error(field, f"expected a string, got a JSON {json_type_name(value)}",
                    "make this field a string (numbers must be quoted too)", "wrong_type")


def _system_turns(ctx: _Ctx, record: dict) -> list[_Turn]:
    """The optional top-level ``system`` field as a leading system turn."""
    if record.get("system") is None:
        return []
    return [_Turn("system", _as_text(ctx, record["system"], "system"), "system", "system")]


def _parse_messages(ctx: _Ctx, value, field: str) -> list[_Turn]:
    """A list of ``{from, value}`` (ShareGPT) or ``{role, content}`` (OpenAI) messages."""
    if not isinstance(value, list):
        raise ctx.error(field, f"expected a list of messages, got a JSON {json_type_name(value)}",
                        f'make \'{field}\' a list like [{{"role": "user", "content": "..."}}, ...]',
                        "wrong_type")
    sharegpt = field == "conversations"
    turns = []
    for i, item in enumerate(value):
        here = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise ctx.error(here, f"expected a message object, got a JSON {json_type_name(item)}",
                            "write each message as an object with a role and a text", "wrong_type")
        # Arrow-backed rows carry every struct key; a null one is an absent one.
        keys = {k for k, v in item.items() if v is not None}
        role_key = "from" if "from" in keys else "role" if "role" in keys else None
        if role_key is None:
            name = "from" if sharegpt else "role"
            raise ctx.error(f"{here}.{name}", "the message has no speaker ('from' or 'role')",
                            f"add \"{name}\": \"user\" or \"assistant\"", "missing_field")
        content_key = "value" if "value" in keys else "content" if "content" in keys else None
        if content_key is None:
            name = "value" if role_key == "from" else "content"
            raise ctx.error(f"{here}.{name}", "the message has no text (missing or null)",
                            f"add the message text as \"{name}\"", "missing_field")
        raw_role = item[role_key]
        if not isinstance(raw_role, str):
            raise ctx.error(f"{here}.{role_key}", f"expected a string, got a JSON {json_type_name(raw_role)}",
                            f"use one of: {_ALLOWED_ROLES}", "wrong_type")
        role = ROLE_MAP.get(raw_role.strip().lower())
        if role is None:
            raise ctx.error(f"{here}.{role_key}", f"unknown role {raw_role!r}",
                            f"use one of: {_ALLOWED_ROLES}; tool and function turns are not supported",
                            "unknown_role")
        content = _as_text(ctx, item[content_key], f"{here}.{content_key}")
        turns.append(_Turn(role, content, f"{here}.{content_key}", f"{here}.{role_key}"))
    return turns


def _plain(turns: list[_Turn]) -> list[dict]:
    return [{"role": t.role, "content": t.content} for t in turns]


# --- Validation ---------------------------------------------------------------------------------

def _check_turns(ctx: _Ctx, turns: list[_Turn], field: str, end: str, what: str) -> None:
    """Check texts and turn order: optional system first, then user/assistant alternating.

    Args:
        turns: The turns, in order.
        field: The field naming the whole list, for errors about the list as a whole.
        end: The role the list must end with: ``"assistant"`` for an SFT conversation (there must be
            a reply to learn), ``"user"`` for a preference or KTO prompt (the replies answer it).
        what: ``"conversation"`` or ``"prompt"``, used in messages.
    """
    if not turns:
        raise ctx.error(field, f"the {what} has no messages",
                        "add a user turn (and, for SFT, the assistant's reply)", "empty_content")
    for i, t in enumerate(turns, 1):
        if not t.content.strip() and t.role == "system":
            raise ctx.error(t.field, "the system prompt is empty or whitespace only",
                            "give the system prompt its text, or remove it (an empty system turn "
                            "still adds template tokens)", "empty_content")
        if not t.content.strip():
            raise ctx.error(t.field, f"the {t.role} turn is empty or whitespace only",
                            "write the text of this turn, or remove the record", "empty_content")
        if t.role == "system" and i > 1:
            raise ctx.error(t.role_field, f"a system turn may only come first (found at turn {i})",
                            "move the system text into the first turn; a top-level 'system' field "
                            "counts as that first turn", "bad_order")
    dialogue = [(i, t) for i, t in enumerate(turns, 1) if t.role != "system"]
    if not dialogue:
        raise ctx.error(field, f"the {what} has only a system turn",
                        "add the user turn and the assistant's reply", "bad_order")
    if dialogue[0][1].role != "user":
        raise ctx.error(dialogue[0][1].role_field,
                        f"the {what} starts with an assistant turn; it must start with a user turn",
                        "add the user message the assistant answers, or remove the leading "
                        "assistant turn", "bad_order")
    for (_, prev), (i, cur) in zip(dialogue, dialogue[1:]):
        if prev.role == cur.role:
            other = "assistant" if cur.role == "user" else "user"
            raise ctx.error(cur.role_field, f"turns {i - 1} and {i} are both {cur.role} turns",
                            f"merge them into one turn, or add the missing {other} turn between them",
                            "bad_order")
    last = turns[-1]
    if end == "assistant" and last.role != "assistant":
        raise ctx.error(last.role_field, f"the {what} ends with a {last.role} turn, so there is no "
                        "reply to train on", "add the assistant's reply, or remove the trailing "
                        f"{last.role} turn", "not_ending_with_assistant")
    if end == "user" and last.role != "user":
        raise ctx.error(last.role_field, f"the {what} ends with an {last.role} turn; it must end "
                        "with the user turn that the replies answer",
                        "move the final assistant turn out of the prompt (into the replies), or "
                        "remove it", "bad_order")


def _check_reply(ctx: _Ctx, turns: list[_Turn], field: str) -> None:
    """A reply (chosen, rejected, completion) is exactly one non-empty assistant message."""
    if not turns:
        raise ctx.error(field, "the reply is empty (no messages)", "give the assistant's reply",
                        "empty_content")
    for t in turns:
        if t.role != "assistant":
            raise ctx.error(t.role_field, f"the reply holds a {t.role} turn; '{field}' must hold only "
                            "the assistant's reply", f"put the earlier turns in 'prompt' and keep "
                            f"only the assistant message in '{field}'", "bad_order")
    if len(turns) > 1:
        raise ctx.error(turns[1].role_field, f"'{field}' holds {len(turns)} assistant messages in a row",
                        "join them into one assistant message", "bad_order")
    if not turns[0].content.strip():
        raise ctx.error(turns[0].field, f"the reply in '{field}' is empty or whitespace only",
                        "write the reply, or remove the record", "empty_content")


# --- Per-format conversion ----------------------------------------------------------------------

def _instruction_turns(ctx: _Ctx, record: dict, extra_key: str, answer_key: str) -> list[_Turn]:
    """Alpaca (input/output) and Dolly (context/response): instruction [+ blank line + extra]."""
    instruction = _as_text(ctx, _require(ctx, record, "instruction", "instruction"), "instruction")
    answer = _as_text(ctx, _require(ctx, record, answer_key, answer_key), answer_key)
    extra = record.get(extra_key)
    extra = "" if extra is None else _as_text(ctx, extra, extra_key)
    if not instruction.strip():
        raise ctx.error("instruction", "the instruction is empty or whitespace only",
                        "write the instruction, or remove the record", "empty_content")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = _system_turns(ctx, record)
    turns += [_Turn("user", user, "instruction", "instruction"),
              _Turn("assistant", answer, answer_key, answer_key)]
    return turns


def _text_or_messages(ctx: _Ctx, record: dict, key: str, role: str) -> list[_Turn]:
    """A field that is either one string (one ``role`` message) or a list of messages."""
    value = _require(ctx, record, key, key)
    if isinstance(value, str):
        return [_Turn(role, value, key, key)]
    return _parse_messages(ctx, value, key)


def _sft(ctx: _Ctx, record: dict, fmt: str) -> dict:
    if fmt == "alpaca":
        turns, field = _instruction_turns(ctx, record, "input", "output"), "instruction"
    elif fmt == "dolly":
        turns, field = _instruction_turns(ctx, record, "context", "response"), "instruction"
    elif fmt in ("sharegpt", "messages"):
        field = "conversations" if fmt == "sharegpt" else "messages"
        turns = _system_turns(ctx, record) + _parse_messages(
            ctx, _require(ctx, record, field, field), field)
    else:  # prompt_completion: strings, or TRL's conversational message lists
        field = "prompt"
        turns = (_system_turns(ctx, record) + _text_or_messages(ctx, record, "prompt", "user")
                 + _text_or_messages(ctx, record, "completion", "assistant"))
    _check_turns(ctx, turns, field, end="assistant", what="conversation")
    return {"messages": _plain(turns)}


def _split_reply(ctx: _Ctx, record: dict, side: str) -> tuple[list[_Turn] | None, list[_Turn]]:
    """Split chosen/rejected into (conversation before the reply or None, the reply)."""
    turns = _text_or_messages(ctx, record, side, "assistant")
    k = len(turns)
    while k > 0 and turns[k - 1].role == "assistant":
        k -= 1
    if turns and k == len(turns):
        raise ctx.error(turns[-1].role_field, f"'{side}' ends with a {turns[-1].role} turn, not the "
                        "assistant reply being judged", f"end '{side}' with the assistant's reply",
                        "not_ending_with_assistant")
    return (turns[:k] or None), turns[k:]


def _first_difference(a: list[_Turn], b: list[_Turn]) -> str:
    for i, (x, y) in enumerate(zip(a, b), 1):
        if (x.role, x.content) != (y.role, y.content):
            return f"turn {i} differs: {x.role} {x.content[:40]!r} vs {y.role} {y.content[:40]!r}"
    return f"one has {len(a)} turns, the other {len(b)}"


def _preference(ctx: _Ctx, record: dict) -> dict:
    """Explicit prompt, or the prompt implied by chosen/rejected written as full conversations."""
    system = _system_turns(ctx, record)
    explicit = (_text_or_messages(ctx, record, "prompt", "user")
                if record.get("prompt") is not None else None)
    (pre_c, reply_c), (pre_r, reply_r) = (_split_reply(ctx, record, "chosen"),
                                          _split_reply(ctx, record, "rejected"))
    candidates = [(name, turns) for name, turns in
                  (("prompt", explicit), ("chosen", pre_c), ("rejected", pre_r)) if turns is not None]
    if not candidates:
        raise ctx.error("prompt", "required field is missing and 'chosen'/'rejected' hold only the "
                        "replies, so there is no prompt", "add 'prompt' (a string or a message list), "
                        "or write chosen/rejected as full conversations", "missing_field")
    base_name, base = candidates[0]
    for name, turns in candidates[1:]:
        if [(t.role, t.content) for t in turns] != [(t.role, t.content) for t in base]:
            raise ctx.error(name, f"the conversation in '{name}' does not repeat '{base_name}' before "
                            f"its reply ({_first_difference(turns, base)})",
                            f"make '{name}' repeat the prompt exactly, or give only the assistant's "
                            f"reply in '{name}'", "mismatched_prompt")
    prompt = system + base
    _check_turns(ctx, prompt, base_name, end="user", what="prompt")
    return _pair(ctx, prompt, reply_c, reply_r)


def _pair(ctx: _Ctx, prompt: list[_Turn], chosen: list[_Turn], rejected: list[_Turn]) -> dict:
    _check_reply(ctx, chosen, "chosen")
    _check_reply(ctx, rejected, "rejected")
    # Replies that differ only in surrounding whitespace still carry no preference signal.
    if [t.content.strip() for t in chosen] == [t.content.strip() for t in rejected]:
        raise ctx.error("rejected", "'chosen' and 'rejected' are the same reply, so the pair carries "
                        "no preference", "replace one of the replies, or remove the pair",
                        "identical_pair")
    return {"prompt": _plain(prompt), "chosen": _plain(chosen), "rejected": _plain(rejected)}


def _hh_transcript(ctx: _Ctx, record: dict, side: str) -> str:
    text = _require(ctx, record, side, side)
    if not isinstance(text, str):
        raise ctx.error(side, f"expected a transcript string, got a JSON {json_type_name(text)}",
                        "write the transcript as one string of '\\n\\nHuman: ...' and "
                        "'\\n\\nAssistant: ...' turns (or use the 'preference' format)", "wrong_type")
    # Some copies drop the blank line before the first turn; it carries no meaning.
    text = "\n\n" + text if text.startswith("Human:") else text
    if not text.startswith(_HH_HUMAN):
        raise ctx.error(side, f"the transcript does not start with '\\n\\nHuman:' (it starts "
                        f"{text[:40]!r})", "begin the transcript with '\\n\\nHuman: ' followed by "
                        "the first user message", "bad_transcript")
    return text


def _hh_turns(ctx: _Ctx, text: str, side: str) -> list[_Turn]:
    """Parse a transcript prefix into turns, dropping the one space that follows each marker."""
    parts = _HH_MARKER.split(text)  # parts[0] is "" since _hh_transcript checked the start
    turns = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        turns.append(_Turn(role, body[1:] if body.startswith(" ") else body, side, side))
    return turns


def _hh_rlhf(ctx: _Ctx, record: dict) -> dict:
    """Anthropic hh-rlhf: two full transcripts that share everything before the last reply."""
    texts = {side: _hh_transcript(ctx, record, side) for side in ("chosen", "rejected")}
    prefixes, replies = {}, {}
    for side, text in texts.items():
        cut = text.rfind(_HH_ASSISTANT)
        if cut < 0:
            raise ctx.error(side, "the transcript has no '\\n\\nAssistant:' turn, so there is no reply",
                            "end the transcript with '\\n\\nAssistant: ' and the reply", "bad_transcript")
        prefixes[side] = text[:cut]
        reply = text[cut + len(_HH_ASSISTANT):]
        replies[side] = [_Turn("assistant", reply[1:] if reply.startswith(" ") else reply, side, side)]
    if prefixes["chosen"] != prefixes["rejected"]:
        a, b = prefixes["chosen"], prefixes["rejected"]
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        longer = a if a[k:] else b
        turn = max(1, sum(m.start() <= k for m in _HH_MARKER.finditer(longer)))
        a_rest, b_rest = (repr(x[k:k + 50]) if x[k:] else "nothing more (its final reply starts here)"
                          for x in (a, b))
        raise ctx.error("rejected", "'chosen' and 'rejected' differ before their last "
                        f"'\\n\\nAssistant:' reply (from character {k}, turn {turn}: chosen has "
                        f"{a_rest}, rejected has {b_rest}), so they share no prompt",
                        "make both transcripts identical up to the last '\\n\\nAssistant:' so they "
                        "differ only in the final reply (often one reply itself contains an "
                        "'\\n\\nAssistant:' marker), or remove the pair", "mismatched_prompt")
    prompt = _hh_turns(ctx, prefixes["chosen"], "chosen")
    _check_turns(ctx, prompt, "chosen", end="user", what="prompt")
    return _pair(ctx, prompt, replies["chosen"], replies["rejected"])


def _kto(ctx: _Ctx, record: dict) -> dict:
    prompt = _system_turns(ctx, record) + _text_or_messages(ctx, record, "prompt", "user")
    completion = _text_or_messages(ctx, record, "completion", "assistant")
    label = _require(ctx, record, "label", "label")
    if not isinstance(label, bool):
        raise ctx.error("label", f"expected true or false, got {label!r}",
                        "set label to true for a desirable completion and false for an undesirable "
                        "one", "wrong_type")
    _check_turns(ctx, prompt, "prompt", end="user", what="prompt")
    _check_reply(ctx, completion, "completion")
    return {"prompt": _plain(prompt), "completion": _plain(completion), "label": label}


def normalize(record: dict, fmt: str, file: str | Path, line: int | None) -> dict:
    """Convert one raw record to its canonical form, validating it on the way.

    Args:
        record: The raw record as read from the file.
        fmt: One of :data:`FORMATS`, or ``"auto"`` to detect this record's format.
        file: Source file, for errors and the ``_file`` key.
        line: Source line (or row), for errors and the ``_line`` key.

    Returns:
        The canonical SFT, preference or KTO dict (see the module docstring) with ``_file``,
        ``_line`` and ``_format``.

    Raises:
        DataError: With the offending ``field``, a ``fix`` and a ``reason`` among ``missing_field``,
            ``wrong_type``, ``empty_content``, ``unknown_role``, ``bad_order``,
            ``not_ending_with_assistant``, ``identical_pair``, ``bad_transcript``,
            ``mismatched_prompt`` and ``unknown_format``.
        ValueError: For a ``fmt`` that is not a format name.
    """
    ctx = _Ctx(file, line)
    if not isinstance(record, dict):
        raise ctx.error(None, f"the record is a JSON {json_type_name(record)}, not an object",
                        "write each record as a JSON object", "not_object")
    if fmt == "auto":
        fmt = detect_format(record)
        if fmt is None:
            raise ctx.error(None, f"the record's keys {sorted(record)} match no format",
                            "use the keys of one format: " + "; ".join(
                                f"{n}: {FORMAT_HELP[n]}" for n in FORMATS), "unknown_format")
    if fmt in SFT_FORMATS:
        body = _sft(ctx, record, fmt)
    elif fmt == "preference":
        body = _preference(ctx, record)
    elif fmt == "hh_rlhf":
        body = _hh_rlhf(ctx, record)
    elif fmt == "kto":
        body = _kto(ctx, record)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    body.update(_file=str(file), _line=line, _format=fmt)
    return body


# --- Loading ------------------------------------------------------------------------------------

_KIND_TEXT = {"sft": "SFT conversations", "preference": "preference pairs (prompt, chosen, rejected)",
              "kto": "KTO examples (prompt, completion, label)"}
_KIND_FIX = {"sft": "use method: sft for this file",
             "preference": "use method: dpo (or another preference method such as orpo or kto) for "
                           "this file",
             "kto": "use method: kto for this file"}


def _check_kind(path: str | Path, fmt: str, kind: str) -> None:
    if fmt in KIND_FORMATS[kind]:
        return
    has = "sft" if fmt in SFT_FORMATS else "kto" if fmt == "kto" else "preference"
    fix = _KIND_FIX[has]
    if kind == "sft" and has == "preference":
        fix += ", or convert the pairs to conversations (prompt + chosen reply) to fine-tune on them"
    raise DataError(path, None, None, f"the file holds {_KIND_TEXT[has]} (format '{fmt}'), but this "
                    f"run trains on {_KIND_TEXT[kind]}", fix, reason="wrong_kind")


def _check_forced_format(path: str | Path, fmt: str) -> None:
    """A forced ``data.format`` must at least fit the keys of some of the first records."""
    rows = _sample(path, 50)
    needed = REQUIRED_KEYS[fmt]
    if any(all(r.get(k) is not None for k in needed) for _, r in rows):
        return
    looks = Counter(detect_format(r) for _, r in rows).most_common(1)[0][0]
    hint = f"; they look like '{looks}'" if looks else ""
    raise DataError(path, None, None, f"data.format is '{fmt}', which needs {FORMAT_HELP[fmt]}, but "
                    f"none of the first {len(rows)} records has the keys {list(needed)}{hint}",
                    f"set data.format to {looks!r} or 'auto'" if looks else
                    "set data.format to the file's format, or 'auto'", reason="format_mismatch")


def iter_normalized(path: str | Path, fmt: str, on_error: str,
                    report: SkipReport) -> Iterator[tuple[int | None, dict, dict]]:
    """Stream ``(line, raw record, canonical record)`` from one file in a known format.

    Every record read is counted in ``report.total_seen``; a bad record raises (``on_error="raise"``)
    or is added to ``report`` and skipped.
    """
    for line, record in read_records(path, on_error=on_error, report=report):
        report.total_seen += 1
        try:
            canonical = normalize(record, fmt, path, line)
        except DataError as err:
            if on_error == "raise":
                raise
            report.add(err)
            continue
        yield line, record, canonical


def load_examples(paths: str | Path | Iterable[str | Path], format: str = "auto",
                  on_error: str = "raise", kind: str = "sft",
                  report: SkipReport | None = None) -> list[dict]:
    """Read, detect, validate and normalise one or more data files.

    Args:
        paths: A file or ``save_to_disk`` folder, or a list of them; records keep file order.
        format: ``"auto"`` to detect each file's format, or one of :data:`FORMATS` to force it.
        on_error: ``"raise"`` raises the first bad record; ``"skip"`` adds every bad record (and bad
            line) to ``report`` and keeps going. Whole-file problems (missing file, unknown format,
            data of the wrong kind) raise either way, since skipping them would drop a whole file.
        kind: What the run trains on: ``"sft"`` (alpaca, sharegpt, messages, dolly,
            prompt_completion), ``"preference"`` (preference, hh_rlhf) or ``"kto"`` (kto; preference
            pairs are split into a ``label=True`` chosen and a ``label=False`` rejected example).
        report: Receives skipped records and counts every record seen in ``total_seen``. If None, a
            private report is used and a warning summarises any skips, so none go unnoticed.

    Returns:
        Canonical records (see the module docstring), in file and line order.

    Raises:
        DataError: The first bad record under ``on_error="raise"``, or a whole-file problem.
        ValueError: For an unknown ``format``, ``on_error`` or ``kind``.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, not {format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if kind not in KIND_FORMATS:
        raise ValueError(f"kind must be one of {tuple(KIND_FORMATS)}, not {kind!r}")
    private = report is None
    report = SkipReport() if report is None else report
    out: list[dict] = []
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths):
        if format == "auto":
            fmt = detect_file_format(path)
        else:
            _check_forced_format(path, format)
            fmt = format
        _check_kind(path, fmt, kind)
        for _, _, example in iter_normalized(path, fmt, on_error, report):
            if kind == "kto" and fmt != "kto":
                meta = {k: example[k] for k in ("_file", "_line", "_format")}
                out.append({"prompt": example["prompt"], "completion": example["chosen"],
                            "label": True, **meta})
                out.append({"prompt": example["prompt"], "completion": example["rejected"],
                            "label": False, **meta})
            else:
                out.append(example)
    if private and len(report):
        warnings.warn(report.summary(), stacklevel=2)
    return out
