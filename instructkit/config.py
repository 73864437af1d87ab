"""Typed run configuration: a YAML file plus dotted ``key=value`` overrides.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error that names
it and suggests the closest valid key. Values are validated before any model is loaded.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A problem in a run configuration, worded for the person who wrote it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to tune and how to load it."""

    name_or_path: str = Field(..., description="Hugging Face folder, hub id or .gguf file of a causal LM.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 on a GPU that supports it, else float32.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")
    gradient_checkpointing: bool = False
    revision: str | None = None


class LoraConfig(_Section):
    """LoRA / QLoRA adapters through peft. Disabled unless ``enabled: true``."""

    enabled: bool = False
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names, e.g. [q_proj, v_proj].")
    quantize_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit NF4 (CUDA only).")
    merge_on_save: bool = Field(False, description="Also write the merged model to final/merged.")


class CurateConfig(_Section):
    """``data.curate``: clean the training records before encoding (see instructkit.curate)."""

    dedup: bool = Field(True, description="Remove exact (normalised text) and near duplicates.")
    near_dup_threshold: float | None = Field(0.8, gt=0, le=1, description="MinHash Jaccard for near "
                                             "duplicates; null = exact duplicates only.")
    decontaminate_against: list[str] = Field(default_factory=list, description="Evaluation files whose "
                                             "text must not appear in training records.")
    ngram: int | None = Field(None, gt=0, description="n-gram size; null = 8 for short, 13 for long "
                              "evaluation texts.")
    contamination_threshold: float = Field(0.3, gt=0, le=1, description="Remove a record holding this "
                                           "fraction of an evaluation text's n-grams.")


class DataConfig(_Section):
    """Where the data comes from and how it becomes token batches."""

    train: str | list[str] = Field(..., description="File(s) or save_to_disk folder(s).")
    eval: str | list[str] | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                 description="Hold out this fraction of train for eval when eval is unset.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "dolly", "prompt_completion",
                    "preference", "hh_rlhf", "kto"] = "auto"
    template: str = Field("auto", description="'auto' (tokenizer's own) or a built-in template name.")
    add_special_tokens: bool = Field(False, description="Add a built-in template's tokens if missing.")
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    max_length: int = Field(512, gt=8)
    truncation: Literal["error", "right"] = "error"
    packing: bool = True
    documents: Literal["stream", "separate"] = Field(
        "stream", description="method: pretrain only. stream = documents joined and cut into full rows "
        "(the standard layout); separate = each document whole in a packed row, attending only to itself, "
        "positions from 0 (for corpora of short independent documents, e.g. one fact per line).")
    on_error: Literal["raise", "skip"] = "raise"
    shuffle: bool = True
    curate: CurateConfig | None = Field(None, description="Dedup/decontaminate train records first.")


