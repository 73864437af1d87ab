"""Constraint-following tuning of a real model (SmolLM2-135M-Instruct from its GGUF), measured on IFEval.

The recipe, as a sequence of plain instructkit commands (each printed, timed and written to the report):

1. ``instructkit synth constraints``: training prompts = our own base tasks x verifiable constraints of
   the IFEval kinds (case, punctuation, length, keywords, bullets, sections, JSON, title, quotation,
   start/end phrases, placeholders, postscript, ...), with the checker arguments on every record.
2. ``instructkit data decontaminate``: drop prompts that overlap IFEval's ``input_data.jsonl`` (all
   541 prompts, n-gram overlap), and report what was found.
3. ``instructkit eval --suite ifeval`` on the untuned model (a fixed subset, greedy).
4. ``instructkit best-of-n --scorer ifeval --min-score 1``: sample from the model itself and keep, per
   prompt, a response that passes every checker and stopped on its own (rejection sampling).
5. ``instructkit train configs/examples/smollm2_constraints.yaml``: SFT on the verified responses.
6. ``instructkit eval --suite ifeval`` on the tuned model, same prompts and token limit.

Plus a forgetting check (token-mean NLL of general-purpose reference replies before and after: the
MT-Bench GPT-4 reference answers and hh-rlhf "chosen" replies), a report with plots, and a section in
bench/RESULTS.md. Every stage is timed; the goal is the whole sequence within 60 minutes on a 2-core CPU.

IFEval subset: every third prompt of ``input_data.jsonl`` in file order (lines 1, 4, 7, ...: 181 of 541).

Usage:
    make real-model                                        # once: fetch the GGUF into .cache/real-model
    python bench/smollm2_constraints.py                    # the measured run; appends to bench/RESULTS.md
    python bench/smollm2_constraints.py --prompts 60 --samples 2 --ifeval-every 20 --no-record   # smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IFEVAL = SHARED / "ifeval" / "input_data.jsonl"
CONFIG = ROOT / "configs" / "examples" / "smollm2_constraints.yaml"
METRIC_NAMES = {"prompt_level_strict_acc": "prompt-level strict", "inst_level_strict_acc": "instruction-level strict",
                "prompt_level_loose_acc": "prompt-level loose", "inst_level_loose_acc": "instruction-level loose"}


def _instructkit() -> list[str]:
    exe = Path(sys.executable).with_name("instructkit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "instructkit"]


class Stages:
    """Runs commands, times them, and keeps the log the report shows."""

    def __init__(self, log: Path):
        self.times: dict[str, float] = {}
        self.commands: list[tuple[str, str]] = []
        self.log = log

    def run(self, name: str, args: list[str]) -> str:
        # Paths relative to the repository (commands run there), so the report reads like a recipe.
        shown = " ".join(shlex.quote(a) for a in ["instructkit", *args]).replace(
            str(SHARED.resolve()), "../shared/data").replace(str(ROOT) + "/", "")
        self.commands.append((name, shown))
        print(f"\n== {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([*_instructkit(), *args], cwd=ROOT, text=True, capture_output=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"\n== {name}: {shown}\n{proc.stdout}\n{proc.stderr}\n")
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"stage '{name}' failed (exit {proc.returncode}); log: {self.log}")
        tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-12:]
        print("\n".join(tail), flush=True)
        print(f"   ({self.times[name]:.0f}s)", flush=True)
        return proc.stdout

    def timed(self, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return out


# ------------------------------------------------------------------------------------------ data


def write_ifeval_subset(out: Path, every: int) -> int:
    lines = [ln for ln in IFEVAL.read_text(encoding="utf-8").splitlines() if ln.strip()]
    subset = lines[::every]
    out.write_text("\n".join(subset) + "\n", encoding="utf-8")
    return len(subset)


def write_general_text(out: Path, n_hh: int) -> dict:
    """Held-out general replies for the forgetting check, as messages records (never trained on)."""
    from instructkit.data.errors import DataError
    from instructkit.data.formats import normalize

    rows = []
    questions = {}
    for line in (SHARED / "mt_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        questions[q["question_id"]] = q["turns"][0]
    n_mt = 0
    for line in (SHARED / "mt_bench" / "reference_answer_gpt4.jsonl").read_text(encoding="utf-8").splitlines():
        a = json.loads(line)
        if a["question_id"] in questions:
            rows.append({"messages": [{"role": "user", "content": questions[a["question_id"]]},
                                      {"role": "assistant", "content": a["choices"][0]["turns"][0]}],
                         "source": f"mt_bench:{a['question_id']}"})
            n_mt += 1
    path = SHARED / "hh_rlhf" / "harmless-base-test.jsonl.gz"
    skipped = 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if len(rows) - n_mt >= n_hh:
                break
            try:
                pair = normalize(json.loads(line), "hh_rlhf", path, i + 1)
            except DataError:  # e.g. an empty chosen reply: counted, not used
                skipped += 1
                continue
            rows.append({"messages": pair["prompt"] + pair["chosen"], "source": f"hh_rlhf:{i + 1}"})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"mt_bench_reference_answers": n_mt, "hh_rlhf_chosen": len(rows) - n_mt, "hh_rlhf_invalid_skipped": skipped}


def general_nll(model_path: str, adapter: str | None, data: Path, max_length: int = 1024) -> float:
    """Token-mean NLL of the reference replies (assistant tokens) given their prompts."""
    from instructkit.evaluate.skills import answer_nll
    from instructkit.models import load_for_inference

    model, tok = load_for_inference(model_path, adapter)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    return answer_nll(model, tok, records, max_length=max_length)


# ------------------------------------------------------------------------------------------ report


def _plots(work: Path, before: dict, after: dict, train_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ids = sorted(set(before["per_instruction"]) | set(after["per_instruction"]))
    b = [before["per_instruction"].get(i, {}).get("loose_acc", 0) * 100 for i in ids]
    a = [after["per_instruction"].get(i, {}).get("loose_acc", 0) * 100 for i in ids]
    fig, ax = plt.subplots(figsize=(10, max(4, 0.32 * len(ids))))
    y = range(len(ids))
    ax.barh([v + 0.2 for v in y], b, height=0.4, label="untuned", color="#999999")
    ax.barh([v - 0.2 for v in y], a, height=0.4, label="tuned", color="#1f77b4")
    ax.set_yticks(list(y), [f"{i} (n={before['per_instruction'].get(i, {}).get('n', 0)})" for i in ids], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("loose accuracy (%)")
    ax.set_title("IFEval per instruction type, loose")
    ax.legend(loc="lower right")
    fig.tight_layout()
    paths.append(work / "ifeval_per_instruction.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(METRIC_NAMES)
    x = range(len(names))
    ax.bar([v - 0.2 for v in x], [before[n] * 100 for n in names], width=0.4, label="untuned", color="#999999")
    ax.bar([v + 0.2 for v in x], [after[n] * 100 for n in names], width=0.4, label="tuned", color="#1f77b4")
    for v, n in zip(x, names):
        ax.text(v + 0.2, after[n] * 100 + 0.5, f"{(after[n] - before[n]) * 100:+.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [METRIC_NAMES[n].replace(" ", "\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"IFEval ({before['n_prompts']} prompts)")
    ax.legend()
    fig.tight_layout()
    paths.append(work / "ifeval_metrics.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rows = [json.loads(ln) for ln in (train_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label="train loss")
        ev = [r for r in rows if "eval_loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("NLL per target token")
        ax.set_title("SFT on verified self-samples")
        ax.legend()
        fig.tight_layout()
        paths.append(work / "training_loss.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_report(work: Path, s: dict, stages: Stages, plots: list[Path]) -> Path:
    before, after = s["before"], s["after"]
    precision = ("bf16 (bf16 weights for sampling; bf16 autocast with fp32 master weights for training; this "
                 "CPU has AMX)" if s["data"].get("bf16_sampling_and_training") else "fp32")
    md = [f"# Constraint-following tuning of SmolLM2-135M-Instruct (from its GGUF), {s['date']}", "",
          f"Machine: {s['machine']}. Model: `{s['model']}`. IFEval: {before['n_prompts']} prompts "
          f"({before['n_instructions']} instructions), prompts 1, 1+{s['ifeval_every']}, 1+2x{s['ifeval_every']}, ... of input_data.jsonl, "
          f"greedy, at most {s['max_new_tokens']} new tokens, same settings before and after.", "",
          "| metric | untuned | tuned | change |", "|---|---:|---:|---:|"]
    for k, name in METRIC_NAMES.items():
        md.append(f"| {name} | {before[k]:.1%} | {after[k]:.1%} | {(after[k] - before[k]) * 100:+.1f} pts |")
    md += ["", f"Forgetting check (token-mean NLL of {s['general']['n']} held-out general replies: "
           f"{s['general']['mt_bench_reference_answers']} MT-Bench GPT-4 reference answers + "
           f"{s['general']['hh_rlhf_chosen']} hh-rlhf chosen replies; lower is better): "
           f"{s['nll_before']:.4f} -> {s['nll_after']:.4f} ({s['nll_after'] - s['nll_before']:+.4f}).", "",
           f"Responses that stopped on their own: {before.get('stopped_on_their_own', 0):.0%} -> "
           f"{after.get('stopped_on_their_own', 0):.0%}.", "",
           "## Data", "",
           f"- Generated prompts: {s['data']['generated']}; decontamination against IFEval removed "
           f"{s['data']['decontam_removed']} ({s['data']['decontam_overlapping']} overlapping at all).",
           f"- Rejection sampling: {s['data']['samples_per_prompt']} samples per prompt at temperature "
           f"{s['data']['temperature']}, top-p {s['data']['top_p']}, at most {s['data']['sample_tokens']} tokens "
           f"({s['data']['tokens_sampled']} tokens generated); kept "
           f"{s['data']['kept']} prompts with a fully verified response that stopped on its own "
           f"({s['data']['kept'] / max(1, s['data']['sampled']):.0%} of {s['data']['sampled']}).",
           f"- Formatting repairs (`--repair`): {'on' if s['data']['repair'] else 'off'}; kept replies per "
           f"repair: {s['data']['kept_with_repair'] or {}}; garbled samples rejected: {s['data']['garbled']}.",
           f"- Precision: sampling and training {precision}; both IFEval runs and the forgetting check fp32.", "",
           "## Per instruction type (loose accuracy)", "", "| instruction | n | untuned | tuned |", "|---|---:|---:|---:|"]
    for iid in sorted(set(before["per_instruction"]) | set(after["per_instruction"])):
        bi, ai = before["per_instruction"].get(iid, {}), after["per_instruction"].get(iid, {})
        md.append(f"| {iid} | {bi.get('n', 0)} | {bi.get('loose_acc', 0):.0%} | {ai.get('loose_acc', 0):.0%} |")
    md += ["", "## Stage times (wall clock, this machine)", "", "| stage | seconds |", "|---|---:|"]
    md += [f"| {k} | {v:.0f} |" for k, v in stages.times.items()]
    md += [f"| **total** | **{sum(stages.times.values()):.0f}** ({sum(stages.times.values()) / 60:.1f} min) |", ""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", "## Commands", "", "```"] + [f"# {n}\n{c}" for n, c in stages.commands] + ["```", ""]
    path = work / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the .gguf (default: the one `make real-model` fetched)")
    p.add_argument("--work", default="runs/smollm2-constraints")
    p.add_argument("--prompts", type=int, default=1200, help="training prompts to generate")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt in rejection sampling")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--no-repair", action="store_true", help="plain rejection sampling (no formatting repairs)")
    p.add_argument("--sample-tokens", type=int, default=200, help="token limit of each sample")
    p.add_argument("--ifeval-every", type=int, default=3, help="IFEval subset: every Nth prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="IFEval generation limit (both evals)")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch")
    p.add_argument("--general", type=int, default=170, help="hh-rlhf chosen replies in the forgetting check")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="sample in bf16 and train with bf16 autocast (IFEval and the forgetting check stay "
                        "fp32); auto = on for CPUs with AMX, where it is ~1.6-1.9x faster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("overrides", nargs="*", help="extra training overrides, e.g. train.lr=1e-4")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    from real_model import ensure_real_model

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work / "log.txt")
    model = str(Path(args.model).resolve()) if args.model else str(stages.timed("fetch model", ensure_real_model, ROOT))
    bs = str(args.batch_size)
    from instructkit.models import cpu_has_fast_bf16

    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_fast_bf16())

    write_ifeval_subset(work / "ifeval_subset.jsonl", args.ifeval_every)
    general = write_general_text(work / "general.jsonl", args.general)
    general["n"] = general["mt_bench_reference_answers"] + general["hh_rlhf_chosen"]
    # Convert the GGUF once up front so no stage below is charged for it.
    from instructkit.gguf import resolve_model_path
    stages.timed("convert GGUF (once, cached)", resolve_model_path, model)

    stages.run("synth prompts", ["synth", "constraints", "--out", str(work / "prompts_raw.jsonl"),
                                 "--n", str(args.prompts), "--seed", str(args.seed)])
    out = stages.run("decontaminate", ["data", "decontaminate", str(work / "prompts_raw.jsonl"), "--against",
                                       str(IFEVAL), "--out", str(work / "prompts.jsonl"), "--format", "prompts", "--json"])
    dec = json.loads(out[out.index("{"):])
    if dec["seen"] - dec["skipped"] == 0:
        raise SystemExit(f"decontamination read no valid prompt records: {dec.get('skip_summary')}")
    stages.run("IFEval before", ["eval", "--suite", "ifeval", "--model", model, "--prompts",
                                 str(work / "ifeval_subset.jsonl"), "--max-new-tokens", str(args.max_new_tokens),
                                 "--batch-size", bs, "--out", str(work / "eval_before")])
    nll_before = stages.timed("forgetting check before", general_nll, model, None, work / "general.jsonl")
    stages.run("rejection sampling", ["best-of-n", "--model", model, "--prompts", str(work / "prompts.jsonl"),
                                      "--scorer", "ifeval", "--min-score", "1", "--n", str(args.samples),
                                      "--temperature", str(args.temperature), "--top-p", str(args.top_p),
                                      *([] if args.no_repair else ["--repair"]), "--max-new-tokens",
                                      str(args.sample_tokens), "--batch-size", bs, "--seed", str(args.seed),
                                      "--dtype", "bfloat16" if bf16 else "auto", "--out", str(work / "samples")])
    tuned = work / "tuned"
    stages.run("tune", ["train", str(CONFIG), f"model.name_or_path={model}",
                        f"data.train={work / 'samples' / 'best.jsonl'}", f"output_dir={tuned}",
                        *(["train.bf16=true"] if bf16 else []), *args.overrides])
    final = tuned / "final"
    is_adapter = (final / "adapter_config.json").exists()
    eval_model = ["--model", model, "--adapter", str(final)] if is_adapter else ["--model", str(final)]
    stages.run("IFEval after", ["eval", "--suite", "ifeval", *eval_model, "--prompts",
                                str(work / "ifeval_subset.jsonl"), "--max-new-tokens", str(args.max_new_tokens),
                                "--batch-size", bs, "--out", str(work / "eval_after")])
    nll_after = stages.timed("forgetting check after", general_nll, model if is_adapter else str(final),
                             str(final) if is_adapter else None, work / "general.jsonl")

    before = json.loads((work / "eval_before" / "ifeval.json").read_text())
    after = json.loads((work / "eval_after" / "ifeval.json").read_text())
    sampled = json.loads((work / "samples" / "summary.json").read_text())
    summary = {
        "date": time.strftime("%Y-%m-%d"), "model": Path(model).name, "ifeval_every": args.ifeval_every,
        "max_new_tokens": args.max_new_tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "before": before, "after": after, "nll_before": nll_before, "nll_after": nll_after, "general": general,
        "data": {"generated": args.prompts, "decontam_removed": dec.get("removed"),
                 "decontam_overlapping": dec.get("overlapping"), "samples_per_prompt": args.samples,
                 "temperature": args.temperature, "top_p": args.top_p, "repair": not args.no_repair,
                 "bf16_sampling_and_training": bf16,
                 "sample_tokens": args.sample_tokens, "kept_with_repair": sampled.get("kept_with_repair"),
                 "garbled": sampled.get("samples_garbled"),
                 "sampled": sampled["prompts"], "kept": sampled["best_written"],
                 "tokens_sampled": sampled["tokens_generated"], "acceptance": sampled.get("per_instruction")},
        "times": stages.times, "commands": stages.commands, "overrides": args.overrides,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    plots = _plots(work, before, after, tuned)
    report = write_report(work, summary, stages, plots)
    total = sum(stages.times.values())
    d = after["inst_level_loose_acc"] - before["inst_level_loose_acc"]
    print(f"\ninstruction-level loose: {before['inst_level_loose_acc']:.1%} -> {after['inst_level_loose_acc']:.1%} "
          f"({d * 100:+.1f} pts); NLL {nll_before:.4f} -> {nll_after:.4f}; total {total / 60:.1f} min. Report: {report}")
    if not args.no_record:
        section = report.read_text(encoding="utf-8").split("\n## Plots")[0].replace("# Constraint", "## Constraint", 1)
        cmd = "python bench/smollm2_constraints.py " + " ".join(sys.argv[1:])
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(f"\n{section.rstrip()}\n\n- Command: `{cmd.strip()}` (one run: the stages are minutes each); "
                    f"report with plots and exact stage commands: `{args.work}/report.md`.\n")
        print("appended to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
