"""The ``instructkit`` command.

Each subcommand parses its arguments and calls into the library; errors that concern the user's
input (config, data, model path) are printed as one clear message without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = {"sft": "instructkit.methods.sft", "pretrain": "instructkit.methods.pretrain"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from instructkit.config import ConfigError
    from instructkit.data.errors import DataError
    from instructkit.data.templates import TemplateError
    from instructkit.loop import TrainingError
    from instructkit.models import ModelError

    return (ConfigError, DataError, ModelError, TemplateError, TrainingError)


# ---------------------------------------------------------------------------------------------- train


def cmd_train(args) -> int:
    import importlib

    from instructkit.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=true")
    cfg = load_config(args.config, overrides)
    module = importlib.import_module(METHODS[cfg.method])
    result = module.main(cfg)
    if result.status == "interrupted":
        return 130
    return 0


def cmd_validate(args) -> int:
    """Config, tokenizer, template and every data record, without loading model weights."""
    from instructkit.config import load_config
    from instructkit.data.pipeline import load_sft_data, prepare_template
    from instructkit.models import load_tokenizer

    cfg = load_config(args.config, list(args.overrides))
    print(f"config: ok (method {cfg.method}, model {cfg.model.name_or_path})")
    tokenizer = load_tokenizer(cfg.model)
    template, added = prepare_template(tokenizer, cfg.data)
    print(f"template: ok ({'tokenizer' if cfg.data.template == 'auto' else cfg.data.template}"
          f"{f', {added} special tokens added' if added else ''})")
    data = load_sft_data(cfg.data, tokenizer, template, cfg.seed)
    n_tok = sum(len(e.input_ids) for e in data.train)
    n_tgt = sum(e.n_targets for e in data.train)
    print(f"data: ok ({len(data.train)} train, {len(data.eval)} eval examples; {n_tok} tokens, "
          f"{n_tgt} target tokens; {data.n_truncated} truncated)")
    print(data.report.summary())
    return 1 if len(data.report) and cfg.data.on_error == "raise" else 0


# ---------------------------------------------------------------------------------------------- data


def _tokenizer_for(model_dir: str | None):
    if model_dir:
        from instructkit.config import ModelConfig
        from instructkit.models import load_tokenizer

        return load_tokenizer(ModelConfig(name_or_path=model_dir))
    # Without a model, preview with the tiny tokenizer (ChatML) so the command works offline.
    from instructkit.tiny_model import PRESETS, default_corpus, train_tokenizer

    print("(no --model given: using the built-in tiny ChatML tokenizer)", file=sys.stderr)
    return train_tokenizer(default_corpus(0), PRESETS["nano"]["vocab_size"])


def _load_for_data_cmd(args, tokenizer, on_error: str):
    from instructkit.data.errors import SkipReport
    from instructkit.data.formats import load_examples
    from instructkit.data.templates import resolve_template

    template = resolve_template(tokenizer, args.template)
    report = SkipReport()
    records = load_examples([args.file], format=args.format, on_error=on_error, kind="sft", report=report)
    return template, records, report


def cmd_data_preview(args) -> int:
    from instructkit.data.encode import encode_messages, render_spans
    from instructkit.data.errors import DataError

    tokenizer = _tokenizer_for(args.model)
    template, records, report = _load_for_data_cmd(args, tokenizer, "skip")
    color = sys.stdout.isatty() and not args.no_color
    shown = 0
    for rec in records:
        if shown >= args.n:
            break
        try:
            enc = encode_messages(tokenizer, rec["messages"], template=template, train_on=args.train_on,
                                  max_length=args.max_length, truncation="right",
                                  file=rec.get("_file"), line=rec.get("_line"))
        except DataError as e:
            print(f"[skipped] {e}")
            continue
        print(f"=== {Path(rec['_file']).name}:{rec['_line']} ({rec.get('_format')}) "
              f"{len(enc.input_ids)} tokens, {enc.n_targets} trained ===")
        parts = []
        for text, trained in render_spans(tokenizer, enc):
            if color:
                parts.append(f"\x1b[1;32m{text}\x1b[0m" if trained else f"\x1b[2m{text}\x1b[0m")
            else:
                parts.append(f"[[{text}]]" if trained else text)
        print("".join(parts))
        shown += 1
    legend = "green = trained, dim = context" if color else "[[...]] = trained tokens, the rest is context"
    print(f"--- {legend}; {len(report)} records skipped")
    if len(report):
        print(report.summary())
    return 0


def cmd_data_stats(args) -> int:
    import numpy as np

    from instructkit.data.encode import encode_messages
    from instructkit.data.errors import DataError

    tokenizer = _tokenizer_for(args.model)
    template, records, report = _load_for_data_cmd(args, tokenizer, "skip")
    lengths, targets, turns, too_long = [], [], [], 0
    formats: dict[str, int] = {}
    for rec in records:
        formats[rec.get("_format", "?")] = formats.get(rec.get("_format", "?"), 0) + 1
        try:
            enc = encode_messages(tokenizer, rec["messages"], template=template, train_on=args.train_on,
                                  max_length=None, file=rec.get("_file"), line=rec.get("_line"))
        except DataError as e:
            report.add(e)
            continue
        lengths.append(len(enc.input_ids))
        targets.append(enc.n_targets)
        turns.append(sum(1 for m in rec["messages"] if m["role"] == "assistant"))
        too_long += len(enc.input_ids) > args.max_length
    stats = {"file": args.file, "records_seen": report.total_seen, "usable": len(lengths),
             "skipped": len(report), "skipped_by_reason": {k: len(v) for k, v in report.by_reason().items()},
             "formats": formats, "max_length": args.max_length,
             "longer_than_max_length": too_long}
    if lengths:
        arr, tgt = np.array(lengths), np.array(targets)
        stats["tokens"] = {f"p{p}": int(np.percentile(arr, p)) for p in (0, 10, 50, 90, 99, 100)}
        stats["tokens"]["mean"] = round(float(arr.mean()), 1)
        stats["target_tokens"] = {"total": int(tgt.sum()), "mean": round(float(tgt.mean()), 1),
                                  "fraction_of_tokens": round(float(tgt.sum() / arr.sum()), 4)}
        stats["assistant_turns"] = {"mean": round(float(np.mean(turns)), 2), "max": int(max(turns))}
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{args.file}: {stats['usable']} usable of {stats['records_seen']} records "
              f"({stats['skipped']} skipped), formats {formats}")
        if lengths:
            t = stats["tokens"]
            print(f"tokens per example: p0 {t['p0']}  p10 {t['p10']}  p50 {t['p50']}  p90 {t['p90']}  "
                  f"p99 {t['p99']}  max {t['p100']}  mean {t['mean']}")
            print(f"target tokens: {stats['target_tokens']['total']} "
                  f"({stats['target_tokens']['fraction_of_tokens']:.1%} of all tokens)")
            print(f"assistant turns per example: mean {stats['assistant_turns']['mean']}, "
                  f"max {stats['assistant_turns']['max']}")
        print(f"longer than max_length {args.max_length}: {too_long} "
              f"(would be {'an error' if too_long else 'fine'} with data.truncation: error)")
        if len(report):
            print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------- tools


def cmd_tiny_model(args) -> int:
    from transformers import AutoModelForCausalLM

    from instructkit.models import count_trainable
    from instructkit.tiny_model import build_tiny_model

    t0 = time.perf_counter()
    out = build_tiny_model(args.out, preset=args.preset, seed=args.seed)
    n = count_trainable(AutoModelForCausalLM.from_pretrained(out))[1]
    print(f"wrote {args.preset} model ({n:,} parameters) to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_synth_toy(args) -> int:
    from instructkit.synth.toy import write_toy_dataset

    out = write_toy_dataset(args.out, n_train=args.n, n_eval=args.n_eval, seed=args.seed)
    print(f"wrote {args.n} train and {args.n_eval} eval conversations to {out}/train.jsonl, eval.jsonl")
    return 0


def cmd_synth_skills(args) -> int:
    from instructkit.synth.skills import write_skills

    out = write_skills(args.out, seed=args.seed, n_train=args.n_train, n_corpus=args.n_corpus)
    manifest = json.loads((Path(args.out) / "manifest.json").read_text())
    counts = manifest["sizes"]
    print(f"wrote the skills suite to {out or args.out}: {json.dumps(counts)}")
    print(f"held-out families: {', '.join(manifest.get('heldout_families', []))}")
    return 0


def cmd_demo(args) -> int:
    """The embedded default: skills curriculum, pretrained tiny base, SFT, evaluation, report."""
    from instructkit.demo import run_demo
    from instructkit.report import write_report

    summary = run_demo(out=args.out, cache=args.cache, quick=args.quick, seed=args.seed, limit=args.limit)
    out = Path(args.out)
    q = " --quick" if args.quick else ""
    commands = [
        f"instructkit demo --out {args.out}{q} --seed {args.seed}   # everything below in one command",
        f"instructkit synth skills --out {out / 'data'} --seed {args.seed}",
        f"instructkit train {out / 'sft-full/config.yaml'}        # base model: {summary['base']}",
        f"instructkit train {out / 'sft-lora/config.yaml'}",
        f"instructkit eval --model {summary['base']} --data {out / 'data'} --out {out / 'eval-base'}"
        f" --limit {summary['limit']}",
        f"instructkit eval --model {out / 'sft-full/final'} --data {out / 'data'} --out {out / 'eval-sft-full'}"
        f" --limit {summary['limit']}",
        f"instructkit eval --model {summary['base']} --adapter {out / 'sft-lora/final'} --data {out / 'data'}"
        f" --out {out / 'eval-sft-lora'} --limit {summary['limit']}",
    ]
    md, html_path = write_report(out, summary, commands)
    res = summary["results"]
    print(f"\n{'split':18s}" + "".join(f"{m:>11s}" for m in res))
    for split in next(iter(res.values()))["splits"]:
        print(f"{split:18s}" + "".join(f"{res[m]['splits'][split]['accuracy']:11.1%}" for m in res))
    print(f"{'stops on its own':18s}" + "".join(f"{res[m]['splits']['validation']['stop_rate']:11.1%}" for m in res))
    print(f"\ntotal {summary['times']['total']:.0f}s. Report: {md} and {html_path}")
    return 0


# ---------------------------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    from instructkit.evaluate.skills import (SPLITS, check_chat_template, evaluate_skills, require_splits,
                                             write_eval)

    splits = tuple(args.splits.split(",")) if args.splits else SPLITS
    require_splits(args.data, splits)
    from instructkit.models import load_for_inference

    model, tokenizer = load_for_inference(args.model, args.adapter, args.template)
    check_chat_template(tokenizer, args.adapter or args.model)
    corpus = None
    if args.corpus:
        corpus = [x for x in Path(args.corpus).read_text(encoding="utf-8").splitlines() if x.strip()]
    print(f"evaluating {args.adapter or args.model} on {args.data}", file=sys.stderr)
    metrics, samples = evaluate_skills(model, tokenizer, args.data, splits=splits, limit=args.limit,
                                       max_new_tokens=args.max_new_tokens, corpus_lines=corpus)
    write_eval(args.out, metrics, samples)
    print(f"{'split':18s} {'accuracy':>9s} {'exact':>7s} {'stops':>7s} {'loss':>7s}")
    for split, m in metrics["splits"].items():
        print(f"{split:18s} {m['accuracy']:9.1%} {m['exact_match']:7.1%} {m['stop_rate']:7.1%} "
              f"{m['heldout_loss']:7.3f}")
    if "corpus_nll" in metrics:
        print(f"corpus NLL (forgetting probe): {metrics['corpus_nll']:.4f}")
    print(f"wrote {args.out}/eval.json and samples.jsonl")
    return 0


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructkit", description="Instruction tuning for causal LMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train with a YAML config (method: sft)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("validate", help="check config, template and data without training")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("data", help="inspect data files")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    for name, fn, helptext in (("preview", cmd_data_preview, "show which tokens are trained"),
                               ("stats", cmd_data_stats, "counts and token-length percentiles")):
        s = dsub.add_parser(name, help=helptext)
        s.add_argument("file")
        s.add_argument("--model", help="model folder whose tokenizer/template to use")
        s.add_argument("--format", default="auto")
        s.add_argument("--template", default="auto", help="'auto' or a built-in template name")
        s.add_argument("--train-on", default="assistant", choices=["assistant", "last_assistant", "all"])
        s.add_argument("--max-length", type=int, default=512)
        if name == "preview":
            s.add_argument("-n", type=int, default=3, help="examples to show")
            s.add_argument("--no-color", action="store_true")
        else:
            s.add_argument("--json", action="store_true", help="machine-readable output")
        s.set_defaults(func=fn)

    tm = sub.add_parser("tiny-model", help="write a tiny random Llama model + tokenizer (offline)")
    tm.add_argument("--out", required=True)
    tm.add_argument("--preset", default="nano", choices=["nano", "micro", "small"])
    tm.add_argument("--seed", type=int, default=0)
    tm.set_defaults(func=cmd_tiny_model)

    sy = sub.add_parser("synth", help="generate data")
    sysub = sy.add_subparsers(dest="synth_command", required=True, metavar="GENERATOR")
    toy = sysub.add_parser("toy", help="procedural multi-turn conversations (messages format)")
    toy.add_argument("--out", required=True)
    toy.add_argument("--n", type=int, default=2000)
    toy.add_argument("--n-eval", type=int, default=200)
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(func=cmd_synth_toy)

    ev = sub.add_parser("eval", help="evaluate a model on a suite (skills)")
    ev.add_argument("--model", required=True, help="model folder (base model when --adapter is given)")
    ev.add_argument("--adapter", help="LoRA adapter folder (its tokenizer and template are used)")
    ev.add_argument("--suite", default="skills", choices=["skills"])
    ev.add_argument("--data", required=True, help="folder written by `instructkit synth skills`")
    ev.add_argument("--out", required=True)
    ev.add_argument("--splits", help="comma-separated splits (default: all four)")
    ev.add_argument("--limit", type=int, help="at most this many prompts per split")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--corpus", help="plain-text lines for the forgetting probe (NLL)")
    ev.add_argument("--template", help="built-in template to use when the model has none")
    ev.set_defaults(func=cmd_eval)

    sk = sysub.add_parser("skills", help="the verifiable skills curriculum (splits, corpus, preferences)")
    sk.add_argument("--out", required=True)
    sk.add_argument("--seed", type=int, default=0)
    sk.add_argument("--n-train", type=int, default=6000)
    sk.add_argument("--n-corpus", type=int, default=30000)
    sk.set_defaults(func=cmd_synth_skills)

    dm = sub.add_parser("demo", help="the embedded default: tune a tiny model on the skills curriculum")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--cache", default=".cache/instructkit", help="where the pretrained base is kept")
    dm.add_argument("--quick", action="store_true", help="shorter pretraining and evaluation")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--limit", type=int, help="prompts per split in evaluation (default 40, quick 20)")
    dm.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