class TrainConfig(_Section):
    """Optimisation settings shared by every method."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(8, gt=0, description="Rows (packed) or examples (padded) per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw, or muon: Muon on the hidden weight matrices (peak muon_lr) and AdamW "
        "(peak lr) on embeddings, output head, norms and biases. Full fine-tuning and pretraining only.")
    muon_lr: float = Field(0.02, gt=0, description="Peak learning rate of Muon's matrices (optimizer: muon).")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's Nesterov momentum (optimizer: muon).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    resume: bool = False
    bf16: Literal["auto", True, False] = Field(
        "auto", description="bf16 autocast (fp32 master weights); auto = on for CUDA. On a CPU with AMX "
        "(Sapphire Rapids or later) true trains about 1.6-2x faster, with AVX512-BF16 (AMD Zen 4) about 1.65x; "
        "elsewhere on CPU it is slower.")
    progress: bool = True


class PreferenceConfig(_Section):
    """Settings of the preference methods (dpo, simpo, orpo, kto) and reward models."""

    beta: float | None = Field(None, gt=0, description="Strength of the preference term; default 0.1 "
                               "(dpo, kto) or 2.0 (simpo).")
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo only: sigmoid (DPO; cDPO with label_smoothing), robust, ipo, hinge.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed label-flip rate (cDPO, "
                                   "robust DPO, SimPO).")
    ipo_normalize: bool = Field(True, description="IPO on mean per-token log-ratios (as TRL); false = sums "
                                "(as the paper).")
    rpo_alpha: float = Field(0.0, ge=0.0, description="dpo only: add this x the chosen reply's mean token "
                             "NLL to the loss (RPO, Pang et al. 2024; TRL's rpo_alpha); 0 = plain DPO.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target reward margin gamma.")
    orpo_lambda: float = Field(0.1, ge=0.0, description="Weight of ORPO's odds-ratio term.")
    kto_desirable_weight: float = Field(1.0, gt=0.0, description="KTO lambda_D.")
    kto_undesirable_weight: float = Field(1.0, gt=0.0, description="KTO lambda_U.")
    reward_margin: float = Field(0.0, description="Reward model: chosen must beat rejected by this much.")
    center_rewards: float = Field(0.0, ge=0.0, description="Reward model: weight of the (r_w + r_l)^2 "
                                  "centring term.")
    reward_logprob_coef: float = Field(0.0, ge=0.0, description="Reward model: add this multiple of the reply's "
                                       "summed log-probability under the backbone's own LM head to the scalar "
                                       "head's score, in training and scoring (the backbone's likelihood as a "
                                       "prior); 0 = the plain scalar head.")
    reference: Literal["precompute", "live"] = Field(
        "precompute", description="precompute = reference log-probs computed once and cached on disk; "
        "live = adapter-disabled base (LoRA) or a frozen copy.")
    reference_cache: str = Field(".cache/instructkit/reference", description="Folder of cached "
                                 "reference log-probs, keyed by model, data and template.")
    truncation: Literal["keep_end", "right", "error"] = Field(
        "keep_end", description="Too-long pairs: keep_end keeps the prompt's end and the responses' "
        "starts; right cuts the end; error stops.")


class DistributedConfig(_Section):
    """Multi-process training under torchrun (see README, Distributed training)."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="ddp = a full replica per process; fsdp2 = parameters, gradients and "
        "optimizer state sharded with torch.distributed.fsdp.fully_shard.")
    nproc: int = Field(1, ge=1, description="Processes on this machine; > 1 re-launches the command "
                       "through torchrun (ignored when already launched by torchrun).")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU.")
    wrap: str | list[str] = Field("auto", description="fsdp2: module class names sharded as their own "
                                  "unit; auto = the model's _no_split_modules (its decoder layer).")
    reshard_after_forward: bool = Field(True, description="fsdp2: free gathered parameters after "
                                        "forward (ZeRO-3); false keeps them until backward (ZeRO-2).")
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="fsdp2 mixed precision: compute dtype of gathered parameters; null = as loaded.")
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="fsdp2 mixed precision: dtype of gradient reduce-scatter; null = param_dtype.")
    cpu_offload: bool = Field(False, description="fsdp2: keep sharded parameters, gradients and "
                              "optimizer state in CPU memory; the optimizer step runs on CPU.")
    find_unused_parameters: bool = Field(False, description="ddp: allow parameters that get no gradient.")
    timeout_minutes: float = Field(30.0, gt=0, description="A collective waiting longer fails the run.")
    log_all_ranks: bool = Field(False, description="Let every rank print; by default only rank 0 does.")


