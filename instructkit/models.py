"""Load and save Hugging Face causal LMs and tokenizers; LoRA/QLoRA via peft; the target forward.

``trust_remote_code`` is off unless the config turns it on, weights are written as safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from instructkit.config import LoraConfig, ModelConfig
from instructkit.losses import sequence_logprob_sums, token_logprobs, token_nll_sum


class ModelError(RuntimeError):
    """The model cannot be loaded or configured as asked."""


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions, where bf16 matmuls beat fp32.

    AMX tiles (Intel Sapphire Rapids and later) run them several times faster; AVX512-BF16 dot products
    (AMD Zen 4 and later, Intel Cooper Lake) about 2.5x on a 1024x1024 matmul and 1.65x on a whole training
    step of the demo's 3.8M model (bench/RESULTS.md). Elsewhere bf16 is emulated and slower than fp32,
    so fp32 stays the CPU default.
    """
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe and probe():
                return True
        except RuntimeError:
            continue
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on a GPU that supports it and fp32 elsewhere.

    CPUs keep fp32 under 'auto' even with native bf16: results then match across machines. On such a CPU,
    ``bfloat16`` for inference and ``train.bf16: true`` for training are the fast settings.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    from instructkit.gguf import resolve_model_path

    path = resolve_model_path(cfg.name_or_path)  # a .gguf file becomes its cached Hugging Face folder
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except OSError as e:
        raise ModelError(f"cannot load a tokenizer from '{cfg.name_or_path}': {e}. Check "
                         f"model.name_or_path (a local folder, or a hub id with network access); "
                         f"`instructkit tiny-model --out DIR` builds a local test model") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"the tokenizer of '{cfg.name_or_path}' is not a fast tokenizer; loss masks "
                         f"need token offsets. Install `tokenizers` and use a model with tokenizer.json")
    if tok.pad_token is None:
        # A separate pad id is not required: padding is identified by masks, never by comparing ids.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, lora: LoraConfig, device: torch.device, n_tokens: int | None = None,
               reward_head: bool = False, pad_token_id: int | None = None):
    """Load the causal LM (dequantised or 4-bit for QLoRA), optionally wrap it with LoRA adapters.

    Args:
        cfg: The ``model`` section.
        lora: The ``lora`` section.
        device: Target device.
        n_tokens: If given and larger than the embedding table (tokens added for a template),
            the embeddings are resized.
        reward_head: Load the backbone with a scalar sequence-classification head (a reward model:
            ``AutoModelForSequenceClassification``, ``num_labels=1``) instead of the LM head.
        pad_token_id: Written into the config (sequence-classification models need one).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from instructkit.gguf import resolve_model_path

    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                  attn_implementation=cfg.attn_implementation)
    if lora.quantize_4bit:
        if device.type != "cuda":
            raise ModelError("lora.quantize_4bit (QLoRA) needs a CUDA GPU with bitsandbytes; this "
                             "machine has none. Set lora.quantize_4bit: false to train LoRA in "
                             "full precision on CPU")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError("QLoRA needs bitsandbytes: pip install 'instructkit[qlora]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    if reward_head:
        kwargs.update(num_labels=1, pad_token_id=pad_token_id)
    auto = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(resolve_model_path(cfg.name_or_path), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a {'reward model backbone' if reward_head else 'causal LM'} from "
                         f"'{cfg.name_or_path}': {e}") from None
    if n_tokens is not None and n_tokens > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(n_tokens)
    if not lora.quantize_4bit:
        model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora.enabled:
        model = apply_lora(model, lora, gradient_checkpointing=cfg.gradient_checkpointing,
                           task_type="SEQ_CLS" if reward_head else "CAUSAL_LM")
    return model


def peft_base(model):
    """The model inside a peft wrapper (adapters stay live in its modules), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def ties_embeddings(model) -> bool:
    """Whether the model's output head is its input embedding table (looking through a peft wrapper)."""
    return bool(getattr(peft_base(model).config, "tie_word_embeddings", False))


def output_head_weight(model, cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """The (V, H) output projection that belongs to a reward model's backbone.

    A sequence-classification model drops the causal LM's head. With tied embeddings (the demo's
    models, SmolLM2, small Qwen2) the head *is* the input embedding table: it is returned live and
    trains with the backbone. Otherwise the causal LM's head is loaded once from
    ``cfg.name_or_path`` and kept frozen; :func:`save_final` callers store it beside the reward model
    (``lm_head.safetensors``) so scoring uses the same weights.
    """
    base = peft_base(model)
    embeddings = base.get_input_embeddings().weight
    if ties_embeddings(model):
        return embeddings
    from transformers import AutoModelForCausalLM

    from instructkit.gguf import resolve_model_path

    causal = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.name_or_path), dtype=embeddings.dtype,
                                                  trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if causal.get_output_embeddings().weight.shape[0] < embeddings.shape[0]:  # tokens added for a template
        causal.resize_token_embeddings(embeddings.shape[0])
    weight = causal.get_output_embeddings().weight.detach()[:embeddings.shape[0]].clone().to(device)
    del causal
    return weight


