"""Batched sampling with a KV cache, used by evaluation, synthesis, RL and serving.

One function, :func:`generate`, takes token-id prompts of different lengths, left-pads them so every
row's last prompt token sits in the same column, runs the prompt once to fill the cache, then decodes
one token per step for the whole batch. Rows stop on an end-of-turn id or a stop string; the batch
stops when every row has. Each result carries its tokens, text, per-token log-probabilities under the
model (temperature 1, before top-k/top-p) and why it stopped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# on_token(prompt_index, token_id) is called for every generated token; returning True ends that
# sequence there (finish_reason "length" unless it stopped anyway). Used for streaming, per-request
# token limits inside a shared batch, and cancelling a sequence whose client went away.
TokenCallback = Callable[[int, int], "bool | None"]


@dataclass
class SamplingConfig:
    """How to pick tokens.

    Attributes:
        max_new_tokens: Upper bound on generated tokens per sequence.
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_k: Keep the k most likely tokens (0 = off).
        top_p: Nucleus sampling: keep the smallest set with cumulative probability >= top_p.
        stop: Stop strings; the text is cut before the first one found.
        seed: Seeds the sampler so results repeat; None draws from torch's global RNG.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    """One generated continuation.

    Attributes:
        token_ids: Generated ids, without the prompt; includes the end-of-turn id when it stopped on one.
        text: Decoded text with special tokens removed and cut before any stop string.
        logprobs: log p(token) under the model for each id in ``token_ids``.
        finish_reason: ``"stop"`` (end-of-turn id or stop string) or ``"length"``.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """End-of-turn ids: the tokenizer's eos plus any eos ids in the model's generation config."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def end_of_turn_ids(tokenizer) -> set[int]:
    """Ids that end an assistant turn under the tokenizer's chat template, plus its eos id.

    Found by rendering a probe reply and reading the special token the template puts right after
    it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...), so models whose end of turn differs from eos
    (Llama 3 instruct formats) stop where training taught them to.
    """
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    mark = "\u2063probe\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects the probe just gives no extra ids
        return ids
    if not isinstance(text, str) or mark not in text:
        return ids
    after = tokenizer.encode(text.split(mark, 1)[1], add_special_tokens=False)[:1]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                 if getattr(t, "special", False)}
    if after and after[0] in special:
        ids.add(int(after[0]))
    return ids


def add_end_of_turn_stops(model, tokenizer) -> set[int]:
    """Make ``model.generation_config`` stop on the template's end of turn (in memory); returns all stops."""
    gen_cfg = getattr(model, "generation_config", None)
    stops = stop_token_ids(tokenizer, model) | end_of_turn_ids(tokenizer)
    if gen_cfg is not None:
        gen_cfg.eos_token_id = sorted(stops) if len(stops) > 1 else next(iter(stops), None)
    return stops


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass *before* it already reaches top_p; the top token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


_REPLY_SPACE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def template_adds_reply_space(tokenizer) -> bool:
    """Whether the tokenizer's chat template puts a space between the generation prompt and the reply
    (Llama 2's "[/INST] ", the demo's ``CHATML_REPLY_SPACE``). Found by rendering a one-turn
    conversation, once per tokenizer."""
    try:
        return _REPLY_SPACE[tokenizer]
    except (KeyError, TypeError):
        pass
    adds = False
    if getattr(tokenizer, "chat_template", None):
        try:
            user = [{"role": "user", "content": "x"}]
            prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "y"}], tokenize=False)
            adds = full.startswith(prompt + " y")
        except Exception:  # a template that needs other roles or fields: assume no space
            adds = False
    try:
        _REPLY_SPACE[tokenizer] = adds
    except TypeError:
        pass
    return adds


