"""`instructkit demo`: the whole idea of instruction tuning on a laptop CPU, in minutes.

Stages: generate the skills curriculum -> build (or reuse) a tiny base model pretrained on the
plain-text skills corpus (knowledge, no instruction following) -> evaluate it -> SFT (full and LoRA)
-> evaluate again -> write report.md / report.html with plots and examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from instructkit.budget import FULL_PRETRAIN_EPOCHS, FULL_SFT_EPOCHS, StageCosts, plan_epochs
from instructkit.synth.skills import N_CORPUS, N_TRAIN

DEMO_VERSION = 5  # bump when the base recipe changes, so stale caches are rebuilt


def _stage(i: int, n: int, msg: str) -> None:
    print(f"\n[{i}/{n}] {msg}", file=sys.stderr, flush=True)


def fast_bf16() -> bool:
    """bf16 autocast for the demo's training runs where it is fast (CUDA; CPUs with AMX, about 2x on the
    tiny models here, or AVX512-BF16, about 1.65x). Elsewhere fp32, since emulated bf16 on a CPU is slower."""
    import torch

    from instructkit.models import cpu_has_fast_bf16

    return torch.cuda.is_available() or cpu_has_fast_bf16()


def base_recipe(preset: str, seed: int, quick: bool) -> dict:
    """Pretraining of the demo's base. Muon on the hidden matrices and one document (fact) per packed block
    are what let the tiny model start to compute the skills within the budget (bench/RESULTS.md)."""
    return {"version": DEMO_VERSION, "preset": preset, "seed": seed,
            "pretrain_epochs": 1 if quick else _epochs_value(FULL_PRETRAIN_EPOCHS), "max_length": 256, "lr": 3e-3,
            "micro_batch_size": 16, "optimizer": "muon", "muon_lr": 0.02, "documents": "separate", "bf16": fast_bf16()}


def pretrain_base(recipe: dict, data_dir: Path, work: Path, init: Path) -> None:
    """Pretrain the model at ``init`` on the plain-text corpus into ``work`` with the recipe's settings."""
    from instructkit.config import load_config
    from instructkit.methods import pretrain

    pretrain.main(load_config(raw={
        "method": "pretrain", "seed": recipe["seed"], "output_dir": str(work), "model": {"name_or_path": str(init)},
        "data": {"train": str(data_dir / "corpus_pretrain.txt"), "eval": str(data_dir / "corpus_heldout.txt"),
                 "max_length": recipe["max_length"], "documents": recipe["documents"]},
        "train": {"epochs": recipe["pretrain_epochs"], "micro_batch_size": recipe["micro_batch_size"],
                  "lr": recipe["lr"], "optimizer": recipe["optimizer"], "muon_lr": recipe["muon_lr"],
                  "bf16": recipe["bf16"], "warmup_ratio": 0.05, "schedule": "cosine", "min_lr_ratio": 0.1,
                  "save_every": 200, "eval_every": 200},
    }))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_dir(data_dir: Path, cache_dir: Path, recipe: dict, corpus_hash: str | None = None) -> Path:
    """The cache folder of a base: keyed by the recipe and the exact corpus, so a different curriculum
    never reuses a base."""
    corpus_hash = corpus_hash or _sha(data_dir / "corpus_pretrain.txt")
    key = hashlib.sha256((json.dumps(recipe, sort_keys=True) + corpus_hash).encode()).hexdigest()[:12]
    return cache_dir / f"base-{key}"


def cached_bases(data_dir: Path, cache_dir: Path, recipe: dict) -> dict[float, Path]:
    """Finished bases in the cache that differ from ``recipe`` only in their pretraining epochs (any
    multiple of 0.25 up to the full recipe's): ``{epochs: final folder}``."""
    corpus_hash = _sha(data_dir / "corpus_pretrain.txt")
    found = {}
    for k in range(1, int(FULL_PRETRAIN_EPOCHS * 4) + 1):
        final = base_dir(data_dir, cache_dir, {**recipe, "pretrain_epochs": _epochs_value(k / 4)}, corpus_hash) / "final"
        if (final / "config.json").exists():
            found[k / 4] = final
    return found


def _epochs_value(e: float) -> float | int:
    """Whole epochs as int, so the cache keys of the recipes before budgets (``"pretrain_epochs": 5``) hold."""
    return int(e) if float(e).is_integer() else float(e)


def init_dir(data_dir: Path, cache_dir: Path, recipe: dict) -> Path:
    """The cache folder of a base's tokenizer and initial weights, shared by every pretraining length."""
    spec = {k: recipe[k] for k in ("version", "preset", "seed")}
    key = hashlib.sha256((json.dumps(spec, sort_keys=True) + _sha(data_dir / "corpus_pretrain.txt")
                          + _sha(data_dir / "train.jsonl")).encode()).hexdigest()[:12]
    return cache_dir / f"init-{key}"