def apply_lora(model, lora: LoraConfig, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora.quantize_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # With frozen embeddings no input requires grad, and checkpointed blocks would then
        # produce no gradient for the adapters.
        model.enable_input_require_grads()
    targets = lora.target_modules
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=targets, bias="none", task_type=task_type)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ModelError(f"lora.target_modules={targets!r} does not fit this model: {e}. Use "
                         f"'all-linear' or names of its linear layers (e.g. q_proj, v_proj)") from None


def load_for_inference(model_dir: str | Path, adapter: str | Path | None = None, template: str | None = None,
                       dtype: str = "auto"):
    """Model (+ optional LoRA adapter on top) and tokenizer for evaluation or chat, in eval mode.

    ``model_dir`` may be a GGUF file (converted once, see :mod:`instructkit.gguf`). The tokenizer
    comes from the adapter folder when given: instructkit saves the training chat
    template there. ``template`` forces a built-in template for models that have none. ``dtype`` is
    the weight dtype (see :func:`resolve_dtype`; ``bfloat16`` decodes about 1.9x faster on an AMX CPU).
    """
    from transformers import AutoModelForCausalLM

    from instructkit.data.templates import resolve_template
    from instructkit.gguf import resolve_model_path

    model_dir = resolve_model_path(model_dir)  # a .gguf file becomes its cached Hugging Face folder
    device = pick_device()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(adapter or model_dir)))
    if template:
        tokenizer.chat_template = resolve_template(tokenizer, template)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype, device)).to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).to(device)
    model.eval()
    return model, tokenizer


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _decoder_and_head(model):
    """The transformer body and the output projection, looking through a peft wrapper."""
    base = peft_base(model)
    return base, base.get_decoder(), base.get_output_embeddings()


def target_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at target positions only, and their target ids.

    The output projection (hidden x vocab) is the most expensive matmul of a small model; running it
    only where a label exists skips prompt and padding positions entirely.

    Args:
        model: A causal LM (optionally peft-wrapped; adapters are live inside the base modules).
        batch: ``input_ids``, ``labels`` (-100 = ignore), optional ``attention_mask``
            (2D padding mask or 4D boolean block mask) and ``position_ids``.

    Returns:
        ``(logits, targets)``: (N, V) logits predicting each of the N target tokens, and (N,) ids.
    """
    base, decoder, head = _decoder_and_head(model)
    return _logits_at_targets(base, _hidden_states(base, decoder, batch), batch["labels"], head)


def _hidden_states(base, decoder, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states for a padded or packed batch."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4 and "flash" in str(getattr(base.config, "_attn_implementation", "")):
        # FlashAttention kernels take no dense mask: transformers derives varlen boundaries from
        # position ids restarting at 0, which is exactly how packed rows are laid out.
        mask = None
    return decoder(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state


def _logits_at_targets(base, hidden: torch.Tensor, labels: torch.Tensor,
                       project) -> tuple[torch.Tensor, torch.Tensor]:
    """``project`` (hidden -> vocab) applied only where a label exists, with the model's logit softcap."""
    select = labels[:, 1:] != -100  # position t predicts token t+1
    logits = project(hidden[:, :-1][select])
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, labels[:, 1:][select]


def nll_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the batch's target tokens, and how many there are."""
    logits, targets = target_logits(model, batch)
    return token_nll_sum(logits, targets), int(targets.numel())


def _unit_positions(batch: dict, seq_ids: torch.Tensor) -> torch.Tensor:
    """Map global sequence ids to columns of a (P, 2) per-unit table (``2u`` -> 0, ``2u + 1`` -> 1)."""
    units = batch["units"].to(seq_ids.device)
    wanted = torch.stack([2 * units, 2 * units + 1], dim=1).flatten()  # (2P,)
    order = torch.argsort(wanted)
    slot = torch.searchsorted(wanted[order], seq_ids)
    found = wanted[order][slot.clamp(max=wanted.numel() - 1)]
    if not torch.equal(found, seq_ids):
        raise ValueError("the batch holds sequences of units not listed in batch['units']")
    return order[slot]