def reply_text(tokenizer, ids: list[int]) -> str:
    """The text of generated reply tokens.

    When the chat template puts a space before the reply (see :func:`template_adds_reply_space`), the
    reply's first token carries it (" lantern"); that one space is the template's, not the reply's, so
    it is dropped, as sentencepiece decoding does. Other tokenizers' text is returned as decoded.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text.startswith(" ") and template_adds_reply_space(tokenizer):
        return text[1:]
    return text


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], sampling: SamplingConfig | None = None,
             batch_size: int = 16, on_token: TokenCallback | None = None) -> list[Generation]:
    """Generate a continuation for each prompt.

    Args:
        model: A causal LM (optionally peft-wrapped).
        tokenizer: Its tokenizer (for pad/eos ids and decoding).
        prompts: Token ids per prompt (e.g. from ``data.encode.encode_prompt``).
        sampling: Sampling settings; greedy with 128 new tokens when None.
        batch_size: Prompts per forward pass. Prompts are sorted by length first so each batch
            wastes little padding; results come back in the input order.
        on_token: Optional ``on_token(prompt_index, token_id)`` called as each token is picked (the
            end-of-turn id included); returning True ends that sequence (see ``TokenCallback``).
            :class:`StreamDecoder` turns the ids into text deltas.

    Returns:
        One :class:`Generation` per prompt, in order.
    """
    sampling = sampling or SamplingConfig()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = None
    if sampling.seed is not None:
        gen = torch.Generator(device=device).manual_seed(sampling.seed)
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        row_cb = None if on_token is None else (lambda r, tok, idx=idx: on_token(idx[r], tok))
        for i, g in zip(idx, _generate_batch(model, tokenizer, [prompts[i] for i in idx], sampling,
                                             stops, pad_id, device, gen, row_cb)):
            results[i] = g
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


def _generate_batch(model, tokenizer, prompts, sampling, stops, pad_id, device, gen,
                    on_token=None) -> list[Generation]:
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p, device=device)
        mask[r, width - len(p):] = 1
    # Left padding: positions count real tokens only, so a padded row sees the same positions as
    # it would alone.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        # Only the last position's logits are needed: the full (rows x prompt x vocab) tensor of
        # the prefill would be the largest allocation of the whole call (1.9 GB for 32 x 300 x 49k).
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1)
    except TypeError:  # an architecture without logits_to_keep
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = position_ids[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n
    reason = ["length"] * n
    stop_strings = [s for s in sampling.stop if s]
    alive = list(range(n))  # the input row behind each row of the shrinking batch
    for _ in range(sampling.max_new_tokens):
        raw_logp = torch.log_softmax(logits.float(), dim=-1)
        if sampling.temperature == 0:
            nxt = raw_logp.argmax(-1)
        else:
            filtered = _filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
            nxt = torch.multinomial(torch.softmax(filtered, -1), 1, generator=gen).squeeze(-1)
        picked = raw_logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        for b, (r, tok) in enumerate(zip(alive, nxt.tolist())):
            if done[r]:
                continue
            tokens[r].append(tok)
            logps[r].append(picked[b])
            if tok in stops:
                done[r], reason[r] = True, "stop"
            elif stop_strings:
                # Only the tail can contain a new stop string; decode a window, not the whole text.
                tail = tokenizer.decode(tokens[r][-32:], skip_special_tokens=True)
                if any(s in tail for s in stop_strings):
                    done[r], reason[r] = True, "stop"
            if on_token is not None and on_token(r, tok) and not done[r]:
                done[r] = True  # the caller ended it (its own token limit, or nobody is listening)
        finished = [b for b, r in enumerate(alive) if done[r]]
        if len(finished) == len(alive):
            break
        if len(finished) * 4 >= len(alive):
            # Drop finished rows once they are a quarter of the batch: every later step then costs
            # only what the live rows need (one length-limited reply no longer keeps the whole batch
            # decoding). Selecting rows copies the KV cache once, so it is not done for every row.
            keep = torch.tensor([b for b, r in enumerate(alive) if not done[r]], device=device)
            cache.reorder_cache(keep)
            mask, next_pos, nxt = mask[keep], next_pos[keep], nxt[keep]
            alive = [alive[b] for b in keep.tolist()]
        # Finished rows not yet dropped keep decoding a pad token (their output is ignored) so the
        # batch stays rectangular; nothing reads their results.
        feed = torch.where(torch.tensor([done[r] for r in alive], device=device), torch.full_like(nxt, pad_id), nxt)
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    results = []
    for r in range(n):
        text, hit = _cut_at_stop(reply_text(tokenizer, tokens[r]), stop_strings)
        results.append(Generation(tokens[r], text, logps[r], "stop" if hit else reason[r]))
    return results


class StreamDecoder:
    """Turns one sequence's token ids, as they arrive, into text deltas for streaming.

    The deltas add up to exactly the ``Generation.text`` that :func:`generate` returns: special
    tokens are skipped, text from a stop string on is never shown, and text that could still become
    a stop string (a suffix equal to a stop string's prefix) or an incomplete UTF-8 character is
    held back until the next token settles it.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> tuple[str, bool]:
        return _cut_at_stop(reply_text(self.tokenizer, self.ids), self.stop)

    def _emit(self, safe: str) -> str:
        # Re-decoding can in principle rewrite earlier characters (a tokenizer's clean-up rules);
        # what was sent cannot be taken back, so such a change waits for a stable prefix.
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now certain (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text, hit = self._text()
        if hit:
            self.stopped = True
            return self._emit(text)
        safe = text.rstrip("\ufffd")  # an incomplete multi-byte character decodes as U+FFFD
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(safe)), hold, -1):
                if safe.endswith(s[:k]):
                    hold = k
                    break
        return self._emit(safe[:len(safe) - hold])

    def finish(self) -> str:
        """The held-back rest, once the sequence has ended."""
        return self._emit(self._text()[0])
