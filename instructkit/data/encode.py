"""Conversations to token ids and loss labels, with the mask taken from the rendered chat template.

How the mask is found, in order of preference:

1. The template marks assistant text with ``{% generation %}`` tags (every built-in does): the
   renderer reports the character span of each tagged block.
2. The template has no tags (most templates shipped with models): render ``messages[:i]`` with the
   generation prompt and ``messages[:i+1]``; the assistant reply is the difference, minus trailing
   whitespace after its end-of-turn token. The template must be prefix-consistent (the first render
   is a prefix of the second), which is also what inference relies on; otherwise this is an error.

Either way the character spans are mapped to tokens through the fast tokenizer's offset mapping of
the whole rendered text, so the mask is exact and no marker string (like "### Response:") is ever
searched for. Labels follow the Hugging Face convention: ``labels[i]`` is the token at position
``i`` and the model shifts; ``labels[0]`` is always ignored, because nothing precedes it, which also
keeps packed examples from predicting across their boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from instructkit.data.errors import DataError
from instructkit.data.templates import has_generation_tags, template_source

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last_assistant", "all")

# A span of rendered text to train on: (start_char, end_char, message_index). message_index is -1
# when a tagged template's blocks cannot be matched one-to-one with assistant messages.
Span = tuple[int, int, int]


@dataclass
class EncodedExample:
    """One tokenized example.

    Attributes:
        input_ids: Token ids of the rendered conversation.
        labels: Same length as ``input_ids``; the token id where the loss applies, else -100.
        file: Data file the example came from (for error messages and previews).
        line: 1-based line or row in ``file``.
        truncated: Whether tokens were cut to fit ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    file: str | None = None
    line: int | None = None
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        """Number of positions that contribute to the loss."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def _where(file) -> str:
    return str(file) if file is not None else "<data>"


def _normalize(messages, file, line, field: str = "messages") -> list[dict]:
    """Check the message list and drop None-valued keys, as ``apply_chat_template`` does."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise DataError(_where(file), line, field, "expected a non-empty list of {role, content} messages",
                        fix="give each record a list of messages with 'role' and 'content'",
                        reason="invalid_messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(_where(file), line, f"{field}[{i}]", f"expected a message object, got {type(m).__name__}",
                            fix="write each message as {\"role\": ..., \"content\": ...}", reason="invalid_messages")
        if not isinstance(m.get("role"), str):
            raise DataError(_where(file), line, f"{field}[{i}].role", "missing or not a string",
                            fix="set role to system, user or assistant", reason="invalid_messages")
        if not isinstance(m.get("content"), str):
            raise DataError(_where(file), line, f"{field}[{i}].content", "missing or not a string",
                            fix="give the message text as a string", reason="invalid_messages")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _render(tokenizer, template: str, messages: list[dict], *, add_generation_prompt: bool = False,
            with_spans: bool = False, file=None, line=None) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's special tokens in scope, as ``apply_chat_template`` does."""
    # render_jinja_template is the renderer behind apply_chat_template; calling it directly gives the
    # text together with the character spans of {% generation %} blocks.
    from jinja2.exceptions import TemplateError as JinjaError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, indices = render_jinja_template(
            conversations=[messages], chat_template=template, return_assistant_tokens_mask=with_spans,
            add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
    except JinjaError as e:
        raise DataError(_where(file), line, "messages", f"the chat template rejected this conversation: {e}",
                        fix="fix the roles/order of the messages or choose another data.template",
                        reason="template_error") from None
    return rendered[0], [tuple(x) for x in indices[0]] if with_spans else []


def _assistant_spans(tokenizer, template: str, messages: list[dict], file=None, line=None) -> tuple[str, list[Span]]:
    """The rendered text and the character spans of every assistant reply (content + end of turn)."""
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if has_generation_tags(template):
        text, blocks = _render(tokenizer, template, messages, with_spans=True, file=file, line=line)
        blocks = [b for b in blocks if b[1] > b[0]]
        if len(blocks) == len(assistant_idx):
            return text, [(s, e, i) for (s, e), i in zip(blocks, assistant_idx)]
        return text, [(s, e, -1) for s, e in blocks]

    text, _ = _render(tokenizer, template, messages, file=file, line=line)
    spans: list[Span] = []
    for i in assistant_idx:
        before, _ = _render(tokenizer, template, messages[:i], add_generation_prompt=True, file=file, line=line)
        upto, _ = _render(tokenizer, template, messages[: i + 1], file=file, line=line)
        # Trailing whitespace after the end-of-turn token belongs to the template's layout, not to
        # what the model must generate (a reply whose template adds no end-of-turn token loses its
        # own trailing whitespace here, which is why built-ins use generation tags instead).
        reply = upto[len(before):].rstrip()
        if not upto.startswith(before) or not text.startswith(before + reply):
            raise DataError(
                _where(file), line, f"messages[{i}]",
                "the chat template is not prefix-consistent (rendering the conversation up to this reply "
                "does not start with the rendered prompt plus generation prompt), so the reply's tokens "
                "cannot be located exactly",
                fix="set data.template to a built-in template (they mark replies with {% generation %} tags) "
                    "or add {% generation %}...{% endgeneration %} around assistant replies in the template",
                reason="template_not_prefix_consistent")
        if reply:
            spans.append((len(before), len(before) + len(reply), i))
    return text, spans


def _bos_to_prepend(tokenizer, ids: list[int]) -> int | None:
    """The BOS id when the tokenizer adds one to plain text but the rendered template did not."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return None
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def _tokenize_with_mask(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of the character ``spans``."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("loss masks need a fast (Rust) tokenizer for character offsets; load it with "
                        "AutoTokenizer.from_pretrained(..., use_fast=True)")
    # The template already contains any special tokens it wants; add_special_tokens=False matches
    # apply_chat_template(tokenize=True).
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = sorted(spans)
    mask = [False] * len(ids)
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        a, b = spans[k]
        # A token straddling the start of a reply (possible only when the tokenizer merges across
        # the template/content boundary) is trained: it is the only way to emit the reply's first
        # characters. Zero-width tokens count when they sit inside the span.
        mask[t] = (s < b and e > a) if e > s else (a <= s < b)
    bos = _bos_to_prepend(tokenizer, ids)
    if bos is not None:
        ids, mask = [bos] + ids, [False] + mask
    return ids, mask


def _labels(ids: list[int], mask: list[bool]) -> list[int]:
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(ids, mask)]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _too_long(file, line, n: int, max_length: int, field: str = "messages",
              fix: str = "raise data.max_length, shorten the example, or set data.truncation: right") -> DataError:
    return DataError(_where(file), line, field, f"example is {n} tokens, longer than max_length {max_length}",
                     fix=fix, reason="too_long")


def encode_messages(tokenizer, messages, *, template: str, train_on: str = "assistant",
                    max_length: int | None = None, truncation: str = "error", file=None,
                    line=None) -> EncodedExample:
    """Render a conversation with a chat template and build its token ids and loss labels.

    Args:
        tokenizer: A fast Hugging Face tokenizer.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        template: Jinja source (e.g. from :func:`~instructkit.data.templates.resolve_template`) or the
            name of a built-in template.
        train_on: ``assistant`` (every assistant reply with its end-of-turn token),
            ``last_assistant`` (only the final reply) or ``all`` (every token but the first).
        max_length: Longest allowed example in tokens; None for no limit.
        truncation: ``error`` (raise for a too-long example) or ``right`` (cut the end).
        file: Source file, for errors.
        line: Source line, for errors.

    Returns:
        The encoded example.

    Raises:
        DataError: Reasons ``invalid_messages``, ``template_error``, ``template_not_prefix_consistent``,
            ``no_targets``, ``too_long`` or ``no_targets_after_truncation``.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got '{train_on}'")
    if truncation not in ("error", "right"):
        raise ValueError(f"truncation must be 'error' or 'right', got '{truncation}'")
    messages = _normalize(messages, file, line)
    template = template_source(template)
    text, spans = _assistant_spans(tokenizer, template, messages, file, line)
    if train_on == "last_assistant" and spans:
        last = max(i for _, _, i in spans)
        if last < 0:
            raise DataError(_where(file), line, "messages",
                            "the chat template's {% generation %} blocks do not match the assistant messages "
                            "one to one, so the last reply cannot be told apart",
                            fix="set data.train_on: assistant or use a built-in template",
                            reason="template_error")
        spans = [s for s in spans if s[2] == last]
    ids, mask = _tokenize_with_mask(tokenizer, text, [(s, e) for s, e, _ in spans])
    if train_on == "all":
        mask = [True] * len(ids)
    labels = _labels(ids, mask)
    ex = EncodedExample(ids, labels, None if file is None else str(file), line)
    if ex.n_targets == 0:
        raise DataError(_where(file), line, "messages", "the example has no tokens to train on "
                        f"(train_on={train_on}; is there an assistant reply?)",
                        fix="add an assistant message or remove the record", reason="no_targets")
    if max_length is not None and len(ids) > max_length:
        if truncation == "error":
            raise _too_long(file, line, len(ids), max_length)
        ex = EncodedExample(ids[:max_length], labels[:max_length], ex.file, line, truncated=True)
        if ex.n_targets == 0:
            raise DataError(_where(file), line, "messages",
                            f"no assistant token is left after truncating to max_length {max_length}",
                            fix="raise data.max_length or shorten the earlier turns",
                            reason="no_targets_after_truncation")
    return ex


def encode_prompt(tokenizer, messages, *, template: str) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt, for sampling.

    Tokenized exactly as in training (same renderer, same BOS rule), so a tuned model sees at
    inference the prefix it was trained on.
    """
    messages = _normalize(messages, None, None)
    text, _ = _render(tokenizer, template_source(template), messages, add_generation_prompt=True)
    ids, _ = _tokenize_with_mask(tokenizer, text, [])
    return ids


def _as_messages(response) -> list:
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if isinstance(response, dict):
        return [response]
    return list(response)


def encode_preference(tokenizer, prompt_messages, chosen_messages, rejected_messages, *, template: str,
                      max_length: int | None = None, truncation: str = "keep_end", file=None,
                      line=None) -> tuple[EncodedExample, EncodedExample]:
    """Encode a preference pair: a shared prompt and two responses, targets on the responses only.

    Args:
        tokenizer: A fast Hugging Face tokenizer.
        prompt_messages: The conversation before the responses (may include earlier assistant turns,
            which are *not* targets).
        chosen_messages: The preferred response: a string, one assistant message, or a list of messages.
        rejected_messages: The dispreferred response, same forms.
        template: Jinja source or a built-in template name.
        max_length: Longest allowed sequence; None for no limit.
        truncation: ``keep_end`` (drop the prompt's beginning and the responses' ends, keeping the
            prompt's end and the responses' starts), ``right`` (cut the end) or ``error``.
        file: Source file, for errors.
        line: Source line, for errors.

    Returns:
        ``(chosen, rejected)``; ``truncated`` is set on whichever was cut.

    Raises:
        DataError: As :func:`encode_messages`; field ``chosen``/``rejected`` for response problems.
    """
    if truncation not in ("keep_end", "right", "error"):
        raise ValueError(f"truncation must be 'keep_end', 'right' or 'error', got '{truncation}'")
    template = template_source(template)
    prompt = _normalize(prompt_messages, file, line, "prompt")
    prompt_text, _ = _render(tokenizer, template, prompt, add_generation_prompt=True, file=file, line=line)

    encoded = []  # (ids, labels, n_prompt_tokens)
    for field, response in (("chosen", chosen_messages), ("rejected", rejected_messages)):
        resp = _normalize(_as_messages(response), file, line, field)
        text, spans = _assistant_spans(tokenizer, template, prompt + resp, file, line)
        if not text.startswith(prompt_text):
            raise DataError(_where(file), line, field,
                            "the chat template is not prefix-consistent: prompt + response does not start "
                            "with the rendered prompt", fix="use a built-in data.template",
                            reason="template_not_prefix_consistent")
        # Only replies rendered after the prompt are targets; earlier assistant turns are context.
        spans = [(s, e) for s, e, _ in spans if s >= len(prompt_text)]
        ids, mask = _tokenize_with_mask(tokenizer, text, spans)
        labels = _labels(ids, mask)
        if all(t == IGNORE_INDEX for t in labels):
            raise DataError(_where(file), line, field, "the response has no assistant tokens to train on",
                            fix="give the response as an assistant message with non-empty content",
                            reason="no_targets")
        n_prompt = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        encoded.append((ids, labels, n_prompt))

    out = []
    longest = max(len(ids) for ids, _, _ in encoded)
    if max_length is not None and longest > max_length:
        if truncation == "error":
            raise _too_long(file, line, longest, max_length,
                            fix="raise data.max_length, shorten the example, or set data.truncation: keep_end")
        # The prompt keeps at least half the budget (its end carries the actual question); the rest
        # goes to the responses, whose beginnings matter most for the preference.
        longest_resp = max(len(ids) - p for ids, _, p in encoded)
        keep_prompt = max(max_length - longest_resp, max_length // 2)
    for field, (ids, labels, n_prompt) in zip(("chosen", "rejected"), encoded):
        truncated = False
        if max_length is not None and longest > max_length:
            if truncation == "keep_end" and n_prompt > keep_prompt:
                cut = n_prompt - keep_prompt
                ids, labels, truncated = ids[cut:], labels[cut:], True
            if len(ids) > max_length:
                ids, labels, truncated = ids[:max_length], labels[:max_length], True
            labels = list(labels)
            labels[0] = IGNORE_INDEX
        ex = EncodedExample(list(ids), list(labels), None if file is None else str(file), line, truncated)
        if ex.n_targets == 0:
            raise DataError(_where(file), line, field,
                            f"no response token is left after truncating to max_length {max_length}",
                            fix="raise data.max_length or shorten the prompt", reason="no_targets_after_truncation")
        out.append(ex)
    return out[0], out[1]


def render_spans(tokenizer, encoded: EncodedExample) -> list[tuple[str, bool]]:
    """Split an example into consecutive ``(text, trained)`` runs, for ``instructkit data preview``.

    Each run of tokens with the same trained/ignored state is decoded as one piece, special tokens
    included, so concatenating the texts gives back the rendered conversation.
    """
    out: list[tuple[str, bool]] = []
    start = 0
    flags = [t != IGNORE_INDEX for t in encoded.labels]
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            text = tokenizer.decode(encoded.input_ids[start:i], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            out.append((text, flags[start]))
            start = i
    return out
