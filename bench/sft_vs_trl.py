"""instructkit SFT vs TRL SFTTrainer (padded and packed), same model, data and optimiser, on this CPU.

Each (tool, run) trains in its own subprocess so peak resident memory is measured cleanly. All
modes start from identical weights, see the same 2,000+ conversations for one epoch, use AdamW with
the same lr/betas/eps/weight decay, constant LR, clipping at 1.0, and train only assistant tokens.
Afterwards every trained model is scored by the same function (token-mean NLL on the assistant
tokens of a held-out set), so "loss at equal tokens" compares like with like.

A real model (``--model DIR`` or a ``.gguf`` file) replaces the tiny preset; its tokenizer's chat
template is used by both tools (TRL gets the same template with ``{% generation %}`` markers, checked
to render identically, because its assistant-only loss needs them). ``--lora`` trains LoRA adapters
(r=16, alpha=32, dropout 0, on q,k,v,o,gate,up,down) in both tools. ``--steps N`` caps every mode at
N optimizer steps. Throughput is timed over steady-state steps only: the first ``--warmup-steps``
steps (allocator, kernel and data-loader warm-up) are left out for every mode. Peak RSS is read when
training ends (model load, data and training included; instructkit's final save and the held-out
scoring are not). Activation checkpointing is off in both tools unless ``--gradient-checkpointing``
(TRL's SFTConfig turns it on by default, which trades speed for memory). ``--bf16`` runs both tools
under bf16 autocast with fp32 master weights (instructkit ``train.bf16: true``, TRL ``bf16=True``);
on a CPU with AMX this is the fast setting, and MFU is then measured against the bf16 matmul peak.

Usage:
    python bench/sft_vs_trl.py --runs 3               # appends a section to bench/RESULTS.md
    python bench/sft_vs_trl.py --runs 1 --n 300 --no-record   # quick smoke run
    python bench/sft_vs_trl.py --model /path/SmolLM2-135M-Instruct --lora --data sharegpt \
        --batch 4 --max-length 256 --steps 12 --runs 3  # real model, LoRA, ShareGPT sample
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("instructkit", "trl_padded", "trl_packed")
DEFAULT_N = 2000
SHAREGPT = ROOT.parent / "shared/data/sharegpt/dummy_conversation.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32


# ---------------------------------------------------------------------------------------------- setup


def hf_folder(model: str) -> str:
    """A Hugging Face folder for ``model``: the path itself, or the folder a ``.gguf`` file converts to.

    TRL and transformers load folders only; instructkit's own loaders take the ``.gguf`` path as is.
    """
    if not model.endswith(".gguf"):
        return model
    try:
        from instructkit.gguf import resolve_model_path
    except ImportError:
        raise SystemExit(f"--model {model}: this checkout has no instructkit.gguf to convert a .gguf "
                         f"file; pass a Hugging Face model folder instead") from None
    return str(resolve_model_path(model))


def split_conversations(src: str | Path, out_dir: Path, n_eval: int, n_max: int | None) -> dict:
    """Train/held-out JSONL (``messages`` format) from any file instructkit reads (ShareGPT, alpaca...).

    The last ``n_eval`` conversations are held out; the files go under the bench work folder only.
    """
    from instructkit.data.formats import load_examples

    recs = [{"messages": r["messages"]} for r in load_examples([src], kind="sft")]
    if len(recs) <= n_eval:
        raise SystemExit(f"--data {src}: {len(recs)} conversations, need more than --eval-n {n_eval}")
    train, held = recs[:-n_eval], recs[-n_eval:]
    train = train[:n_max] if n_max else train
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("train", train), ("eval", held)):
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"train": str(paths["train"]), "eval": str(paths["eval"])}


def prepare(work: Path, a) -> dict:
    """Model folder (tiny preset built once, or ``--model``) and train/eval files for ``--data``."""
    from instructkit.synth.toy import write_toy_dataset
    from instructkit.tiny_model import build_tiny_model

    if a.model:
        model = a.model
    else:
        model_dir = work / f"model-{a.preset}"
        if not (model_dir / "config.json").exists():
            build_tiny_model(model_dir, preset=a.preset, seed=a.seed)
        model = str(model_dir)
    if a.data == "toy":
        data_dir = write_toy_dataset(work / "data", n_train=a.n, n_eval=200, seed=a.seed)
        data = {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl")}
    else:
        src = SHAREGPT if a.data == "sharegpt" else Path(a.data)
        data = split_conversations(src, work / f"data-{Path(src).stem}", a.eval_n,
                                   a.n if a.n != DEFAULT_N else None)
    return {"model": model, **data}


def steady_rate(steps: list[tuple[int, float]], warmup: int) -> tuple[float, float, int]:
    """(target tokens, seconds, steps) over the steps after the first ``warmup`` (all if too few).

    ``steps`` holds (target tokens, seconds) per optimizer step, in order.
    """
    kept = steps[warmup:] if len(steps) > warmup else steps
    return sum(t for t, _ in kept), sum(s for _, s in kept), len(kept)


def measure_matmul_peak(seconds: float = 2.0, n: int = 1024, bf16: bool = False) -> float:
    """Sustained matmul FLOP/s on this machine (the denominator of MFU), fp32 or bf16."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- workers


