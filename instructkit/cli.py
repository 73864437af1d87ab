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

METHODS = {"sft": "instructkit.methods.sft", "pretrain": "instructkit.methods.pretrain",
           "dpo": "instructkit.methods.preference", "simpo": "instructkit.methods.preference",
           "orpo": "instructkit.methods.preference", "kto": "instructkit.methods.preference",
           "reward": "instructkit.methods.reward", "distill": "instructkit.methods.distill",
           "grpo": "instructkit.methods.grpo", "ppo": "instructkit.methods.ppo"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from instructkit.config import ConfigError
    from instructkit.data.errors import DataError
    from instructkit.data.templates import TemplateError
    from instructkit.distributed import DistributedError
    from instructkit.loop import TrainingError
    from instructkit.models import ModelError

    return (ConfigError, DataError, DistributedError, ModelError, TemplateError, TrainingError)


# ---------------------------------------------------------------------------------------------- train


def cmd_train(args) -> int:
    import importlib

    from instructkit import distributed
    from instructkit.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=true")
    cfg = load_config(args.config, overrides)
    if cfg.distributed.nproc > 1 and not distributed.launched_by_torchrun():
        return distributed.relaunch(["train", args.config, *overrides], cfg.distributed.nproc)

    def run() -> int:
        result = importlib.import_module(METHODS[cfg.method]).main(cfg)
        return 130 if result.status == "interrupted" else 0

    if distributed.init(cfg.distributed) is None:
        return run()
    try:
        # Under torchrun, an exception on any rank is recorded for torchrun's failure report.
        code = distributed.record_errors(run)()
        distributed.barrier()  # no rank tears the group down while another still has collectives in flight
        return code
    finally:
        distributed.shutdown()


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
    from instructkit.curate.apply import CURATION_REASONS  # removals by data.curate are not errors

    errors = [r for r in data.report.records if r.reason not in CURATION_REASONS]
    return 1 if errors and cfg.data.on_error == "raise" else 0


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
    from instructkit.demo import OPTIONAL_STAGES, reproduce_commands, rl_line, run_demo
    from instructkit.report import write_report

    stages = tuple(x.strip() for x in args.with_stages.split(",") if x.strip()) if args.with_stages else ()
    if any(s not in OPTIONAL_STAGES for s in stages):
        print(f"error: --with takes a comma-separated list of {', '.join(OPTIONAL_STAGES)}; got "
              f"'{args.with_stages}'", file=sys.stderr)
        return 2
    if args.budget is not None and args.budget < 0:
        print(f"error: --budget takes seconds (0 = no budget, the full recipe); got {args.budget:g}", file=sys.stderr)
        return 2
    budget = (180.0 if args.quick else 600.0) if args.budget is None else (args.budget or None)
    summary = run_demo(out=args.out, cache=args.cache, quick=args.quick, seed=args.seed, limit=args.limit,
                       with_stages=stages, budget=budget)
    out = Path(args.out)
    q = (" --quick" if args.quick else "") + (f" --budget {args.budget:g}" if args.budget is not None else "")
    commands = reproduce_commands(args.out, q, args.seed, summary, stages)
    md, html_path = write_report(out, summary, commands)
    res = summary["results"]
    w = {m: max(11, len(m) + 2) for m in res}  # column widths: student-seqkd is longer than 11
    print(f"\n{'split':18s}" + "".join(f"{m:>{w[m]}s}" for m in res))
    for split in next(iter(res.values()))["splits"]:
        print(f"{split:18s}" + "".join(f"{res[m]['splits'][split]['accuracy']:{w[m]}.1%}" for m in res))
    print(f"{'stops on its own':18s}" + "".join(f"{res[m]['splits']['validation']['stop_rate']:{w[m]}.1%}" for m in res))
    if summary.get("distill"):  # instructkit demo --with distill: how close each student got to the teacher
        print(f"\n{'student (nano)':18s}{'KL(T||S)':>11s}{'KL(S||T)':>11s}{'agree':>8s}{'val NLL':>10s}")
        for name, m in summary["distill"].items():
            if "kl_teacher_student" in m:
                print(f"{name:18s}{m['kl_teacher_student']:11.4f}{m['kl_student_teacher']:11.4f}"
                      f"{m['greedy_agreement']:8.1%}{m['validation_nll']:10.4f}")
    for name, m in (summary.get("rl") or {}).items():  # --with grpo,ppo: numbers only, no claim
        print(rl_line(name, m))
    print(f"\ntotal {summary['times']['total']:.0f}s. Report: {md} and {html_path}")
    return 0


# ---------------------------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    if args.suite == "ifeval":
        return cmd_eval_ifeval(args)
    from instructkit.config import ConfigError
    from instructkit.evaluate.skills import (SPLITS, check_chat_template, evaluate_skills, require_splits,
                                             write_eval)

    for flag, value, what in (("--model", args.model, "the model folder to evaluate"),
                              ("--data", args.data, "a folder written by `instructkit synth skills`")):
        if not value:
            raise ConfigError(f"{flag} is required for --suite skills: give {what}")
    splits = tuple(args.splits.split(",")) if args.splits else SPLITS
    require_splits(args.data, splits)
    from instructkit.models import load_for_inference

    model, tokenizer = load_for_inference(args.model, args.adapter, args.template, dtype=args.dtype)
    check_chat_template(tokenizer, args.adapter or args.model)
    corpus = None
    if args.corpus:
        corpus = [x for x in Path(args.corpus).read_text(encoding="utf-8").splitlines() if x.strip()]
    print(f"evaluating {args.adapter or args.model} on {args.data}", file=sys.stderr)
    metrics, samples = evaluate_skills(model, tokenizer, args.data, splits=splits, limit=args.limit,
                                       max_new_tokens=args.max_new_tokens or 64, corpus_lines=corpus)
    write_eval(args.out, metrics, samples)
    print(f"{'split':18s} {'accuracy':>9s} {'exact':>7s} {'stops':>7s} {'loss':>7s}")
    for split, m in metrics["splits"].items():
        print(f"{split:18s} {m['accuracy']:9.1%} {m['exact_match']:7.1%} {m['stop_rate']:7.1%} "
              f"{m['heldout_loss']:7.3f}")
    if "corpus_nll" in metrics:
        print(f"corpus NLL (forgetting probe): {metrics['corpus_nll']:.4f}")
    print(f"wrote {args.out}/eval.json and samples.jsonl")
    return 0


def cmd_eval_ifeval(args) -> int:
    """IFEval: score a responses file, or generate greedy responses with a model and score them."""
    from instructkit.config import ConfigError
    from instructkit.evaluate import ifeval

    if not args.prompts:
        raise ConfigError("--prompts is required for --suite ifeval: give the IFEval input file "
                          "(input_data.jsonl with prompt, instruction_id_list and kwargs per line)")
    if bool(args.responses) == bool(args.model):
        raise ConfigError("--suite ifeval needs exactly one of --responses FILE (score existing responses) "
                          "or --model DIR (generate responses, then score them)")
    out = Path(args.out)
    records = ifeval.load_prompts(args.prompts)
    info = {"prompts_file": str(args.prompts), "n_prompts_in_file": len(records)}
    if args.responses:
        matched = ifeval.match_responses(records, ifeval.load_responses(args.responses), args.responses,
                                         args.prompts)
        records, texts = matched.records, matched.responses
        if args.limit is not None:
            records, texts = records[:args.limit], texts[:args.limit]
        info.update(responses_file=str(args.responses), n_prompts_without_response=len(matched.unanswered))
        if matched.unanswered:
            print(f"note: {len(matched.unanswered)} of {info['n_prompts_in_file']} prompts have no response in "
                  f"{args.responses} and are not scored (first: key {matched.unanswered[0].key})", file=sys.stderr)
    else:
        from instructkit.evaluate.skills import check_chat_template
        from instructkit.models import load_for_inference

        records = records[:args.limit] if args.limit is not None else records
        model, tokenizer = load_for_inference(args.model, args.adapter, args.template, dtype=args.dtype)
        check_chat_template(tokenizer, args.adapter or args.model)
        max_new = args.max_new_tokens or 1280
        print(f"generating {len(records)} IFEval responses with {args.adapter or args.model} "
              f"(greedy, at most {max_new} new tokens)", file=sys.stderr)
        t0 = time.perf_counter()
        rows = ifeval.generate_responses(model, tokenizer, records, max_new_tokens=max_new,
                                         batch_size=args.batch_size)
        path = ifeval.write_responses(out / "ifeval_responses.jsonl", rows)
        texts = [r["response"] for r in rows]
        info.update(model=str(args.model), adapter=str(args.adapter) if args.adapter else None,
                    max_new_tokens=max_new, responses_file=str(path),
                    stopped_on_their_own=sum(r["finish_reason"] == "stop" for r in rows) / max(1, len(rows)))
        print(f"generated in {time.perf_counter() - t0:.0f}s; responses in {path}", file=sys.stderr)
    result = ifeval.score_responses(records, texts)
    result.info.update(info)
    metrics_path, details_path = result.write(out)
    print(result.table())
    print(f"wrote {metrics_path} and {details_path}")
    return 0


# ---------------------------------------------------------------------------------------------- answer, judge


def _dtype_arg(parser) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights for generation; auto = bf16 on GPU, fp32 on CPU (bfloat16 is ~1.9x "
                             "faster on CPUs with AMX, with slightly different outputs)")


def _model_id(path: str) -> str:
    p = Path(path).resolve()
    # instructkit runs save to RUN/final; the run's name says more than "final".
    return p.parent.name if p.name in ("final", "merged") else p.name


def cmd_answer(args) -> int:
    from instructkit.evaluate.answer import generate_answers
    from instructkit.evaluate.judge_data import load_questions, write_answers
    from instructkit.evaluate.skills import check_chat_template
    from instructkit.generate import SamplingConfig
    from instructkit.models import load_for_inference

    questions = load_questions(args.questions)[: args.limit or None]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
    model, tokenizer = load_for_inference(args.model, args.adapter, args.template, dtype=args.dtype)
    check_chat_template(tokenizer, args.adapter or args.model)
    model_id = args.model_id or _model_id(args.adapter or args.model)
    t0 = time.perf_counter()
    records = generate_answers(model, tokenizer, questions, model_id=model_id, sampling=sampling,
                               max_turn=args.max_turn, batch_size=args.batch_size,
                               questions_file=args.questions,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
    write_answers(args.out, records)
    reasons = [r for rec in records for r in rec["finish_reasons"]]
    print(f"answered {len(records)} questions ({len(reasons)} turns) as {model_id!r} in "
          f"{time.perf_counter() - t0:.1f}s; {reasons.count('stop')}/{len(reasons)} replies ended on their "
          f"own, the rest hit --max-new-tokens {args.max_new_tokens}")
    print(f"wrote {args.out}")
    return 0


def cmd_judge(args) -> int:
    from instructkit.evaluate.judge import (JudgeOptions, format_summary, judge_pairwise, judge_single,
                                            stderr_progress, write_judgments)
    from instructkit.evaluate.judge_data import load_answers, load_questions, load_references
    from instructkit.openai_client import OpenAIClient, OpenAIClientError

    questions = load_questions(args.questions)
    selected = questions[: args.limit or None]
    refs = None
    if args.references == "questions":
        refs = {q.key: q.reference for q in questions if q.reference}
    elif args.references:
        refs = load_references(args.references, questions)

    def answers(path, name):
        return load_answers(path, questions, required=selected, allow_missing=args.allow_missing, name=name)[0]

    categories = tuple(c for c in args.ref_categories.split(",") if c)
    opts = JudgeOptions(references=refs, reference_categories=categories,
                        max_turn=args.max_turn, sampling={"max_tokens": args.judge_max_tokens},
                        cache_path=None if args.no_cache else Path(args.out) / "judge_cache.jsonl")
    try:
        client = OpenAIClient(args.judge_url, args.judge_model, api_key_env=args.api_key_env,
                              timeout=args.timeout, max_retries=args.max_retries, concurrency=args.concurrency)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.judge_command == "single":
                judgments, summary = judge_single(client, selected, answers(args.answers, args.name), opts,
                                                  progress=stderr_progress)
            else:
                a, b = answers(args.answers_a, args.name_a), answers(args.answers_b, args.name_b)
                if a.model == b.model:
                    a.model, b.model = f"{a.model}-a", f"{b.model}-b"  # keep the two apart in reports
                judgments, summary = judge_pairwise(client, selected, a, b, opts, progress=stderr_progress)
    except OpenAIClientError as e:
        print(f"error: {e}", file=sys.stderr)
        if opts.cache_path is not None and opts.cache_path.exists():
            print(f"(the judge replies received so far are saved in {opts.cache_path}; re-running the same "
                  f"command sends only the missing requests)", file=sys.stderr)
        return 2
    jpath, spath = write_judgments(args.out, judgments, summary)
    print(format_summary(summary))
    print(f"wrote {jpath} and {spath}")
    return 1 if judgments and summary["errors"]["count"] == len(judgments) else 0


# ---------------------------------------------------------------------------------------------- use: chat, serve, export


def cmd_chat(args) -> int:
    from instructkit.chat import run_chat

    run_chat(args.model, args.adapter, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_p=args.top_p, seed=args.seed, template=args.template)
    return 0


def cmd_serve(args) -> int:
    from instructkit.serve import ServerLimits, resolve_api_key, serve

    limits = ServerLimits(max_tokens=args.max_tokens_limit, max_batch=args.max_batch, max_queue=args.max_queue,
                          max_body_bytes=args.max_body_bytes)
    serve(args.model, args.adapter, host=args.host, port=args.port, api_key=resolve_api_key(args.api_key),
          model_name=args.model_name, limits=limits, template=args.template)
    return 0


def cmd_export(args) -> int:
    from instructkit.export import export_model

    t0 = time.perf_counter()
    out = export_model(args.model, args.out, adapter=args.adapter, dtype=args.dtype, eval_files=args.eval,
                       allow_base_mismatch=args.allow_base_mismatch)
    what = f"{args.model} + {args.adapter} (merged)" if args.adapter else args.model
    print(f"exported {what} as {args.dtype} to {out} in {time.perf_counter() - t0:.1f}s "
          f"(model card: {out / 'README.md'})")
    return 0


def cmd_convert_gguf(args) -> int:
    from instructkit.gguf import convert_command

    convert_command(args.file, args.out)
    return 0


# ---------------------------------------------------------------------------------------------- reward


def cmd_score(args) -> int:
    from instructkit.evaluate.reward import load_reward_model, score_file

    model, tokenizer = load_reward_model(args.reward)
    summary = score_file(model, tokenizer, args.data, args.out, max_length=args.max_length)
    for k, v in summary.items():
        print(f"{k:22s} {v:.4f}" if isinstance(v, float) else f"{k:22s} {v}")
    print(f"wrote {args.out}")
    return 0


def cmd_best_of_n(args) -> int:
    from instructkit.generate import SamplingConfig
    from instructkit.models import load_for_inference
    from instructkit.synth.best_of_n import best_of_n, format_summary, function_scorer, read_prompts, reward_scorer

    if bool(args.reward) == bool(args.verifier):
        print("error: give exactly one scorer: --reward DIR or --scorer skills|ifeval|module:function", file=sys.stderr)
        return 2
    records = read_prompts(args.prompts, args.limit)
    scorer, name = reward_scorer(args.reward) if args.reward else function_scorer(args.verifier)
    model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    require_stop = args.verifier == "ifeval" if args.require_stop is None else args.require_stop
    summary = best_of_n(model, tokenizer, records, scorer, name, args.out, n=args.n, sampling=sampling,
                        policy_name=str(args.adapter or args.model), min_score=args.min_score,
                        require_stop=require_stop, prefer=args.prefer, batch_size=args.batch_size,
                        repair=args.repair)
    print(format_summary(summary, args.out))
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

    d = sub.add_parser("data", help="inspect and curate data files")
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
    # Curation: validate, dedup, decontaminate, mix, score, select, report (instructkit/curate/).
    from instructkit.curate.commands import add_parsers as add_curation_parsers

    add_curation_parsers(dsub)

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

    ev = sub.add_parser("eval", help="evaluate a model on a suite (skills, ifeval)")
    ev.add_argument("--model", help="model folder (base model when --adapter is given); optional for "
                    "--suite ifeval with --responses")
    ev.add_argument("--adapter", help="LoRA adapter folder (its tokenizer and template are used)")
    _dtype_arg(ev)
    ev.add_argument("--suite", default="skills", choices=["skills", "ifeval"])
    ev.add_argument("--data", help="skills: folder written by `instructkit synth skills`")
    ev.add_argument("--prompts", help="ifeval: input file with prompt, instruction_id_list, kwargs per line")
    ev.add_argument("--responses", help="ifeval: score this JSONL of prompt/response instead of generating")
    ev.add_argument("--batch-size", type=int, default=8, help="ifeval: prompts per generation batch")
    ev.add_argument("--out", required=True)
    ev.add_argument("--splits", help="comma-separated splits (default: all four)")
    ev.add_argument("--limit", type=int, help="at most this many prompts per split (ifeval: in total)")
    ev.add_argument("--max-new-tokens", type=int, help="default 64 (skills), 1280 (ifeval)")
    ev.add_argument("--corpus", help="plain-text lines for the forgetting probe (NLL)")
    ev.add_argument("--template", help="built-in template to use when the model has none")
    ev.set_defaults(func=cmd_eval)

    sk = sysub.add_parser("skills", help="the verifiable skills curriculum (splits, corpus, preferences)")
    sk.add_argument("--out", required=True)
    sk.add_argument("--seed", type=int, default=0)
    # Literals, not synth.skills.N_TRAIN / N_CORPUS, to keep that import off the CLI's start-up;
    # tests/test_skills.py checks that they agree.
    sk.add_argument("--n-train", type=int, default=10000, help="training instances (default 10000, as the demo)")
    sk.add_argument("--n-corpus", type=int, default=30000, help="plain-text corpus lines (default 30000, as the demo)")
    sk.set_defaults(func=cmd_synth_skills)

    # Self-Instruct and sequence-level distillation data (instructkit/synth/commands.py).
    from instructkit.synth.commands import add_parsers as add_synth_parsers

    add_synth_parsers(sysub)

    sc = sub.add_parser("score", help="score conversations or preference pairs with a reward model")
    sc.add_argument("--reward", required=True, help="reward model folder (method: reward output)")
    sc.add_argument("--data", required=True, help="preference pairs or conversations")
    sc.add_argument("--out", required=True, help="JSONL with the records and their rewards")
    sc.add_argument("--max-length", type=int, default=1024)
    sc.set_defaults(func=cmd_score)

    bn = sub.add_parser("best-of-n", help="rejection sampling: n samples per prompt, keep the best (SFT) "
                        "and best-vs-worst (pairs)")
    bn.add_argument("--model", required=True, help="policy model folder (base model when --adapter is given)")
    bn.add_argument("--adapter", help="LoRA adapter folder of the policy")
    _dtype_arg(bn)
    bn.add_argument("--prompts", required=True, help="JSONL with 'prompt' or 'messages' per record")
    bn.add_argument("--n", type=int, default=4)
    bn.add_argument("--reward", help="reward model folder to score with")
    bn.add_argument("--scorer", "--verifier", dest="verifier", metavar="SCORER",
                    help="'skills', 'ifeval' (fraction of IFEval instructions followed) or module:function")
    bn.add_argument("--min-score", type=float, help="keep a prompt's best sample only if it scores >= this")
    bn.add_argument("--require-stop", action=argparse.BooleanOptionalAction, help="never keep a sample cut off "
                    "at --max-new-tokens (default: on for --scorer ifeval, off otherwise)")
    bn.add_argument("--prefer", default="first", choices=["first", "shortest"], help="tie-break among best samples")
    bn.add_argument("--batch-size", type=int, default=32, help="sequences decoded together")
    bn.add_argument("--repair", action="store_true", help="ifeval: rewrite samples for formatting constraints "
                    "they fail (case, quotes, end phrase, repeated request, *** paragraphs), then verify")
    bn.add_argument("--out", required=True)
    bn.add_argument("--temperature", type=float, default=1.0)
    bn.add_argument("--top-p", type=float, default=1.0)
    bn.add_argument("--max-new-tokens", type=int, default=64)
    bn.add_argument("--limit", type=int, help="at most this many prompts")
    bn.add_argument("--seed", type=int, default=0)
    bn.set_defaults(func=cmd_best_of_n)

    dm = sub.add_parser("demo", help="the embedded default: tune a tiny model on the skills curriculum")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--cache", default=".cache/instructkit", help="where the pretrained base is kept")
    dm.add_argument("--quick", action="store_true", help="3-minute taste: at most a one-epoch base (or a longer one if cached), at most one epoch of tuning, 20 prompts per split")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--budget", type=float, metavar="SECONDS",
                    help="wall-time budget from cold (default 600, 180 with --quick): the demo times its own training "
                         "steps here and trains as many epochs as fit, up to the full recipe; tuning is sized so that "
                         "a rerun with the base cached fits 30%% of it. 0 = the full recipe whatever it costs")
    dm.add_argument("--limit", type=int, help="prompts per split in evaluation (default 40, quick 20)")
    dm.add_argument("--with", dest="with_stages", metavar="STAGES",
                    help="optional stages after SFT, comma-separated: dpo, orpo, reward, distill, grpo, ppo")
    dm.set_defaults(func=cmd_demo)

    an = sub.add_parser("answer", help="answer a question file with a local model (input for `judge`)")
    an.add_argument("--model", required=True, help="model folder (base model when --adapter is given)")
    an.add_argument("--adapter", help="LoRA adapter folder (its tokenizer and chat template are used)")
    _dtype_arg(an)
    an.add_argument("--questions", required=True, help="MT-Bench question.jsonl or a prompt JSONL")
    an.add_argument("--out", required=True, help="answers JSONL to write (FastChat answer format)")
    an.add_argument("--model-id", help="name in the answers file (default: the model/run folder name)")
    an.add_argument("--max-turn", type=int, help="answer turns 1..N only (default: every turn)")
    an.add_argument("--limit", type=int, help="the first N questions only")
    an.add_argument("--max-new-tokens", type=int, default=512)
    an.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    an.add_argument("--top-p", type=float, default=1.0)
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--batch-size", type=int, default=8)
    an.add_argument("--template", help="built-in template to use when the model has none")
    an.set_defaults(func=cmd_answer)

    jd = sub.add_parser("judge", help="MT-Bench-style judging through an OpenAI-compatible endpoint")
    jsub = jd.add_subparsers(dest="judge_command", required=True, metavar="MODE")
    for mode, helptext in (("single", "rate one model's answers 1-10"),
                           ("pairwise", "compare two models' answers in both orders; win rate")):
        j = jsub.add_parser(mode, help=helptext)
        j.add_argument("--questions", required=True, help="MT-Bench question.jsonl or a prompt JSONL")
        if mode == "single":
            j.add_argument("--answers", required=True, help="answers JSONL (question_id + answer, or FastChat)")
            j.add_argument("--name", help="model name in reports (default: model_id or file name)")
        else:
            j.add_argument("--answers-a", required=True, help="model A's answers (the win rate is A's)")
            j.add_argument("--answers-b", required=True, help="model B's answers")
            j.add_argument("--name-a", help="model A's name in reports")
            j.add_argument("--name-b", help="model B's name in reports")
        j.add_argument("--judge-url", required=True, help="API root, e.g. https://api.openai.com/v1")
        j.add_argument("--judge-model", required=True, help="judge model name at that endpoint")
        j.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the API key (default OPENAI_API_KEY)")
        j.add_argument("--out", required=True, help="folder for judgments.jsonl and summary.json")
        j.add_argument("--references", help="reference answers JSONL (FastChat format or question_id + "
                       "answer), or 'questions' to use the question file's own 'reference' field")
        j.add_argument("--ref-categories", default="math,reasoning,coding",
                       help="categories judged against a reference (comma-separated)")
        j.add_argument("--max-turn", type=int, help="judge turns 1..N only (default: every answered turn)")
        j.add_argument("--limit", type=int, help="the first N questions only")
        j.add_argument("--allow-missing", action="store_true",
                       help="judge the answered questions and report the unanswered ones")
        j.add_argument("--concurrency", type=int, default=8, help="judge requests in flight")
        j.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
        j.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts")
        j.add_argument("--judge-max-tokens", type=int, default=2048)
        j.add_argument("--no-cache", action="store_true",
                       help="do not reuse judge replies saved in OUT/judge_cache.jsonl")
        j.set_defaults(func=cmd_judge)

    ch = sub.add_parser("chat", help="chat with a model in the terminal (streams tokens)")
    ch.add_argument("--model", required=True, help="model folder (base model when --adapter is given)")
    ch.add_argument("--adapter", help="LoRA adapter folder (its tokenizer and chat template are used)")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.add_argument("--seed", type=int, help="repeatable sampling")
    ch.add_argument("--template", help="built-in template to use when the model has none")
    ch.set_defaults(func=cmd_chat)

    se = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, completions, models)")
    se.add_argument("--model", required=True, help="model folder (base model when --adapter is given)")
    se.add_argument("--adapter", help="LoRA adapter folder")
    se.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $INSTRUCTKIT_API_KEY)")
    se.add_argument("--model-name", help="model id clients use (default: the folder name)")
    se.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    se.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    se.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    se.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    se.add_argument("--template", help="built-in template to use when the model has none")
    se.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="merge a LoRA adapter into its base; write a HF folder + model card")
    ex.add_argument("--model", required=True, help="base model folder")
    ex.add_argument("--adapter", help="LoRA adapter folder (without it the model is re-saved in --dtype)")
    ex.add_argument("--out", required=True, help="new or empty folder")
    ex.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ex.add_argument("--eval", action="append", default=[], help="eval.json to show in the model card (repeatable)")
    ex.add_argument("--allow-base-mismatch", action="store_true",
                    help="merge although the adapter records a different base model")
    ex.set_defaults(func=cmd_export)

    cg = sub.add_parser("convert-gguf", help="dequantise a GGUF file into a Hugging Face folder (float32)")
    cg.add_argument("file", help="the .gguf file (or a folder holding exactly one)")
    cg.add_argument("--out", required=True, help="new or empty folder")
    cg.set_defaults(func=cmd_convert_gguf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        from instructkit.distributed import report_error

        report_error(e)  # "error: ..."; under torchrun prefixed with the rank
        return 2


if __name__ == "__main__":
    sys.exit(main())