def build_init(data_dir: Path, cache_dir: Path, recipe: dict) -> Path:
    """Tokenizer trained on the suite's text and randomly initialised weights (reused when cached)."""
    from instructkit.tiny_model import build_tiny_model

    init = init_dir(data_dir, cache_dir, recipe)
    if (init / "config.json").exists():
        return init
    corpus = (data_dir / "corpus_pretrain.txt").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(x)["messages"] for x in (data_dir / "train.jsonl").read_text().splitlines()]
    texts = corpus + [m["content"] for conv in prompts for m in conv]
    # GPT-style word tokens (" lantern") and a space before each reply, so a word copied from the
    # prompt into the reply is the same token (bench/RESULTS.md: isolating spaces cost 43% more tokens).
    tmp = init.with_name(init.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    build_tiny_model(tmp, preset=recipe["preset"], seed=recipe["seed"], corpus=texts, reply_space=True)
    if init.exists():
        shutil.rmtree(init)
    tmp.rename(init)  # atomic: an interrupted build never leaves a half-written init behind
    return init


def build_base(data_dir: Path, cache_dir: Path, recipe: dict, init: Path | None = None) -> Path:
    """Causal-LM pretraining of the initial model (:func:`build_init`) on the plain corpus; reused when cached."""
    work = base_dir(data_dir, cache_dir, recipe)
    final = work / "final"
    if (final / "config.json").exists():
        print(f"reusing cached base model {final}", file=sys.stderr)
        return final
    if work.exists():
        shutil.rmtree(work)
    init = init or build_init(data_dir, cache_dir, recipe)
    pretrain_base(recipe, data_dir, work, init)
    (work / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return final


def sft_raw(name: str, base: Path, data_dir: Path, out: Path, lora: bool, epochs: float, seed: int) -> dict:
    """The config of the demo's SFT runs (full, or LoRA r32 on every linear layer)."""
    raw = {
        "method": "sft", "seed": seed, "output_dir": str(out / f"sft-{name}"),
        "model": {"name_or_path": str(base)},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "validation.jsonl"),
                 "max_length": 256},
        "train": {"epochs": epochs, "micro_batch_size": 16, "lr": 2e-3 if not lora else 5e-3,
                  "warmup_ratio": 0.05, "schedule": "cosine", "eval_every": 50, "save_every": 200,
                  "bf16": fast_bf16()},
    }
    if lora:
        raw["lora"] = {"enabled": True, "r": 32, "alpha": 64, "target_modules": "all-linear"}
    return raw


# Measured on a 2-core EPYC (bench/RESULTS.md, "The demo within its time budget"): a step inside the loop
# (logging, the progress line, periodic evaluation and checkpoints) took 1.02-1.14x the timed step when
# pretraining and 1.06-1.21x when tuning (LoRA the slower), the machine itself drifting by up to 15%
# between minutes; evaluating one model (160 prompts, greedy) costs about as much as 10 SFT steps, and
# starting and ending the process about 3 s. Plans aim at PLAN_MARGIN of the budget to absorb the drift.
PRETRAIN_OVERHEAD = 1.08
SFT_OVERHEAD = 1.10
EVAL_STEPS = 10.0
PLAN_MARGIN = 0.95
REUSE_TOLERANCE_EPOCHS = 1.0  # with a budget, a cached base up to this much shorter than planned is reused
TIMED_STEPS = 5  # micro-batches timed per stage (after one warm-up step); the median is used


def _timing_batches(examples: list, micro_batch_size: int, max_length: int, pad_id: int, seed: int,
                    n: int) -> tuple[int, list[dict]]:
    """Steps per epoch of ``examples`` packed as the runs pack them, and ``n`` collated micro-batches of
    randomly chosen rows (collating a whole epoch would cost seconds of the budget)."""
    import random

    from instructkit.data.packing import collate_packed, pack_best_fit_decreasing

    rows = pack_best_fit_decreasing([len(e.input_ids) for e in examples], max_length)
    random.Random(seed).shuffle(rows)
    steps = math.ceil(len(rows) / micro_batch_size)
    chunks = [rows[k:k + micro_batch_size] for k in range(0, min(len(rows), n * micro_batch_size), micro_batch_size)]
    return steps, [collate_packed(examples, c, pad_id=pad_id) for c in chunks]