class DistillConfig(_Section):
    """Settings of ``method: distill``: token-level knowledge distillation from a teacher sharing the tokenizer."""

    teacher: str | None = Field(None, description="Teacher model folder (same tokenizer as the student).")
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl = KL(teacher || student); reverse_kl = KL(student || teacher); "
        "jsd = generalised JSD with beta.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: 0 = forward KL, 1 = reverse KL.")
    temperature: float = Field(1.0, gt=0.0, description="Softening temperature; the loss is scaled by T^2.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="loss = alpha * KD + (1 - alpha) * NLL on targets.")
    top_k: int | None = Field(None, gt=0, description="Use only the teacher's top-k tokens (+ the rest's "
                              "mass); null = the full vocabulary.")
    teacher_logits: Literal["live", "cache"] = Field(
        "live", description="live = teacher forward each step; cache = top-k log-probs computed once and "
        "kept on disk (needs top_k).")
    cache_dir: str = Field(".cache/instructkit/teacher", description="Folder of cached teacher top-k "
                           "log-probs, keyed by teacher, data and settings.")
    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0, description="GKD lambda: probability that a "
                                      "micro-batch uses student-generated replies scored by the teacher.")
    on_policy_max_new_tokens: int = Field(64, gt=0, description="Length limit of on-policy replies.")
    on_policy_temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of on-policy replies.")


class RLConfig(_Section):
    """Settings of online RL (``method: grpo`` or ``ppo``): rollouts with the current policy, scored by a reward."""

    reward: str = Field("skills", description="skills = the skills-curriculum verifier (records need family "
                        "and data); module:function = a Python function f(record, completion) -> float; "
                        "a folder = a reward model (method: reward).")
    group_size: int = Field(4, ge=2, description="G: completions sampled per prompt (the group of GRPO).")
    prompts_per_rollout: int = Field(8, gt=0, description="Prompts per rollout; a rollout holds "
                                     "prompts_per_rollout x group_size completions.")
    sampling_rounds: int = Field(1, ge=1, description="grpo: up to this many sampling rounds per rollout. "
                                 "With more than 1, groups whose completions all scored the same (zero advantage, "
                                 "no learning signal) are set aside and fresh prompts are sampled until "
                                 "prompts_per_rollout groups have reward variance (DAPO's dynamic sampling); set-"
                                 "aside groups fill what the last round leaves short. 1 = plain GRPO.")
    negative_weight: float = Field(1.0, ge=0.0, le=1.0, description="Scale of negative advantages (grpo: "
                                   "after group normalisation; ppo: per token, after whitening). 1 = the plain "
                                   "method; below 1, completions worse than expected are pushed down less than "
                                   "better ones are pushed up; 0 = learn only from the better completions.")
    rollout_epochs: int = Field(1, gt=0, description="Passes over each rollout (PPO/GRPO mu).")
    max_new_tokens: int = Field(64, gt=0, description="Completion length limit.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of rollouts; old-policy, "
                               "reference and trained log-probs are all taken at it (logits / T), so the "
                               "run optimises the distribution it samples from.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling of rollouts (0 = off).")
    clip_eps: float = Field(0.2, gt=0.0, description="PPO clip range of the probability ratio.")
    clip_eps_high: float | None = Field(None, gt=0.0, description="Upper clip range (DAPO clip-higher); "
                                        "null = clip_eps.")
    kl_coef: float = Field(0.04, ge=0.0, description="Weight of the KL-to-reference term; 0 = no reference.")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(None, description="Per-token KL estimator; null = "
                                                           "k3 for grpo, k1 for ppo.")
    scale_rewards: bool = Field(True, description="Divide group-centred rewards by the group's sample std "
                                "(GRPO); false = centre only (Dr. GRPO).")
    loss_aggregation: Literal["grpo", "bnpo", "dr_grpo"] = Field(
        "grpo", description="grpo = per-sequence token mean, then mean; bnpo = token mean over the step; "
        "dr_grpo = token sum / (sequences x max_new_tokens).")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="ppo: discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="ppo: lambda of GAE.")
    vf_coef: float = Field(0.1, ge=0.0, description="ppo: weight of the value loss.")
    vf_clip: float = Field(0.2, gt=0.0, description="ppo: clip range of the value prediction around its rollout value.")
    whiten_rewards: bool = Field(False, description="ppo: scale rollout scores to unit variance (mean kept).")
    kl_target: float | None = Field(None, gt=0.0, description="ppo: adaptive KL controller target (per-sequence "
                                    "KL); null = fixed kl_coef.")
    kl_horizon: float = Field(10000.0, gt=0.0, description="ppo: adaptive KL controller horizon (sequences).")
    value_warmup_rollouts: int = Field(0, ge=0, description="ppo: the first this-many rollouts train only the "
                                       "value head (on detached hidden states; the policy does not move), so "
                                       "the policy's first advantages come from a critic that has seen "
                                       "returns. They count in train.max_steps / epochs like any rollout.")
    missing_stop_penalty: float = Field(0.0, ge=0.0, description="ppo: subtracted from the score of a completion "
                                        "that never stopped (hit max_new_tokens).")
    eval_prompts: int = Field(64, ge=0, description="Validation prompts answered greedily before training and at "
                              "each evaluation.")
    train_probe_prompts: int = Field(0, ge=0, description="This many of the training prompts that the run's "
                                     "rollouts draw (spread over the run), scored before training and at each "
                                     "evaluation: train_reward (and train_reward_start in summary.json). Unlike "
                                     "the rollout reward it does not depend on which prompts a rollout draws. "
                                     "0 = off.")
    train_probe_samples: int = Field(4, ge=0, description="Completions per train-probe prompt, sampled like the "
                                     "rollouts with a fixed seed (the reward RL maximises); 0 = one greedy "
                                     "completion (accuracy, which also shows memorised answers).")
    alarm_kl: float | None = Field(1.0, gt=0.0, description="Warn when the mean per-token KL to the reference "
                                   "exceeds this; null = off.")
    alarm_truncated: float | None = Field(0.5, gt=0.0, le=1.0, description="Warn when this fraction of "
                                          "completions hits max_new_tokens; null = off.")
    alarm_length_growth: float | None = Field(0.5, gt=0.0, description="Warn when mean completion length over "
                                              "the last 5 rollouts grew by more than this fraction over the 5 "
                                              "before while mean reward did not rise; null = off.")