def unit_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities of both sequences of every unit in a pair batch.

    Log-probabilities are computed only at target positions and chunk by chunk (see
    :func:`instructkit.losses.token_logprobs`), never as a full-vocabulary log-softmax of the batch.

    Args:
        model: Causal LM (optionally peft-wrapped).
        batch: A batch from :mod:`instructkit.data.pairs` (``units``, global ``example_index``).

    Returns:
        ``(sums, counts)``, both (P, 2): column 0 the first sequence (chosen / completion), column 1
        the second (rejected / mismatched completion); counts are response token counts.
    """
    logits, targets = target_logits(model, batch)
    select = batch["labels"][:, 1:] != -100
    seq_ids = batch["example_index"][:, 1:][select]
    cols = _unit_positions(batch, seq_ids)
    n = 2 * batch["units"].numel()
    sums = sequence_logprob_sums(token_logprobs(logits, targets), cols, n).view(-1, 2)
    counts = torch.zeros(n, dtype=torch.float32, device=sums.device).index_add(
        0, cols, torch.ones_like(cols, dtype=torch.float32)).view(-1, 2)
    return sums, counts


LOGPROB_TERM = "_instructkit_logprob_term"  # attribute of a reward model's base: (coef, (V, H) head weight)


def set_logprob_term(model, coef: float, head_weight: torch.Tensor) -> None:
    """Add ``coef`` x the reply's summed log-probability to every score of this reward model.

    The backbone of a reward model is a causal LM that often already ranks a correct reply above a
    wrong one by its own likelihood; the scalar head alone, trained from a few thousand pairs, can
    lose that (bench/RESULTS.md, "Reward model: the backbone's own likelihood as a prior"). With
    the term, the score is ``head(h_last) + coef * sum_t log p(reply_t | prefix)`` where the
    log-probabilities use ``head_weight`` as the output projection, computed in the same forward
    pass. See :func:`output_head_weight`.
    """
    base = peft_base(model)
    setattr(base, LOGPROB_TERM, (float(coef), head_weight))


def last_token_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar scores of every sequence in a batch from a sequence-classification (reward) model.

    The score head reads the hidden state of each sequence's last token (found from
    ``example_index``), which works for padded and packed rows alike; Hugging Face's own pooling
    handles only right padding with a distinct pad id. A model given a log-probability term
    (:func:`set_logprob_term`) adds ``coef`` x the summed log-probability of the sequence's target
    tokens (``labels`` != -100: the reply) from the same hidden states.

    Returns:
        ``(seq_ids, scores)``: the ``example_index`` value of each sequence and its float32 score.
    """
    base = peft_base(model)
    hidden = _hidden_states(base, base.get_decoder(), batch)
    idx = batch["example_index"]
    nxt = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)
    last = (idx >= 0) & (idx != nxt)  # the last position of each sequence
    seq_ids, scores = idx[last], base.score(hidden[last]).float().squeeze(-1)
    term = getattr(base, LOGPROB_TERM, None)
    if term is None or not term[0]:
        return seq_ids, scores
    coef, weight = term
    logits, targets = _logits_at_targets(base, hidden, batch["labels"], lambda h: h @ weight.to(h.dtype).t())
    order = torch.argsort(seq_ids)
    target_seq = idx[:, 1:][batch["labels"][:, 1:] != -100]
    slot = order[torch.searchsorted(seq_ids[order], target_seq)]  # each target token's place in ``scores``
    return seq_ids, scores + coef * sequence_logprob_sums(token_logprobs(logits, targets), slot, scores.numel())


def unit_rewards(model, batch: dict) -> torch.Tensor:
    """Rewards (P, 2) of both sequences of every unit in a pair batch (see :func:`last_token_scores`)."""
    seq_ids, scores = last_token_scores(model, batch)
    cols = _unit_positions(batch, seq_ids)
    out = torch.zeros(2 * batch["units"].numel(), dtype=scores.dtype, device=scores.device)
    return out.index_put((cols,), scores).view(-1, 2)


@torch.no_grad()
def mean_nll(model, batches) -> float:
    """Token-weighted mean NLL over batches (held-out loss), on the model's device, in eval mode."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        loss, n = nll_sum(model, {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()})
        total, count = total + float(loss), count + n
    return total / max(1, count)


def save_final(model, tokenizer, out: Path, lora: LoraConfig, extra_info: dict | None = None,
               extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``out`` as a Hugging Face folder (full model) or a peft adapter folder (LoRA).

    The tokenizer is saved alongside with the chat template used in training, so inference renders
    prompts exactly as training did. With ``lora.merge_on_save`` the merged model is also written to
    ``out/merged``. ``extra_tensors`` maps file names to tensors saved with safetensors beside the
    model (a reward model's frozen LM head). Under torchrun every rank must call it (FSDP2 gathers
    the shards); only rank 0 writes.
    """
    from instructkit import distributed

    out = Path(out)
    # Under FSDP2 the weights are sharded: every rank joins the gather, rank 0 writes.
    full = distributed.full_state_dict(model)
    if not distributed.is_main_process():
        return out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": full} if full is not None else {}))
    tokenizer.save_pretrained(tmp)
    if lora.enabled and lora.merge_on_save:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    if extra_info:
        (tmp / "instructkit.json").write_text(json.dumps(extra_info, indent=2), encoding="utf-8")
    if extra_tensors:
        from safetensors.torch import save_file

        for name, tensors in extra_tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
