"""Batched sampling with a KV cache, used by evaluation, synthesis, RL and serving.

One function, :func:`generate`, takes token-id prompts of different lengths, left-pads them so every
row's last prompt token sits in the same column, runs the prompt once to fill the cache, then decodes
one token per step for the whole batch. Rows stop on an end-of-turn id or a stop string; the batch
stops when every row has. Each result carries its tokens, text, per-token log-probabilities under the
model (temperature 1, before top-k/top-p) and why it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], sampling: SamplingConfig | None = None,
             batch_size: int = 16) -> list[Generation]:
    """Generate a continuation for each prompt.

    Args:
        model: A causal LM (optionally peft-wrapped).
        tokenizer: Its tokenizer (for pad/eos ids and decoding).
        prompts: Token ids per prompt (e.g. from ``data.encode.encode_prompt``).
        sampling: Sampling settings; greedy with 128 new tokens when None.
        batch_size: Prompts per forward pass. Prompts are sorted by length first so each batch
            wastes little padding; results come back in the input order.

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
        for i, g in zip(idx, _generate_batch(model, tokenizer, [prompts[i] for i in idx], sampling,
                                             stops, pad_id, device, gen)):
            results[i] = g
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


def _generate_batch(model, tokenizer, prompts, sampling, stops, pad_id, device, gen) -> list[Generation]:
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p, device=device)
        mask[r, width - len(p):] = 1
    # Left padding: positions count real tokens only, so a padded row sees the same positions as
    # it would alone.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = position_ids[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n
    reason = ["length"] * n
    stop_strings = [s for s in sampling.stop if s]
    for _ in range(sampling.max_new_tokens):
        raw_logp = torch.log_softmax(logits.float(), dim=-1)
        if sampling.temperature == 0:
            nxt = raw_logp.argmax(-1)
        else:
            filtered = _filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
            nxt = torch.multinomial(torch.softmax(filtered, -1), 1, generator=gen).squeeze(-1)
        picked = raw_logp.gather(-1, nxt[:, None]).squeeze(-1)
        for r in range(n):
            if done[r]:
                continue
            tok = int(nxt[r])
            tokens[r].append(tok)
            logps[r].append(float(picked[r]))
            if tok in stops:
                done[r], reason[r] = True, "stop"
            elif stop_strings:
                # Only the tail can contain a new stop string; decode a window, not the whole text.
                tail = tokenizer.decode(tokens[r][-32:], skip_special_tokens=True)
                if any(s in tail for s in stop_strings):
                    done[r], reason[r] = True, "stop"
        if all(done):
            break
        # Finished rows keep decoding a pad token (their output is ignored) so the batch stays
        # rectangular; their attention to it is harmless because nothing reads their results.
        feed = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, pad_id), nxt)
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    results = []
    for r in range(n):
        text = tokenizer.decode(tokens[r], skip_special_tokens=True)
        text, hit = _cut_at_stop(text, stop_strings)
        results.append(Generation(tokens[r], text, logps[r], "stop" if hit else reason[r]))
    return results