def measure_costs(model_dir: Path, data_dir: Path, recipe: dict, seed: int) -> tuple[StageCosts, dict]:
    """Time real training steps of the model at ``model_dir`` (the initial model, or a cached base of the
    same shapes) on this machine: pretraining on packed corpus rows (the recipe's optimizer), SFT on packed
    training examples (AdamW); count each stage's steps per epoch. Returns the stage costs and the raw
    measurements (for the report)."""
    from instructkit.budget import time_train_steps
    from instructkit.config import load_config
    from instructkit.data.pipeline import load_sft_data, prepare_template
    from instructkit.data.text import document_examples, read_documents
    from instructkit.models import load_for_inference

    t = time.perf_counter()
    model, tok = load_for_inference(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    docs = document_examples(tok, read_documents(data_dir / "corpus_pretrain.txt"), recipe["max_length"])
    pre_steps, pre_batches = _timing_batches(docs, recipe["micro_batch_size"], recipe["max_length"], pad, seed,
                                             TIMED_STEPS + 1)
    pre_data_s = time.perf_counter() - t
    t = time.perf_counter()
    cfg = load_config(raw=sft_raw("full", model_dir, data_dir, data_dir, False, 1.0, seed))
    template, _ = prepare_template(tok, cfg.data)
    data = load_sft_data(cfg.data, tok, template, seed)
    sft_steps, sft_batches = _timing_batches(data.train, cfg.train.micro_batch_size, cfg.data.max_length, pad, seed,
                                             TIMED_STEPS + 1)
    sft_data_s = time.perf_counter() - t
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pre_step = time_train_steps(model, pre_batches, optimizer=recipe["optimizer"], bf16=recipe["bf16"],
                                lr=recipe["lr"], muon_lr=recipe["muon_lr"])
    model.load_state_dict(state)  # the SFT timing starts from the same weights
    sft_step = time_train_steps(model, sft_batches, optimizer="adamw", bf16=recipe["bf16"])
    costs = StageCosts(
        pretrain_epoch_s=pre_steps * pre_step * PRETRAIN_OVERHEAD,
        pretrain_fixed_s=pre_data_s + 2.0,
        sft_epoch_s=2 * sft_steps * sft_step * SFT_OVERHEAD,
        sft_fixed_s=2 * (sft_data_s + 2.0),
        reserve_s=3 * EVAL_STEPS * sft_step + 6.0,
    )
    info = {"pretrain_step_s": pre_step, "pretrain_steps_per_epoch": pre_steps,
            "sft_step_s": sft_step, "sft_steps_per_epoch": sft_steps, **asdict(costs)}
    return costs, info


def sft_run(name: str, base: Path, data_dir: Path, out: Path, lora: bool, epochs: float, seed: int) -> Path:
    from instructkit.config import load_config
    from instructkit.methods import sft

    sft.main(load_config(raw=sft_raw(name, base, data_dir, out, lora, epochs, seed)))
    return out / f"sft-{name}" / "final"


ANSWER_TOKENS = 48  # new tokens for a skills answer (every one fits): evaluation, teacher replies, reproduce commands

PREFERENCE_STAGES = ("dpo", "orpo", "reward")
# Plain DPO lowers the demo's validation exact match (30.6% -> 23.1%): held-out chosen replies lose
# likelihood along with the rejected ones. RPO's NLL term on the chosen reply keeps it (32.0%).
DPO_RPO_ALPHA = 1.0
# The SFT backbone's own likelihood already ranks 88% of the held-out pairs right; a head trained from
# scratch on one epoch of pairs reaches 73-74% and loses that. Head + 0.5 x reply log-prob: 91.1-92.4%
# over three seeds, and 90.2-91.5% with 1 x (bench/RESULTS.md, "Reward model: the backbone's own
# likelihood as a prior").
REWARD_LOGPROB_COEF = 0.5


def preference_run(method: str, start: Path, data_dir: Path, out: Path, seed: int, epochs: float = 1.0) -> Path:
    """DPO / ORPO from the SFT model, or a reward model on the same backbone, on the curriculum's pairs."""
    from instructkit.config import load_config
    from instructkit.methods import preference, reward

    raw = {
        "method": method, "seed": seed, "output_dir": str(out / method),
        "model": {"name_or_path": str(start)},
        "data": {"train": str(data_dir / "preference.jsonl"), "eval": str(data_dir / "preference_validation.jsonl"),
                 "max_length": 256},
        "train": {"epochs": epochs, "micro_batch_size": 4, "lr": {"dpo": 2e-4, "orpo": 2e-4, "reward": 3e-4}[method],
                  "warmup_ratio": 0.05, "schedule": "cosine", "eval_every": 100, "save_every": 200},
        "preference": {"beta": 0.1, "orpo_lambda": 0.5, "reference_cache": str(out / "reference-cache")},
    }
    if method == "dpo":
        raw["preference"]["rpo_alpha"] = DPO_RPO_ALPHA
    if method == "reward":
        raw["preference"]["reward_logprob_coef"] = REWARD_LOGPROB_COEF

    (reward if method == "reward" else preference).main(load_config(raw=raw))
    return out / method / "final"


RL_STAGES = ("grpo", "ppo")
RL_STEPS, RL_STEPS_QUICK = 60, 6  # optimizer steps = rollouts of each RL stage (~6 minutes each on 2 cores)
RL_PROBE, RL_PROBE_QUICK = 1000, 64  # training prompts of the train probe (4 samples each), before and after


def rl_run(method: str, start: Path, data_dir: Path, out: Path, seed: int, steps: int, probe: int = RL_PROBE,
           eval_prompts: int = 540) -> Path:
    """GRPO / PPO from the full SFT model on the curriculum's training prompts, the skills verifier as
    reward, through a LoRA adapter (r 16 on every linear layer, lr 1e-3): the settings measured best in
    bench/RESULTS.md ("Online RL: PPO's lost training answers come from its optimizer steps" and "Online RL:
    more seeds, ... rollouts twice as large"). One optimizer step per rollout for both (with several, PPO
    unlearned memorised training answers), 256 completions per step: GRPO 32 prompts x 8 with dynamic
    sampling, PPO 256 completions in one pass (half that gave half the gain). The run scores the validation
    prompts (greedy, up to ``eval_prompts``) and a probe of ``probe`` training prompts its rollouts draw
    (4 samples each, like the rollouts) before and after training. Returns the adapter folder (its base is
    ``start``)."""
    from instructkit.config import load_config
    from instructkit.methods import grpo, ppo

    train = {"max_steps": steps, "lr": 1e-3, "schedule": "constant", "save_every": steps}
    rl = {"reward": "skills", "max_new_tokens": 24, "temperature": 1.0, "eval_prompts": eval_prompts,
          "train_probe_prompts": probe, "train_probe_samples": 4}
    if method == "grpo":  # 32 prompts x 8 completions = 256 per rollout, one step
        train.update(micro_batch_size=32, grad_accum=8)
        rl.update(group_size=8, prompts_per_rollout=32, sampling_rounds=4, kl_coef=0.04, kl_estimator="k3",
                  loss_aggregation="grpo")
    else:  # 256 completions per rollout, one pass, one step
        train.update(micro_batch_size=16, grad_accum=16)
        rl.update(prompts_per_rollout=256, rollout_epochs=1, kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95,
                  vf_coef=0.1, missing_stop_penalty=1.0)
    cfg = load_config(raw={"method": method, "seed": seed, "output_dir": str(out / method),
                           "model": {"name_or_path": str(start)},
                           "lora": {"enabled": True, "r": 16, "alpha": 32, "target_modules": "all-linear"},
                           "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "validation.jsonl"),
                                    "max_length": 256},
                           "train": train, "rl": rl})
    (grpo if method == "grpo" else ppo).main(cfg)
    return out / method / "final"