class LoggingConfig(_Section):
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "instructkit"


class RunConfig(_Section):
    """A whole run. ``method`` picks the recipe in ``instructkit.methods``."""

    method: Literal["sft", "pretrain", "dpo", "simpo", "orpo", "kto", "reward", "distill", "grpo", "ppo"] = "sft"
    seed: int = 0
    output_dir: str = "runs/run"
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir must not be empty")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> "RunConfig":
        if self.lora.quantize_4bit and not self.lora.enabled:
            raise ValueError("lora.quantize_4bit needs lora.enabled: true (QLoRA trains adapters)")
        if self.method == "distill" and not self.distill.teacher:
            raise ValueError("method: distill needs distill.teacher: the teacher model folder")
        if self.method in ("grpo", "ppo") and self.rl.max_new_tokens >= self.data.max_length:
            raise ValueError(f"rl.max_new_tokens ({self.rl.max_new_tokens}) must be below data.max_length "
                             f"({self.data.max_length}), which bounds prompt + completion")
        if self.method != "ppo" and self.rl.value_warmup_rollouts:
            raise ValueError("rl.value_warmup_rollouts warms up PPO's value head; other methods have none "
                             "(use method: ppo, or value_warmup_rollouts: 0)")
        if self.method == "ppo" and self.rl.sampling_rounds > 1:
            raise ValueError("rl.sampling_rounds filters GRPO groups by reward variance; PPO has no groups "
                             "(use method: grpo, or sampling_rounds: 1)")
        if self.preference.rpo_alpha and self.method != "dpo":
            raise ValueError(f"preference.rpo_alpha adds an NLL term to DPO; method {self.method} does not use it "
                             "(ORPO has its NLL term built in; remove rpo_alpha or use method: dpo)")
        if self.distill.teacher_logits == "cache" and self.distill.top_k is None:
            raise ValueError("distill.teacher_logits: cache stores top-k log-probs; set distill.top_k (e.g. 32)")
        if self.train.optimizer == "muon" and self.lora.enabled:
            raise ValueError("train.optimizer: muon updates the model's own weight matrices; with lora.enabled "
                             "use optimizer: adamw (or turn LoRA off for full fine-tuning)")
        if self.train.optimizer == "muon" and self.distributed.strategy == "fsdp2":
            raise ValueError("train.optimizer: muon needs whole matrices; with distributed.strategy: fsdp2 each "
                             "rank holds a shard. Use strategy: ddp or optimizer: adamw")
        if self.distributed.strategy == "fsdp2" and self.lora.quantize_4bit:
            raise ValueError("lora.quantize_4bit cannot be sharded with distributed.strategy: fsdp2; use "
                             "strategy: ddp (each GPU holds the 4-bit base) or LoRA without quantize_4bit")
        if self.distributed.strategy == "fsdp2" and self.lora.merge_on_save:
            raise ValueError("lora.merge_on_save is not available with distributed.strategy: fsdp2; save "
                             "the adapter and merge it afterwards with `instructkit export`")
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
    "preference": PreferenceConfig, "logging": LoggingConfig, "curate": CurateConfig, "distill": DistillConfig,
    "distributed": DistributedConfig, "rl": RLConfig,
}


