"""Scoring with a trained reward model: conversations, preference files, and best-of-n candidates.

A reward folder is what ``method: reward`` writes to ``final/``: a Hugging Face sequence-classification
model (or a peft adapter over one) plus the tokenizer with the training chat template. Each
(prompt, reply) is encoded exactly as one side of a training pair (same template rendering and
truncation), and the score is the head's output at the last token, plus ``reward_logprob_coef`` x the
reply's log-probability when the model was trained with that term (recorded in ``instructkit.json``; an
untied LM head is read from ``lm_head.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from instructkit.data.encode import encode_preference
from instructkit.data.errors import DataError
from instructkit.data.formats import detect_file_format, load_examples
from instructkit.data.packing import collate_padded
from instructkit.models import (ModelError, last_token_scores, load_tokenizer, peft_base, pick_device, resolve_dtype,
                                set_logprob_term, ties_embeddings)


def load_reward_model(path: str | Path):
    """``(model, tokenizer)`` from a reward folder (full model or LoRA adapter), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    from instructkit.config import ModelConfig
    from instructkit.gguf import resolve_model_path

    path = Path(resolve_model_path(path))
    if not path.exists():
        raise ModelError(f"reward model folder not found: {path}")
    device = pick_device()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    adapter_cfg = path / "adapter_config.json"
    base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"] if adapter_cfg.exists() else str(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=resolve_dtype("auto", device))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a reward model from '{base}': {e}") from None
    if adapter_cfg.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
    if model.config.num_labels != 1:
        raise ModelError(f"'{path}' has {model.config.num_labels} output labels; a reward model has 1 "
                         f"(train one with method: reward)")
    model = model.to(device).eval()
    info_file = path / "instructkit.json"
    coef = float(json.loads(info_file.read_text()).get("reward_logprob_coef") or 0.0) if info_file.exists() else 0.0
    if coef:
        head_file = path / "lm_head.safetensors"
        if head_file.exists():
            from safetensors.torch import load_file

            weight = load_file(str(head_file))["weight"].to(device)
        elif ties_embeddings(model):
            weight = peft_base(model).get_input_embeddings().weight
        else:
            raise ModelError(f"'{path}' was trained with reward_logprob_coef {coef:g} but its LM head "
                             f"'{head_file.name}' is missing and the model does not tie its embeddings; "
                             f"copy the file from the training run's final/ folder or retrain")
        set_logprob_term(model, coef, weight)
    return model, tokenizer


def split_last_reply(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(prompt, reply)``: a conversation cut before its final run of assistant messages."""
    cut = len(messages)
    while cut > 0 and messages[cut - 1]["role"] == "assistant":
        cut -= 1
    return messages[:cut], messages[cut:]


@torch.no_grad()
def score_responses(model, tokenizer, prompts: list[list[dict]], responses: list, *, max_length: int = 1024,
                    batch_size: int = 16) -> list[float]:
    """Reward of each (prompt, response), encoded exactly as reward training encodes a pair's side.

    Args:
        prompts: Conversations up to the reply (ending with a user turn).
        responses: Replies: strings or lists of assistant messages.
        max_length: Longer sequences keep the prompt's end and the response's start, as in training.
    """
    device = next(model.parameters()).device
    encoded = [encode_preference(tokenizer, p, r, r, template=tokenizer.chat_template, max_length=max_length)[0]
               for p, r in zip(prompts, responses)]
    scores: list[float] = []
    for s in range(0, len(encoded), batch_size):
        batch = collate_padded(encoded[s:s + batch_size], pad_id=tokenizer.pad_token_id)
        seq_ids, vals = last_token_scores(model, {k: v.to(device) for k, v in batch.items()})
        scores.extend(float(v) for v in vals[torch.argsort(seq_ids)].cpu())
    return scores


def score_file(model, tokenizer, path: str | Path, out: str | Path, *, max_length: int = 1024,
               on_error: str = "raise") -> dict:
    """Score every record of ``path`` and write them with scores to ``out`` (JSONL).

    Preference files (and hh-rlhf) get ``reward_chosen`` and ``reward_rejected`` per pair and a
    pairwise accuracy; conversation files get ``reward`` per conversation.

    Returns:
        A summary: counts, mean reward(s) and, for pairs, ``pairwise_accuracy``.
    """
    fmt = detect_file_format(path)
    paired = fmt in ("preference", "hh_rlhf")
    records = load_examples(path, on_error=on_error, kind="preference" if paired else "sft")
    if not records:
        raise DataError(path, None, None, "no usable records to score", "check the file", reason="empty")
    rows = []
    if paired:
        prompts = [r["prompt"] for r in records]
        chosen = score_responses(model, tokenizer, prompts, [r["chosen"] for r in records], max_length=max_length)
        rejected = score_responses(model, tokenizer, prompts, [r["rejected"] for r in records],
                                   max_length=max_length)
        for r, c, j in zip(records, chosen, rejected):
            rows.append({"line": r["_line"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                         "reward_chosen": c, "reward_rejected": j})
        summary = {"kind": "pairs", "n": len(rows),
                   "pairwise_accuracy": sum(c > j for c, j in zip(chosen, rejected)) / len(rows),
                   "mean_reward_chosen": sum(chosen) / len(rows), "mean_reward_rejected": sum(rejected) / len(rows)}
    else:
        parts = [split_last_reply(r["messages"]) for r in records]
        scores = score_responses(model, tokenizer, [p for p, _ in parts], [r for _, r in parts],
                                 max_length=max_length)
        rows = [{"line": r["_line"], "messages": r["messages"], "reward": s} for r, s in zip(records, scores)]
        summary = {"kind": "conversations", "n": len(rows), "mean_reward": sum(scores) / len(rows)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"file": str(path), "format": fmt, **summary}