def rl_summary(run_dir: Path, method: str) -> dict:
    """Training-rollout numbers from the run's metrics.jsonl: the verifier score (PPO's ``score_mean``,
    before its missing-stop penalty; GRPO's ``reward_mean``) and the KL to the reference, averaged per
    rollout, then over the first and the last third of the rollouts; and from its summary.json the run's own
    before/after scores: the train probe (sampled reward on training prompts the run drew) and the greedy
    validation reward on every validation prompt."""
    from instructkit.report import _metrics_lines

    key = "score_mean" if method == "ppo" else "reward_mean"
    per_rollout: dict[int, dict] = {}
    steps = 0
    for rec in _metrics_lines(run_dir):
        if key in rec:  # one line per optimizer step; every step of a rollout carries its telemetry
            per_rollout.setdefault(max(0, math.ceil(rec["epoch"]) - 1), rec)  # epoch 0.5, 1.0: rollout 0
            steps = max(steps, rec["step"])
    rollouts = [per_rollout[k] for k in sorted(per_rollout)]
    if not rollouts:
        return {"rollouts": 0}
    third = max(1, len(rollouts) // 3)

    def mean(recs: list[dict], k: str) -> float:
        vals = [r[k] for r in recs if k in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"steps": steps, "rollouts": len(rollouts), "reward_key": key,
            "reward_first_third": mean(rollouts[:third], key), "reward_last_third": mean(rollouts[-third:], key),
            "reward_per_rollout": [r[key] for r in rollouts],
            "kl_ref_first_third": mean(rollouts[:third], "kl_ref"), "kl_ref_last_third": mean(rollouts[-third:], "kl_ref"),
            "stop_fraction_last_third": mean(rollouts[-third:], "stop_fraction"), **run_scores(run_dir)}


def change(m: dict, name: str, fmt: str = ".3f") -> str:
    """:func:`instructkit.rollout.format_change` of ``{name}_start`` / ``_end`` / ``_change_se`` of an RL
    stage's summary, or ``"n/a"``."""
    from instructkit.rollout import format_change

    if f"{name}_start" not in m:
        return "n/a"
    return format_change(m[f"{name}_start"], m[f"{name}_end"], m.get(f"{name}_change_se"), fmt)


def rl_line(name: str, m: dict) -> str:
    """The closing line of an RL stage in ``instructkit demo``: numbers only, no claim."""
    if not m.get("rollouts"):
        return f"{name}: no rollout finished"
    probe = (f" on {m['train_probe_prompts']} of its training prompts x {m['train_probe_samples']} samples"
             if "train_probe_start" in m else "")
    val = f" (all {m['validation_prompts']}, greedy)" if "validation_reward_start" in m else ""
    return (f"{name}: training-prompt reward {change(m, 'train_probe')}{probe}; validation accuracy "
            f"{change(m, 'validation_reward', '.1%')}{val}; rollout reward {m['reward_first_third']:.3f} -> "
            f"{m['reward_last_third']:.3f} (first -> last third), KL to ref {m.get('kl_ref_last_third', float('nan')):.4f}")


def run_scores(run_dir: Path) -> dict:
    """``train_probe_start/_end`` and ``validation_reward_start/_end`` (with their prompt counts) from an RL
    run's summary.json, where the run recorded them."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {}
    info = json.loads(path.read_text())
    fm, rl = info.get("final_metrics", {}), info.get("rl", {})
    out = {}
    for name, key in (("train_probe", "train_reward"), ("validation_reward", "eval_reward")):  # see change()
        if key + "_start" in info and key in fm:
            out[f"{name}_start"], out[f"{name}_end"] = info[key + "_start"], fm[key]
    if "train_probe_start" in out:
        out["train_probe_prompts"] = info.get("train_probe_size")
        out["train_probe_samples"] = rl.get("train_probe_samples")
        out["train_probe_change_se"] = fm.get("train_reward_delta_se")
    if "validation_reward_start" in out:
        out["validation_prompts"] = info.get("eval_prompts")
        out["validation_reward_change_se"] = fm.get("eval_reward_delta_se")
    return out


DISTILL_STAGES = ("distill",)
STUDENTS = ("student-sft", "student-kd", "student-seqkd")  # the nano students of --with distill


def student_base(teacher_base: Path, data_dir: Path, cache_dir: Path, recipe: dict) -> Path:
    """A smaller (``nano``) base pretrained like the teacher's, with the teacher's tokenizer (shared vocabulary)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from instructkit.tiny_model import PRESETS

    key = hashlib.sha256((json.dumps(recipe, sort_keys=True) + str(Path(teacher_base).resolve())
                          + hashlib.sha256((data_dir / "corpus_pretrain.txt").read_bytes()).hexdigest()).encode())
    work = cache_dir / f"student-{key.hexdigest()[:12]}"
    if (work / "final" / "config.json").exists():
        print(f"reusing cached student base {work / 'final'}", file=sys.stderr)
        return work / "final"
    if work.exists():
        shutil.rmtree(work)
    tok = AutoTokenizer.from_pretrained(teacher_base)
    spec = {k: v for k, v in PRESETS[recipe["preset"]].items() if k != "vocab_size"}
    config = LlamaConfig(**spec, vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rms_norm_eps=1e-5, attention_bias=False, initializer_range=0.02)
    torch.manual_seed(recipe["seed"])
    LlamaForCausalLM(config).save_pretrained(work / "init")
    tok.save_pretrained(work / "init")
    pretrain_base(recipe, data_dir, work, work / "init")
    return work / "final"


def distill_demo(teacher: Path, teacher_base: Path, data_dir: Path, out: Path, cache: Path, seed: int, quick: bool,
                 epochs: float, limit: int, probe: list[str], student_pretrain_epochs: float = 1.0) -> tuple[dict, dict]:
    """Teacher = the full SFT model; student = a pretrained nano base. Three students on the same prompts:
    plain SFT, token-level KD (forward KL, alpha 0.5, cached top-64 teacher log-probs) and sequence-level
    KD (SFT on the teacher's greedy replies). Returns (skills results, agreement with the teacher)."""
    from instructkit.config import load_config
    from instructkit.methods import distill, sft
    from instructkit.synth.distill_data import distill_data
    from instructkit.synth.generators import LocalGenerator, Sampling

    # seed + 1: its own initial weights, even when the teacher is a nano model too (miniature runs)
    recipe = {**base_recipe("nano", seed + 1, quick), "pretrain_epochs": student_pretrain_epochs}
    student = student_base(teacher_base, data_dir, cache / "demo", recipe)

    def raw(name: str, train_file: Path, **extra) -> dict:
        return {"seed": seed, "output_dir": str(out / name), "model": {"name_or_path": str(student)},
                "data": {"train": str(train_file), "eval": str(data_dir / "validation.jsonl"), "max_length": 256},
                "train": {"epochs": epochs, "micro_batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.05,
                          "schedule": "cosine", "eval_every": 100, "save_every": 400}, **extra}

    seq_data = out / "distill-data" / "train.jsonl"
    generator = LocalGenerator(teacher, batch_size=64)
    seq_summary = distill_data(generator, data_dir / "train.jsonl", seq_data,
                               sampling=Sampling(max_tokens=ANSWER_TOKENS, temperature=0.0), chunk=512, keep_truncated=True)
    sft.main(load_config(raw=raw("student-sft", data_dir / "train.jsonl", method="sft")))
    distill.main(load_config(raw=raw("student-kd", data_dir / "train.jsonl", method="distill",
                                     distill={"teacher": str(teacher), "alpha": 0.5, "kind": "forward_kl",
                                              "temperature": 1.0, "top_k": 64, "teacher_logits": "cache",
                                              "cache_dir": str(out / "teacher-cache")})))
    names = STUDENTS
    if seq_summary["records_total"]:
        sft.main(load_config(raw=raw("student-seqkd", seq_data, method="sft")))
    else:  # a teacher that only ever answers with nothing (e.g. a barely tuned one) leaves nothing to learn
        print(f"sequence-level KD skipped: the teacher's replies were all rejected ({seq_summary['rejected']})",
              file=sys.stderr)
        names = names[:2]
    results = {n: evaluate_model(out / n / "final", data_dir, out / f"eval-{n}", limit, probe) for n in names}
    agreement = closeness_to_teacher(teacher, {n: out / n / "final" for n in names}, data_dir, out / "closeness", seed)
    for n in names:
        agreement[n]["validation_nll"] = results[n]["splits"]["validation"]["heldout_loss"]
    agreement["seq_kd_data"] = {k: seq_summary[k] for k in ("records_total", "rejected", "request_failed")}
    return results, agreement


def closeness_to_teacher(teacher: Path, students: dict[str, Path], data_dir: Path, out: Path, seed: int,
                         limit: int | None = None) -> dict[str, dict]:
    """How close each student is to its teacher on the validation prompts, three ways:

    - ``kl_teacher_student`` / ``kl_student_teacher``: KL per token on the *reference* replies (what SFT trains on);
    - ``kl_on_teacher_replies``: forward KL per token on the teacher's own greedy replies (where the teacher's
      probability mass is, what sequence-level KD trains on);
    - ``greedy_agreement``: the share of prompts where the student's greedy reply equals the teacher's.
    """
    from instructkit.config import load_config
    from instructkit.data.pipeline import load_sft_data, plan_batches, prepare_template
    from instructkit.synth.best_of_n import read_prompts
    from instructkit.synth.generators import LocalGenerator, Sampling
    from instructkit.teacher import kl_to_teacher

    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(data_dir / "validation.jsonl", limit)
    requests = [r["_prompt"] for r in prompts]
    greedy = Sampling(max_tokens=ANSWER_TOKENS, temperature=0.0)

    def replies(gen: LocalGenerator) -> list[str]:
        return [g.text.strip() for g in gen.generate(requests, greedy)]

    teacher_gen = LocalGenerator(teacher, batch_size=64)  # each model is loaded once: replies and KL share it
    teacher_model, tok = teacher_gen.model, teacher_gen.tokenizer
    teacher_replies = replies(teacher_gen)
    teacher_file = out / "teacher_replies.jsonl"
    teacher_file.write_text("".join(json.dumps({"messages": m + [{"role": "assistant", "content": t}]}) + "\n"
                                    for m, t in zip(requests, teacher_replies)), encoding="utf-8")

    def batches(path: Path):
        cfg = load_config(raw={"output_dir": str(out), "model": {"name_or_path": str(teacher)},
                               "data": {"train": str(path), "max_length": 256}})
        template, _ = prepare_template(tok, cfg.data)
        data = load_sft_data(cfg.data, tok, template, seed).train
        return plan_batches(data, packing=True, micro_batch_size=16, max_length=256, pad_id=tok.pad_token_id,
                            seed=seed, shuffle=False).source(0)

    reference, own = batches(data_dir / "validation.jsonl"), batches(teacher_file)
    result = {}
    for name, path in students.items():
        student = LocalGenerator(path, batch_size=64)
        result[name] = kl_to_teacher(student.model, teacher_model, reference)
        on_own = kl_to_teacher(student.model, teacher_model, own)
        result[name]["kl_on_teacher_replies"] = on_own["kl_teacher_student"]
        result[name]["greedy_agreement"] = sum(a == b for a, b in zip(replies(student), teacher_replies)) / len(requests)
    return result


OPTIONAL_STAGES = PREFERENCE_STAGES + DISTILL_STAGES + RL_STAGES


def evaluate_model(model_dir: Path, data_dir: Path, out: Path, limit: int, corpus_lines: list[str],
                   base_dir: Path | None = None) -> dict:
    """Evaluate a full model folder, or an adapter folder on top of ``base_dir``."""
    from instructkit.evaluate.skills import evaluate_skills, write_eval
    from instructkit.models import load_for_inference

    if base_dir is not None:
        model, tokenizer = load_for_inference(base_dir, adapter=model_dir)
    else:
        model, tokenizer = load_for_inference(model_dir)
    metrics, samples = evaluate_skills(model, tokenizer, data_dir, limit=limit, corpus_lines=corpus_lines,
                                       max_new_tokens=ANSWER_TOKENS, batch_size=64)
    write_eval(out, metrics, samples)
    return metrics


def reproduce_commands(out_arg: str, flags: str, seed: int, summary: dict, stages: tuple[str, ...]) -> list[str]:
    """The report's "Reproduce" list: the demo in one command, then each step it ran with the same settings,
    and the evaluation of every model in ``summary["results"]`` (what the run evaluated)."""
    out = Path(out_arg)
    results = summary["results"]
    students = [n for n in STUDENTS if n in results]  # sequence-level KD is skipped when the teacher gave nothing

    def model_args(name: str) -> str:
        if name == "base":
            return f"--model {summary['base']}"
        if name == "sft-lora":
            return f"--model {summary['base']} --adapter {out / 'sft-lora/final'}"
        if name in RL_STAGES:  # LoRA adapters on the full SFT model
            return f"--model {out / 'sft-full/final'} --adapter {out / name / 'final'}"
        return f"--model {out / name / 'final'}"

    commands = [
        f"instructkit demo --out {out_arg}{flags} --seed {seed}   # everything below in one command",
        f"instructkit synth skills --out {out / 'data'} --seed {seed}",
        f"instructkit train {Path(summary['base']).parent / 'config.yaml'}   # the base: pretraining (Muon, one fact per block)",
        f"instructkit train {out / 'sft-full/config.yaml'}        # base model: {summary['base']}",
        f"instructkit train {out / 'sft-lora/config.yaml'}",
    ] + [f"instructkit train {out / m / 'config.yaml'}" for m in stages if m != "distill"]
    if "distill" in stages:
        commands += [f"instructkit synth distill-data --teacher {out / 'sft-full/final'} --prompts {out / 'data/train.jsonl'}"
                     f" --out {out / 'distill-data/train.jsonl'} --max-new-tokens {ANSWER_TOKENS}"] + \
            [f"instructkit train {out / m / 'config.yaml'}" for m in students]
    return commands + [f"instructkit eval {model_args(m)} --data {out / 'data'} --out {out / f'eval-{m}'}"
                       f" --limit {summary['limit']} --max-new-tokens {ANSWER_TOKENS}" for m in results]


def plan_message(plan, measured: dict, pretrain_epochs: float, max_pretrain: float, max_sft: float) -> str:
    """One line on how this run was sized, for the console and the report."""
    base = (f"pretraining {plan.pretrain_epochs:g} of {max_pretrain:g} epochs" if plan.pretrain_epochs is not None
            else f"cached base ({pretrain_epochs:g} pretraining epochs)")
    return (f"budget: a pretraining step takes {measured['pretrain_step_s']:.2f}s here "
            f"({measured['pretrain_steps_per_epoch']} per epoch), an SFT step {measured['sft_step_s']:.2f}s "
            f"({measured['sft_steps_per_epoch']} per epoch) -> {base}, SFT {plan.sft_epochs:g} of {max_sft:g} epochs; "
            f"predicted {plan.predicted_total_s:.0f}s of {plan.budget_s:.0f}s"
            + ("" if plan.fits else " (OVER budget even at the smallest plan: this machine is too slow for it)")
            + ". --budget 0 trains the full recipe whatever it costs.")


TUNE_BUDGET_SHARE = 0.3  # of the cold budget, for a run whose base is cached (600 s -> 180 s)


def run_demo(out: str | Path = "runs/demo", cache: str | Path = ".cache/instructkit", quick: bool = False,
             seed: int = 0, preset: str = "micro", limit: int | None = None, sft_epochs: float = FULL_SFT_EPOCHS,
             n_train: int = N_TRAIN, n_corpus: int = N_CORPUS, with_stages: tuple[str, ...] = (),
             rl_steps: int | None = None, budget: float | None = None) -> dict:
    """Run every stage and return ``{"results", "times", "base", "quick", "limit", "epochs", "plan"}``.

    ``preset``, ``n_train``, ``n_corpus`` and ``sft_epochs`` exist so tests can run the whole
    pipeline at a miniature scale; the defaults are the demo's. ``with_stages`` adds optional stages
    after SFT: ``dpo`` and ``orpo`` (from the full SFT model, on the curriculum's preference pairs,
    evaluated like the others), ``reward`` (a reward model; its held-out pairwise accuracy), ``distill``
    and ``grpo`` / ``ppo`` (online RL from the full SFT model, the skills verifier as reward;
    ``rl_steps`` optimizer steps = rollouts, default ``RL_STEPS``, ``RL_STEPS_QUICK`` with ``quick``).

    ``budget``: wall seconds for the run from cold (the CLI's default is 600, 180 with ``quick``). The demo
    times a few of its own training steps on this machine and trains as many epochs as fit, up to the
    recipe's (:mod:`instructkit.budget`): tuning so that a rerun with the base cached fits
    ``TUNE_BUDGET_SHARE`` of the budget (all of it with ``quick``), pretraining with what is left. A cached
    base pretrained at least as long as planned, or at most ``REUSE_TOLERANCE_EPOCHS`` shorter, is reused,
    with the tuning epochs of the run that built it while they are predicted to fit. None trains the recipe's epochs (5 of
    pretraining and ``sft_epochs`` of tuning; 1 and 1 with ``quick``) whatever they cost.
    """
    unknown = [s for s in with_stages if s not in OPTIONAL_STAGES]
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; choose from {', '.join(OPTIONAL_STAGES)}")
    if budget is not None and budget <= 0:
        raise ValueError(f"budget must be a positive number of seconds or None, got {budget}")
    from instructkit.synth.skills import write_skills

    t_start = time.perf_counter()
    out, cache = Path(out), Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    n_stages = 6 + len(with_stages)
    limit = limit or (20 if quick else 40)
    max_pretrain = 1.0 if quick else FULL_PRETRAIN_EPOCHS  # --quick: a one-epoch base, one epoch of tuning
    max_sft = min(sft_epochs, 1.0) if quick else sft_epochs

    _stage(1, n_stages, "generating the skills curriculum")
    t = time.perf_counter()
    data_dir = out / "data"
    small = n_train < 1000  # miniature runs (tests) get proportionally small eval splits
    write_skills(data_dir, seed=seed, n_train=n_train, n_corpus=n_corpus,
                 **({"n_val": 27, "n_heldout_phrasing": 27, "n_heldout_family": 8} if small else {}))
    corpus = (data_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()
    # The forgetting probe must be text the base never trained on: hold out the corpus tail.
    n_probe = min(300, len(corpus) // 10)
    (data_dir / "corpus_pretrain.txt").write_text("\n".join(corpus[:-n_probe]) + "\n", encoding="utf-8")
    (data_dir / "corpus_heldout.txt").write_text("\n".join(corpus[-n_probe:]) + "\n", encoding="utf-8")
    probe = corpus[-n_probe:]
    times["curriculum"] = time.perf_counter() - t

    _stage(2, n_stages, "building the tiny base model (pretrained on the plain-text skills corpus)")
    t = time.perf_counter()
    recipe = base_recipe(preset, seed, False)
    cached = cached_bases(data_dir, cache / "demo", recipe)
    plan, measured, init = None, None, None
    want = max_pretrain
    if budget is not None:
        tune_budget = budget if quick else TUNE_BUDGET_SHARE * budget
        if cached:  # same shapes and tokenizer as the init: time the cached base instead of building an init
            probe_model, tokenizer_s = cached[max(cached)], 0.0
        else:
            t_init = time.perf_counter()
            init = probe_model = build_init(data_dir, cache / "demo", recipe)
            tokenizer_s = time.perf_counter() - t_init
        t_measure = time.perf_counter()
        costs, measured = measure_costs(probe_model, data_dir, recipe, seed)
        times["sizing to the budget"] = time.perf_counter() - t_measure
        spent = time.perf_counter() - t_start
        plan_kw = dict(budget_s=budget, tune_budget_s=tune_budget, spent_s=spent, tune_spent_s=spent - tokenizer_s,
                       max_pretrain_epochs=max_pretrain, max_sft_epochs=max_sft, joint=quick, margin=PLAN_MARGIN)
        plan = plan_epochs(costs, pretrain=True, **plan_kw)
        want = plan.pretrain_epochs
    # A base pretrained at least as long as planned (e.g. the full one for --quick); with a budget, also one up
    # to REUSE_TOLERANCE_EPOCHS shorter, so a rerun on a machine timed a little faster than before reuses
    # the base it built rather than pretraining again.
    tolerance = REUSE_TOLERANCE_EPOCHS if budget is not None else 0.0
    usable = {e: path for e, path in cached.items() if e >= want - tolerance}
    pretrain_epochs = max(usable) if usable else want
    if usable and plan is not None:  # tuning sized for a run whose base is cached
        plan = plan_epochs(costs, pretrain=False, **plan_kw)
        from instructkit.export import read_json

        built = read_json(usable[pretrain_epochs].parent / "demo_plan.json") or {}
        if built.get("budget") == budget and built.get("quick") == quick and built.get("sft_epochs", 0) > plan.sft_epochs:
            # The run that built this base tuned longer; repeat it when it is predicted to fit, so that
            # rerunning the demo repeats its numbers rather than following this minute's timing noise.
            again = plan_epochs(costs, pretrain=False, sft_epochs=built["sft_epochs"], **plan_kw)
            plan = again if again.fits else plan
    if plan is not None:
        print(plan_message(plan, measured, pretrain_epochs, max_pretrain, max_sft), file=sys.stderr, flush=True)
    sft_epochs = plan.sft_epochs if plan is not None else max_sft
    if usable:
        base = usable[pretrain_epochs]
        print(f"reusing cached base model {base} ({pretrain_epochs:g} pretraining epochs)", file=sys.stderr)
    else:
        base = build_base(data_dir, cache / "demo", {**recipe, "pretrain_epochs": _epochs_value(want)}, init)
        if plan is not None:
            (base.parent / "demo_plan.json").write_text(json.dumps({"budget": budget, "quick": quick,
                                                                    "sft_epochs": sft_epochs}))
    times["base model"] = time.perf_counter() - t - times.get("sizing to the budget", 0.0)

    _stage(3, n_stages, "evaluating the base model")
    t = time.perf_counter()
    results = {"base": evaluate_model(base, data_dir, out / "eval-base", limit, probe)}
    times["eval base"] = time.perf_counter() - t

    _stage(4, n_stages, "SFT: full fine-tuning")
    t = time.perf_counter()
    full = sft_run("full", base, data_dir, out, lora=False, epochs=sft_epochs, seed=seed)
    times["sft full"] = time.perf_counter() - t

    _stage(5, n_stages, "SFT: LoRA")
    t = time.perf_counter()
    lora = sft_run("lora", base, data_dir, out, lora=True, epochs=sft_epochs, seed=seed)
    times["sft lora"] = time.perf_counter() - t

    _stage(6, n_stages, "evaluating the tuned models")
    t = time.perf_counter()
    results["sft-full"] = evaluate_model(full, data_dir, out / "eval-sft-full", limit, probe)
    results["sft-lora"] = evaluate_model(lora, data_dir, out / "eval-sft-lora", limit, probe, base_dir=base)
    times["eval tuned"] = time.perf_counter() - t

    preference_summary = {}
    distill_summary = {}
    rl_results = {}
    for i, method in enumerate(with_stages):
        if method in RL_STAGES:
            _stage(7 + i, n_stages, f"{method.upper()} from the full SFT model (LoRA, skills verifier as reward)")
            t = time.perf_counter()
            steps = rl_steps or (RL_STEPS_QUICK if quick else RL_STEPS)
            final = rl_run(method, full, data_dir, out, seed, steps, RL_PROBE_QUICK if quick else RL_PROBE,
                           eval_prompts=64 if quick else 540)
            results[method] = evaluate_model(final, data_dir, out / f"eval-{method}", limit, probe, base_dir=full)
            rl_results[method] = rl_summary(out / method, method)
            for name, when in (("sft-full", "start"), (method, "end")):  # validation, greedy, as for the others
                val = results[name]["splits"]["validation"]
                rl_results[method][f"validation_accuracy_{when}"] = val["accuracy"]  # the verifier = the reward
                rl_results[method][f"validation_exact_match_{when}"] = val["exact_match"]
            times[method] = time.perf_counter() - t
            continue
        if method == "distill":  # teacher: the full SFT model; three nano students (SFT, KD, sequence KD)
            _stage(7 + i, n_stages, "distillation: SFT vs token-level KD vs sequence-level KD of a nano student")
            t = time.perf_counter()
            kd_results, distill_summary = distill_demo(full, base, data_dir, out, cache, seed, quick, sft_epochs,
                                                       limit, probe)
            results.update(kd_results)
            times[method] = time.perf_counter() - t
            continue
        _stage(7 + i, n_stages, f"{method.upper()} from the full SFT model" if method != "reward"
               else "reward model on the preference pairs")
        t = time.perf_counter()
        final = preference_run(method, full, data_dir, out, seed)
        run_summary = json.loads((out / method / "summary.json").read_text())
        preference_summary[method] = {k: v for k, v in run_summary["final_metrics"].items()
                                      if k.startswith("eval_") or k == "loss"}
        if method != "reward":
            results[method] = evaluate_model(final, data_dir, out / f"eval-{method}", limit, probe)
        times[method] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    summary = {"results": results, "times": times, "base": str(base), "quick": quick, "limit": limit,
               "preference": preference_summary, "budget": budget,
               "epochs": {"pretrain": pretrain_epochs, "sft": sft_epochs, "pretrain_recipe": max_pretrain,
                          "sft_recipe": max_sft},
               "plan": {**asdict(plan), "measured": measured} if plan is not None else None}
    if distill_summary:  # held-out agreement of the distilled students with their teacher
        summary["distill"] = distill_summary
    if rl_results:  # training-rollout reward and KL of the online RL stages
        summary["rl"] = rl_results
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