# Names people bring from transformers/TRL/Axolotl, mapped to ours; string similarity misses these.
KNOWN_SYNONYMS = {
    "learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size", "batch_size": "micro_batch_size",
    "micro_batch": "micro_batch_size", "max_seq_length": "max_length", "max_seq_len": "max_length",
    "sequence_len": "max_length", "seq_len": "max_length", "lora_r": "r", "rank": "r",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "model_name_or_path": "name_or_path",
    "model_name": "name_or_path", "path": "name_or_path", "warmup": "warmup_steps",
    "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
    "save_total_limit": "keep_last", "lr_scheduler_type": "schedule", "torch_dtype": "dtype",
    "resume_from_checkpoint": "resume", "dataset": "train", "train_file": "train",
    "chat_template": "template", "adam_epsilon": "eps", "lambda": "orpo_lambda",
    "gamma": "simpo_gamma", "simpo_gamma_beta_ratio": "simpo_gamma", "desirable_weight": "kto_desirable_weight",
    "undesirable_weight": "kto_undesirable_weight", "center_rewards_coefficient": "center_rewards",
    "precompute_ref_log_probs": "reference", "truncation_mode": "truncation",
}


def _suggest(key: str, valid: list[str]) -> str | None:
    alias = KNOWN_SYNONYMS.get(key)
    if alias in valid:
        return alias
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The config class that owns a location such as ('train', 'lr')."""
    cur: type[BaseModel] = RunConfig
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        ann = cur.model_fields.get(str(part))
        nxt = SECTIONS.get(str(part)) if ann is not None else None
        if nxt is None:
            return None
        cur = nxt
    return cur


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = _valid_keys(owner) if owner else []
            close = _suggest(str(loc[-1]), valid)
            hint = f" Did you mean '{'.'.join(str(p) for p in loc[:-1] + (close,))}'?" if close else ""
            lines.append(f"  unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{key}'")
        else:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so numbers, booleans and lists work."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        cur = raw
        for k in keys[:-1]:
            nxt = cur.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{k}' is a value, not a section")
            cur = nxt
        cur[keys[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict | None = None) -> RunConfig:
    """Read a YAML config (safe loader), apply overrides and validate.

    Args:
        path: YAML file; may be None when ``raw`` is given.
        overrides: Dotted ``key=value`` strings applied after reading the file.
        raw: A config dict to start from instead of a file.

    Raises:
        ConfigError: Naming the file, the key and the fix (closest valid key for typos).
    """
    source = str(path) if path else "<config>"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
    # Deep copy: overrides must never leak into the caller's dict (or a cached default).
    raw = apply_overrides(copy.deepcopy(raw or {}), overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    data = cfg.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