def common_eval_nll(model, tokenizer, eval_path: str, max_length: int) -> float:
    """Token-mean NLL on assistant tokens of the eval set, identical for every mode."""
    import torch

    from instructkit.data.encode import encode_messages
    from instructkit.data.formats import load_examples
    from instructkit.models import mean_nll

    batches = []
    for r in load_examples([eval_path], kind="sft"):
        e = encode_messages(tokenizer, r["messages"], template=tokenizer.chat_template,
                            max_length=max_length, truncation="right")
        batches.append({"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])})
    return mean_nll(model, batches)


def count_target_tokens(tokenizer, train_path: str, max_length: int) -> tuple[int, int, int]:
    from instructkit.data.encode import encode_messages
    from instructkit.data.formats import load_examples

    recs = load_examples([train_path], kind="sft")
    enc = [encode_messages(tokenizer, r["messages"], template=tokenizer.chat_template,
                           max_length=max_length, truncation="right") for r in recs]
    return sum(e.n_targets for e in enc), sum(len(e.input_ids) for e in enc), len(enc)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_instructkit(a) -> dict:
    from instructkit.config import load_config
    from instructkit.methods import sft
    from instructkit.models import load_for_inference

    out = Path(a.out)
    lora = {"enabled": True, "r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
            "target_modules": LORA_TARGETS} if a.lora else {"enabled": False}
    cfg = load_config(raw={
        "method": "sft", "seed": a.seed, "output_dir": str(out),
        "model": {"name_or_path": a.model, "gradient_checkpointing": a.gradient_checkpointing}, "lora": lora,
        "data": {"train": a.train, "max_length": a.max_length, "packing": True, "truncation": "right"},
        "train": {"epochs": 1, "max_steps": a.steps, "micro_batch_size": a.batch, "lr": a.lr,
                  "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "progress": False,
                  "bf16": bool(a.bf16)},
    })
    # Peak memory of training, read before the final save (safetensors serialises a copy of the
    # weights, which says nothing about training) -- TRL's run saves nothing.
    peak: dict[str, float] = {}
    real_save = sft.save_final

    def save_after_peak(*args, **kwargs):
        peak["mb"] = peak_rss_mb()
        return real_save(*args, **kwargs)

    sft.save_final = save_after_peak
    t0 = time.perf_counter()
    sft.main(cfg)
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Per-step time of the shared loop (batch collation included), the span TRL's steps cover too.
    seen, steps = 0, []
    for m in metrics:
        n = m["tokens_seen"] - seen
        seen = m["tokens_seen"]
        steps.append((n, n / m["target_tokens_per_s"]))
    tokens, secs, timed = steady_rate(steps, a.warmup_steps)
    final = out / "final"
    model, tok = (load_for_inference(hf_folder(a.model), adapter=final) if a.lora
                  else load_for_inference(final))
    return {"train_seconds": secs, "wall_seconds": wall, "steps": len(metrics), "timed_steps": timed,
            "step_log": [(n, round(t, 3)) for n, t in steps],
            "target_tokens": tokens, "peak_rss_mb": peak["mb"],
            "eval_nll": common_eval_nll(model, tok, a.eval, a.max_length)}


def trl_chat_template(tok) -> str | None:
    """A template TRL's assistant-only loss accepts, rendering exactly like the tokenizer's own.

    TRL masks by ``{% generation %}`` markers and patches only templates it knows. For ChatML
    templates such as SmolLM2's, wrap the assistant content and its ``<|im_end|>`` (the tokens
    instructkit trains on) in markers, then check that the rendering is unchanged.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tok.chat_template):
        return None
    try:
        return get_training_chat_template(tok)
    except ValueError:
        pass
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if turn not in tok.chat_template:
        raise SystemExit("TRL's assistant_only_loss needs {% generation %} markers and this bench only "
                         "knows how to add them to ChatML templates; give a model whose template has them")
    marked = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
              + turn + "{% endif %}")
    template = tok.chat_template.replace(turn, marked)
    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    for gen in (False, True):
        if (tok.apply_chat_template(sample, tokenize=False, add_generation_prompt=gen)
                != tok.apply_chat_template(sample, tokenize=False, add_generation_prompt=gen,
                                           chat_template=template)):
            raise SystemExit("the generation-marked ChatML template renders differently from the original")
    return template


def worker_trl(a, packed: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(a.seed)
    folder = hf_folder(a.model)
    tok = AutoTokenizer.from_pretrained(folder)
    marked = trl_chat_template(tok)
    if marked is not None:
        tok.chat_template = marked
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(x) for x in Path(a.train).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    args = SFTConfig(
        output_dir=a.out, num_train_epochs=1, per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_length=a.max_length, packing=packed, assistant_only_loss=True,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000, seed=a.seed,
        dataloader_num_workers=0, disable_tqdm=True, max_steps=a.steps or -1,
        # SFTConfig turns checkpointing on by default; both tools get the same setting here.
        # SFTConfig defaults to bf16=True (autocast, even on CPU); both tools get the same precision.
        gradient_checkpointing=a.gradient_checkpointing, bf16=bool(a.bf16),
    )
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    # Per step: the target tokens it trained on (labels that predict a token) and the time between
    # consecutive step ends, which covers data loading as instructkit's per-step time does.
    step_tokens: list[int] = []
    step_ends: list[float] = []

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            step_tokens.append(int((inputs["labels"][..., 1:] != -100).sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    trainer = CountingTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              peft_config=peft_config, callbacks=[StepClock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    starts = [t0, *step_ends[:-1]]
    steps = [(n, e - s) for n, s, e in zip(step_tokens, starts, step_ends)]
    tokens, secs, timed = steady_rate(steps, a.warmup_steps)
    return {"train_seconds": secs, "wall_seconds": wall, "steps": trainer.state.global_step,
            "timed_steps": timed, "step_log": [(n, round(t, 3)) for n, t in steps], "target_tokens": tokens, "peak_rss_mb": peak,
            "eval_nll": common_eval_nll(trainer.model, tok, a.eval, a.max_length)}


def run_worker(a) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    if a.worker == "instructkit":
        res = worker_instructkit(a)
    else:
        res = worker_trl(a, packed=a.worker == "trl_packed")
    res["target_tokens_per_s"] = res["target_tokens"] / res["train_seconds"]
    Path(a.result).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help="training conversations (toy data; with other data: at most this many)")
    p.add_argument("--preset", default="micro", help="tiny model preset, used when --model is not given")
    p.add_argument("--model", help="a Hugging Face model folder or a .gguf file instead of the tiny preset")
    p.add_argument("--lora", action="store_true",
                   help=f"LoRA r={LORA_R} alpha={LORA_ALPHA} on {','.join(LORA_TARGETS)} in both tools")
    p.add_argument("--data", default="toy",
                   help="'toy' (generated), 'sharegpt' (../shared/data sample) or a conversation file")
    p.add_argument("--eval-n", type=int, default=50, help="held-out conversations (non-toy data)")
    p.add_argument("--steps", type=int, help="stop every mode after this many optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing in both tools (default off in both; TRL's own default is on)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (mixed precision, fp32 master weights) in both tools")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="rows (packed) per step")
    p.add_argument("--lr", type=float,
                   help="default: 1e-3 for the tiny preset, 2e-4 with --lora, 2e-5 for full fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "bench/out/sft"))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-record", action="store_true")
    # internal
    p.add_argument("--worker")
    p.add_argument("--train")
    p.add_argument("--eval")
    p.add_argument("--out")
    p.add_argument("--result")
    a = p.parse_args()
    if a.lr is None:
        a.lr = 1e-3 if not a.model else 2e-4 if a.lora else 2e-5
    if a.worker:
        return run_worker(a)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, a)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = hf_folder(paths["model"])
    tok = AutoTokenizer.from_pretrained(folder)
    targets, tokens, n_ex = count_target_tokens(tok, paths["train"], a.max_length)
    m = AutoModelForCausalLM.from_pretrained(folder)
    n_params = sum(q.numel() for q in m.parameters())
    head = m.get_output_embeddings().weight.numel()
    del m
    # Padded TRL gets the same number of optimizer steps as the packed modes: the batch size in
    # examples that matches 8 packed rows of max_length tokens.
    from instructkit.data.packing import pack_best_fit_decreasing
    from instructkit.data.encode import encode_messages
    from instructkit.data.formats import load_examples

    lens = [len(encode_messages(tok, r["messages"], template=tok.chat_template, max_length=a.max_length,
                                truncation="right").input_ids) for r in load_examples([paths["train"]])]
    n_rows = len(pack_best_fit_decreasing(lens, a.max_length))
    padded_batch = max(1, round(a.batch * n_ex / n_rows))
    peak = measure_matmul_peak(bf16=a.bf16)
    precision = "bf16 autocast (fp32 master weights)" if a.bf16 else "fp32"
    model_name = f"`{a.model}`" if a.model else f"tiny `{a.preset}` Llama"
    print(f"model {model_name}: {n_params:,} params; data: {n_ex} conversations, {tokens} tokens, "
          f"{targets} target tokens, {n_rows} packed rows; matmul peak {peak / 1e9:.1f} GFLOP/s")

    results: dict[str, list[dict]] = {m: [] for m in a.modes.split(",")}
    for r in range(a.runs):
        for mode in results:
            out = work / f"{mode}-run{r}"
            res_file = work / f"{mode}-run{r}.json"
            batch = padded_batch if mode == "trl_padded" else a.batch
            cmd = [sys.executable, __file__, "--worker", mode, "--model", paths["model"], "--train",
                   paths["train"], "--eval", paths["eval"], "--out", str(out), "--result", str(res_file),
                   "--max-length", str(a.max_length), "--batch", str(batch), "--lr", str(a.lr),
                   "--seed", str(a.seed), "--warmup-steps", str(a.warmup_steps)]
            cmd += (["--steps", str(a.steps)] if a.steps else []) + (["--lora"] if a.lora else []) \
                + (["--gradient-checkpointing"] if a.gradient_checkpointing else []) \
                + (["--bf16"] if a.bf16 else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:])
                raise SystemExit(f"{mode} run {r} failed")
            res = json.loads(res_file.read_text())
            results[mode].append(res)
            print(f"run {r} {mode:12s} {res['target_tokens_per_s']:9.0f} target tok/s  "
                  f"peak {res['peak_rss_mb']:7.0f} MB  eval NLL {res['eval_nll']:.4f}  "
                  f"steps {res['steps']} (timed {res['timed_steps']})  ({time.perf_counter() - t0:.0f}s)")

    # Useful FLOPs per target token: 6 x non-embedding params per input token (forward+backward)
    # plus 6 x head params per target token, averaged over the data; 4x instead of 6x with LoRA (no
    # weight gradients for the base). Identical for every mode, so MFU ranks them fairly.
    factor = 4 if a.lora else 6
    flops_per_target = (factor * (n_params - head) * tokens + factor * head * targets) / targets
    summary = {}
    for mode, rs in results.items():
        med = {k: statistics.median(x[k] for x in rs)
               for k in ("target_tokens_per_s", "peak_rss_mb", "eval_nll", "train_seconds", "steps")}
        med["mfu"] = med["target_tokens_per_s"] * flops_per_target / peak
        summary[mode] = med
    trl_best = max((m for m in summary if m.startswith("trl")), key=lambda m: summary[m]["target_tokens_per_s"],
                   default=None)
    tuning = f"LoRA r={LORA_R} alpha={LORA_ALPHA} on {','.join(LORA_TARGETS)}" if a.lora \
        else "full fine-tuning"
    data_name = {"toy": "toy conversations (1-3 turns)",
                 "sharegpt": "ShareGPT-format sample (../shared/data/sharegpt)"}.get(a.data, f"`{a.data}`")
    model_arg = f"--model {a.model}" if a.model else f"--preset {a.preset}"
    steps_note = (f"capped at {a.steps} steps" if a.steps else "1 epoch")
    lines = ["", f"## SFT throughput: instructkit vs TRL SFTTrainer, {model_name}, "
             f"{'LoRA' if a.lora else 'full'}, {a.data} data, {'bf16' if a.bf16 else 'fp32'} ({time.strftime('%Y-%m-%d')})", "",
             f"- Command: `python bench/sft_vs_trl.py --runs {a.runs} {model_arg}{' --lora' if a.lora else ''} "
             f"--data {a.data} --n {a.n} --max-length {a.max_length} --batch {a.batch} --lr {a.lr}"
             f"{f' --steps {a.steps}' if a.steps else ''} --warmup-steps {a.warmup_steps}"
             f"{' --gradient-checkpointing' if a.gradient_checkpointing else ''}{' --bf16' if a.bf16 else ''}`",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{__import__('torch').__version__}, transformers {__import__('transformers').__version__}, "
             f"trl {__import__('trl').__version__}; matmul peak {peak / 1e9:.1f} GFLOP/s "
             f"({'bf16' if a.bf16 else 'fp32'}, measured)",
             f"- Model: {model_name} ({n_params:,} params), identical initial weights, {tuning}; data: "
             f"{n_ex} {data_name}, {tokens:,} tokens, {targets:,} assistant target tokens; "
             f"{steps_note}, AdamW lr {a.lr} constant, clip 1.0, {precision} in both, gradient checkpointing "
             f"{'on' if a.gradient_checkpointing else 'off'} in both (TRL's SFTConfig default is on). Packed modes: {a.batch} rows x "
             f"{a.max_length} per step; TRL padded: {padded_batch} examples per step (same step count).",
             f"- Median of {a.runs} runs each, all modes in the same invocation; tokens/s over the steps "
             f"after the first {a.warmup_steps}; peak RSS at the end of training (model load included).", "",
             "| mode | target tok/s | instructkit speed-up over this mode | peak RSS (MB) | held-out NLL after training | steps | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    ik = summary.get("instructkit")
    for mode, s in summary.items():
        ratio = (ik["target_tokens_per_s"] / s["target_tokens_per_s"]) if ik else float("nan")
        lines.append(f"| {mode} | {s['target_tokens_per_s']:.0f} | {ratio:.2f}x | {s['peak_rss_mb']:.0f} | "
                     f"{s['eval_nll']:.4f} | {s['steps']:.0f} | {s['mfu']:.1%} |")
    if ik and trl_best:
        lines.append("")
        lines.append(f"instructkit vs TRL's best mode ({trl_best}): "
                     f"{ik['target_tokens_per_s'] / summary[trl_best]['target_tokens_per_s']:.2f}x target tokens/s, "
                     f"peak memory {ik['peak_rss_mb']:.0f} vs {summary[trl_best]['peak_rss_mb']:.0f} MB, "
                     f"held-out NLL {ik['eval_nll']:.4f} vs {summary[trl_best]['eval_nll']:.4f}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_record:
        res_md = ROOT / "bench/RESULTS.md"
        if not res_md.exists():
            res_md.write_text("# Benchmark results\n\nAppended by the scripts in bench/. Newest last.\n")
        with open(res_md, "a", encoding="utf-8") as f:
            f.write(text)
    if not all(math.isfinite(s["eval_nll"]) for s in summary.values()):
        raise SystemExit("a mode produced a non-finite loss")


if __name__ == "__main__":
    main()
