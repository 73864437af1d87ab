"""``instructkit data validate|dedup|decontaminate|mix|score|select|report``: argument parsing and output.

:func:`add_parsers` is called by :mod:`instructkit.cli` on the ``data`` subcommand group; each
command calls the library function of the same name and prints a short summary (or JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from instructkit.data.errors import DataError


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def _default_report(out: str, suffix: str) -> str:
    p = Path(out)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.stem
    return str(p.with_name(stem + suffix))


def _check_out(inputs, out: str) -> None:
    """Refuse to write over an input: the input is still being read while the output is written."""
    o = Path(out).resolve()
    for f in inputs:
        if Path(f).resolve() == o:
            raise DataError(out, None, "--out", "the output is the input file; writing it would destroy "
                            "the data being read", "write to a new file, e.g. --out "
                            f"{_default_report(out, '.curated.jsonl')}", reason="bad_argument")


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print("\n".join(lines))


def cmd_validate(args) -> int:
    from instructkit.curate.validate import validate_file

    res = validate_file(args.file, args.format)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    elif res["file_error"]:
        e = res["file_error"]
        print(f"{args.file}: cannot validate: {e['problem']}. Fix: {e['fix']}")
    else:
        print(f"{args.file}: format {res['format']}, {res['valid']} valid and {res['invalid']} invalid of "
              f"{res['records_seen']} records" + (f" ({', '.join(f'{k}: {v}' for k, v in res['kinds'].items())})"
                                                 if res["kinds"] else ""))
        for e in res["errors"][: args.max_errors]:
            where = f"{Path(e['file']).name}:{e['line']}" if e["line"] else Path(e["file"]).name
            field = f" field '{e['field']}'" if e["field"] else ""
            print(f"  {where}{field} [{e['reason']}]: {e['problem']}. Fix: {e['fix']}")
        if len(res["errors"]) > args.max_errors:
            print(f"  ... {len(res['errors']) - args.max_errors} more (all of them with --json)")
        if res["by_reason"]:
            print("invalid by reason: " + ", ".join(f"{k} {v}" for k, v in res["by_reason"].items()))
    return 0 if res["ok"] else 1


def cmd_dedup(args) -> int:
    from instructkit.curate.dedup import DedupConfig, dedup_file

    _check_out([args.file], args.out)
    try:
        cfg = DedupConfig(exact=not args.no_exact, near=not args.no_near, threshold=args.threshold,
                          num_perm=args.num_perm, shingle_size=args.shingle, unit=args.unit,
                          field=args.field, seed=args.seed)
    except ValueError as e:
        raise DataError(args.file, None, None, f"bad dedup option: {e}", "see `instructkit data dedup -h`",
                        reason="bad_argument") from None
    report = args.report or _default_report(args.out, ".removed.jsonl")
    res = dedup_file(args.file, args.out, config=cfg, report_path=report, format=args.format,
                     on_error=args.on_error)
    valid = res.seen - res.skipped
    _emit(res.to_dict(), args.json, [
        f"{args.file}: kept {res.kept} of {valid} valid records; removed {res.exact} exact and {res.near} "
        f"near duplicates (estimated Jaccard >= {cfg.threshold}, {cfg.shingle_size}-{cfg.unit} shingles, "
        f"{cfg.num_perm} permutations); {res.skipped} invalid records skipped; {res.seconds:.1f}s",
        f"wrote {args.out}; every removal with the record it duplicates: {report}",
        *([res.skip_summary] if res.skip_summary else [])])
    return 0


def cmd_decontaminate(args) -> int:
    from instructkit.curate.decontam import decontaminate_file

    _check_out([args.file, *args.against], args.out)
    report = args.report or _default_report(args.out, ".contamination.jsonl")
    res = decontaminate_file(args.file, args.against, args.out, threshold=args.threshold, ngram=args.ngram,
                             fields=args.field, report_path=report, format=args.format,
                             on_error=args.on_error)
    idx = res.index
    sizes = "/".join(map(str, idx["ngram_sizes"]))
    _emit(res.to_dict(), args.json, [
        f"{args.file}: removed {res.removed} of {res.seen - res.skipped} valid records covering >= "
        f"{res.threshold:.0%} of an evaluation text's n-grams; {res.overlapping} overlap at all; "
        f"{res.skipped} invalid records skipped; {res.seconds:.1f}s",
        f"evaluation texts indexed: {idx['eval_texts']} ({sizes}-grams) from "
        + ", ".join(f"{Path(f).name} ({n})" for f, n in idx["eval_files"].items())
        + (f"; {idx['too_short_texts']} texts under {idx['min_words']} words not checked"
           if idx["too_short_texts"] else ""),
        *(["removed per evaluation file: " + ", ".join(f"{Path(f).name} {n}" for f, n in res.by_eval_file.items())]
          if res.by_eval_file else []),
        f"wrote {args.out}; scores, evaluation items and overlapping n-grams: {report}",
        *([res.skip_summary] if res.skip_summary else [])])
    return 0


def cmd_mix(args) -> int:
    from instructkit.curate.mix import load_mix_config, mix

    cfg = load_mix_config(args.config)
    _check_out([s.path for s in cfg.sources], args.out)
    report = args.report or _default_report(args.out, ".mix.json")
    res = mix(cfg, args.out, report)
    lines = [f"{'source':20s} {'valid':>8s} {'rate':>7s} {'count':>8s} {'share':>7s} {'repeats':>7s}"]
    for s in res.sources:
        lines.append(f"{s['name'][:20]:20s} {s['valid']:8d} {s['rate']:7.3f} {s['count']:8d} "
                     f"{s['share']:7.1%} {s['max_repeats']:7d}")
    if res.families:
        lines.append(f"families ({len(res.families)}): " + ", ".join(
            f"{f} {v['share']:.1%}" for f, v in list(res.families.items())[:12])
            + (" ..." if len(res.families) > 12 else ""))
    if res.total < res.requested_total:
        lines.append(f"note: {res.requested_total} records requested, but caps (and repeat: false) allow "
                     f"only {res.total}")
    lines.append(f"wrote {res.total} records to {args.out} (T={res.temperature}, seed {res.seed}); "
                 f"report {report}")
    if res.skip_summary:
        lines.append(res.skip_summary)
    _emit(res.to_dict(), args.json, lines)
    return 0


def cmd_score(args) -> int:
    from instructkit.curate.score import score_file

    _check_out([args.file], args.out)
    res = score_file(args.file, args.model, args.out, template=args.template, batch_size=args.batch_size,
                     max_length=args.max_length, format=args.format, on_error=args.on_error)
    m = res.means
    _emit(res.to_dict(), args.json, [
        f"{args.file}: scored {res.scored} records with {args.model} ({res.skipped} skipped) in {res.seconds:.1f}s",
        "means: " + ", ".join(f"{k} {v}" for k, v in m.items()),
        f"wrote {args.out} (one row per record: file, line and the signals)",
        *([res.skip_summary] if res.skip_summary else [])])
    return 0


def cmd_select(args) -> int:
    from instructkit.curate.score import select_file

    _check_out([args.file], args.out)
    report = args.report or _default_report(args.out, ".selection.jsonl")
    ascending = True if args.ascending else False if args.descending else None
    res = select_file(args.file, args.out, by=args.by, top=args.top, scores=args.scores, model_dir=args.model,
                      diversity=None if args.no_diversity else args.diversity, ascending=ascending,
                      report_path=report, format=args.format, on_error=args.on_error,
                      keep_ifd_above_one=args.keep_ifd_above_one)
    excl = ", ".join(f"{k} {v}" for k, v in res.excluded.items())
    _emit(res.to_dict(), args.json, [
        f"{args.file}: selected {res.selected} (target {res.target} = top {res.top:.0%}) by {res.by} from "
        f"{res.candidates} candidates; {res.skipped_for_diversity} skipped as too similar to a selected "
        f"record" + (f" (Jaccard >= {res.threshold})" if res.threshold else " (exact copies)")
        + (f"; excluded: {excl}" if excl else ""),
        f"wrote {args.out} (file order); ranking and skips: {report}"])
    return 0


def cmd_report(args) -> int:
    from instructkit.curate.dedup import DedupConfig
    from instructkit.curate.report import write_report

    stats = write_report(args.files, args.out, model_dir=args.model, against=args.against,
                         fields=args.field, format=args.format,
                         dedup=DedupConfig(threshold=args.near_threshold),
                         contamination_threshold=args.threshold)
    d, c = stats["duplicates"], stats["contamination"]
    _emit(stats, args.json, [
        f"{stats['valid']} valid of {stats['records_seen']} records ({stats['skipped']} skipped); "
        f"sources {len(stats['sources'])}, families {len(stats['families'])}, formats {stats['formats']}",
        f"duplicates: {d['exact']} exact, {d['near']} near ({d['rate']:.2%}); contamination: "
        + ("not checked (--against)" if c is None else f"{c['contaminated']} ({c['rate']:.2%})"),
        f"wrote {args.out}/report.md, report.html, report.json, lengths.png"
        + (", leading_words.png" if stats["leading_words"] else "")])
    return 0


def add_parsers(dsub) -> None:
    """Add the curation commands to the ``data`` subparsers."""

    def common(p, on_error=True):
        p.add_argument("--format", default="auto", help="force a format instead of detecting it")
        if on_error:
            p.add_argument("--on-error", default="skip", choices=["skip", "raise"],
                           help="skip invalid records (counted and reported) or stop at the first")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = dsub.add_parser("validate", help="detect the format and validate every record (report with --json)")
    p.add_argument("file")
    p.add_argument("--max-errors", type=int, default=20, help="errors printed (all with --json)")
    common(p, on_error=False)
    p.set_defaults(func=cmd_validate)

    p = dsub.add_parser("dedup", help="remove exact and near duplicates (MinHash-LSH), keeping the first")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="kept records (JSONL)")
    p.add_argument("--report", help="removed records with rule and match (default OUT.removed.jsonl)")
    p.add_argument("--threshold", type=_fraction, default=0.8, help="estimated Jaccard for near duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--shingle", type=int, default=3, help="shingle size (words, or characters with --unit char)")
    p.add_argument("--unit", default="word", choices=["word", "char"])
    p.add_argument("--field", default="all", choices=["all", "prompt", "response"], help="text compared")
    p.add_argument("--no-near", action="store_true", help="exact duplicates only")
    p.add_argument("--no-exact", action="store_true", help="near duplicates only")
    p.add_argument("--seed", type=int, default=1)
    common(p)
    p.set_defaults(func=cmd_dedup)

    p = dsub.add_parser("decontaminate", help="remove records overlapping evaluation sets (n-grams)")
    p.add_argument("file")
    p.add_argument("--against", nargs="+", required=True, help="evaluation files (JSONL/JSON/Parquet)")
    p.add_argument("--out", required=True, help="kept records (JSONL)")
    p.add_argument("--report", help="per-record scores and evidence (default OUT.contamination.jsonl)")
    p.add_argument("--threshold", type=_fraction, default=0.3,
                   help="remove when this fraction of an evaluation text's n-grams is in a record")
    p.add_argument("--ngram", type=int, help="n-gram size (default 8 for texts under 64 words, else 13)")
    p.add_argument("--field", action="append", help="evaluation field(s) to use (default: every string "
                   "except ids, labels and checker arguments); repeatable")
    common(p)
    p.set_defaults(func=cmd_decontaminate)

    p = dsub.add_parser("mix", help="mix datasets by weight, cap and temperature (YAML config)")
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--report", help="shares per source and family (default OUT.mix.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mix)

    p = dsub.add_parser("score", help="response length, IFD and perplexity per record with a local LM")
    p.add_argument("file")
    p.add_argument("--model", required=True, help="Hugging Face causal LM folder")
    p.add_argument("--out", required=True, help="one JSON row of signals per record")
    p.add_argument("--template", help="built-in template for a model without one")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="longer conversations are skipped")
    common(p)
    p.set_defaults(func=cmd_score)

    p = dsub.add_parser("select", help="keep the top fraction by a signal, with a diversity filter")
    p.add_argument("file")
    p.add_argument("--by", required=True, help="response_length, ifd, ppl, loss_given_instruction, ...")
    p.add_argument("--top", type=_fraction, required=True, help="fraction to keep, e.g. 0.1")
    p.add_argument("--out", required=True)
    p.add_argument("--scores", help="output of `data score` (else computed; model signals need --model)")
    p.add_argument("--model", help="model folder for ifd/ppl when --scores is not given")
    p.add_argument("--diversity", type=_fraction, default=0.7,
                   help="skip a candidate this similar (estimated Jaccard) to a selected record")
    p.add_argument("--no-diversity", action="store_true", help="only skip exact copies")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--ascending", action="store_true", help="smallest values first")
    order.add_argument("--descending", action="store_true", help="largest values first")
    p.add_argument("--keep-ifd-above-1", dest="keep_ifd_above_one", action="store_true", help="do not exclude records with IFD >= 1")
    p.add_argument("--report", help="ranking and diversity skips (default OUT.selection.jsonl)")
    common(p)
    p.set_defaults(func=cmd_select)

    p = dsub.add_parser("report", help="HTML/Markdown data report with plots, duplicates, contamination")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True, help="folder for report.md/html/json and the PNGs")
    p.add_argument("--model", help="tokenizer for token lengths (default: whitespace words)")
    p.add_argument("--against", nargs="+", help="evaluation files for the contamination rate")
    p.add_argument("--field", action="append", help="evaluation field(s), as in decontaminate")
    p.add_argument("--threshold", type=_fraction, default=0.3, help="contamination threshold")
    p.add_argument("--near-threshold", type=_fraction, default=0.8, help="near-duplicate threshold")
    p.add_argument("--format", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

