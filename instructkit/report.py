"""The demo report: markdown + HTML with PNG plots, per-split and per-family tables and examples."""

from __future__ import annotations

import html
import json
from pathlib import Path

SPLIT_NOTES = {
    "validation": "seen families, seen phrasings, new instances",
    "heldout_phrasing": "seen families, phrasings never seen in tuning",
    "heldout_family": "task families never used for tuning (known only from the plain-text corpus)",
    "train": "training prompts",
}


def _metrics_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def plot_losses(runs: dict[str, Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        lines = _metrics_lines(run)
        tr = [(r["step"], r["loss"]) for r in lines if "loss" in r]
        ev = [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r]
        if tr:
            ax.plot(*zip(*tr), label=f"{name} train", alpha=0.7)
        if ev:
            ax.plot(*zip(*ev), "o--", label=f"{name} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-mean NLL)")
    ax.set_yscale("log")
    ax.set_title("Training and held-out loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy(results: dict[str, dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(next(iter(results.values()))["splits"])
    models = list(results)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, m in enumerate(models):
        vals = [results[m]["splits"][s]["accuracy"] * 100 for s in splits]
        bars = ax.bar([x + i * width for x in range(len(splits))], vals, width, label=m)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(splits))])
    ax.set_xticklabels(splits, fontsize=9)
    ax.set_ylabel("verified accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Skills accuracy per split")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _samples(eval_dir: Path) -> list[dict]:
    path = eval_dir / "samples.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def write_report(out: Path, summary: dict, commands: list[str]) -> tuple[Path, Path]:
    """Write report.md and report.html (plots as PNG files beside them)."""
    results = summary["results"]
    runs = {"sft-full": out / "sft-full", "sft-lora": out / "sft-lora"}
    plot_losses(runs, out / "loss_curves.png")
    plot_accuracy(results, out / "accuracy.png")
    models = list(results)
    splits = list(results[models[0]]["splits"])

    md = ["# instructkit demo report", "",
          "A tiny Llama model was pretrained on plain sentences that state facts about small tasks "
          "(\"the largest of 4, 9 and 2 is 9.\"), so it has knowledge but no instruction following. "
          "It was then tuned on instruction-response pairs (SFT, full and LoRA) and evaluated on "
          "instructions it has seen, phrasings it has not, and task families it was never tuned on.",
          "", "## Accuracy per split (verified answers, greedy decoding)", "",
          "| split | what it tests | " + " | ".join(models) + " |",
          "|---|---|" + "---:|" * len(models)]
    for s in splits:
        md.append(f"| {s} | {SPLIT_NOTES.get(s, '')} | " + " | ".join(
            f"{results[m]['splits'][s]['accuracy']:.1%}" for m in models) + " |")
    md += ["", "| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for key, label in (("stop_rate", "stops on its own (validation)"),
                       ("heldout_loss", "held-out answer loss (validation)"),
                       ("mean_generated_tokens", "mean generated tokens (validation)")):
        vals = [results[m]["splits"]["validation"][key] for m in models]
        fmt = (lambda v: f"{v:.1%}") if key == "stop_rate" else (lambda v: f"{v:.3f}")
        md.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + " |")
    if all("corpus_nll" in results[m] for m in models):
        base_nll = results[models[0]]["corpus_nll"]
        md.append("| plain-text corpus NLL (forgetting probe) | " + " | ".join(
            f"{results[m]['corpus_nll']:.3f} ({results[m]['corpus_nll'] - base_nll:+.3f})" for m in models) + " |")
    md += ["", "![accuracy](accuracy.png)", "", "![loss curves](loss_curves.png)", ""]
    pref = summary.get("preference") or {}
    if pref:
        from instructkit.demo import DPO_RPO_ALPHA, REWARD_LOGPROB_COEF

        md += ["## Preference stages (held-out preference pairs)", "",
               f"DPO (+ {DPO_RPO_ALPHA:g} x the chosen reply's NLL, as RPO) and ORPO start from the full SFT model "
               "and train on the curriculum's preference pairs (verified answer vs a realistic mistake); the reward "
               f"model is the SFT model's backbone with a scalar head, scoring head + {REWARD_LOGPROB_COEF:g} x the "
               "reply's log-probability. Accuracy here is the share of held-out pairs where the chosen reply wins "
               "(implicit reward for DPO/ORPO, the score for the reward model); task accuracy is in the tables above.",
               "", "| stage | final train loss | held-out pair loss | held-out pair accuracy | held-out margin |",
               "|---|---:|---:|---:|---:|"]
        for name, m in pref.items():
            md.append(f"| {name} | {m.get('loss', float('nan')):.4f} | {m.get('eval_loss', float('nan')):.4f} | "
                      f"{m.get('eval_accuracy', float('nan')):.1%} | "
                      f"{m.get('eval_reward_margin', float('nan')):.3f} |")
        md.append("")
    rl = summary.get("rl") or {}
    if rl:
        md += ["## Online RL stages (GRPO / PPO, skills verifier as reward)", "",
               "Both train a LoRA adapter on the full SFT model, one optimizer step per rollout, sampling "
               "completions of the curriculum's training prompts; the reward is the skills verifier (1 if the "
               "answer is right, 0 otherwise; PPO's score before its missing-stop penalty). Each run scores itself "
               "before and after training: the training-prompt reward is the mean reward of sampled completions "
               "(as in the rollouts, one fixed seed) on a probe of training prompts its rollouts drew, and "
               "validation accuracy is greedy on every validation prompt. Changes are in points with the standard "
               "error of the per-prompt difference; read a change as real only when it is several times that. "
               "Rollout reward (first -> last third of the rollouts) depends on which prompts each rollout happened "
               "to draw; KL is the mean per-token KL of the rollout policy to the SFT model. The last column is "
               f"the demo's own evaluation ({results[models[0]]['splits']['validation']['n']} validation prompts, "
               "as in the tables above).",
               "", "| stage | rollouts (steps) | training-prompt reward (probe) | validation accuracy (all prompts) "
               "| rollout reward, first -> last third | KL to reference, last third | validation accuracy (demo "
               "eval) |", "|---|---:|---|---|---|---:|---|"]
        from instructkit.demo import change

        for name, m in rl.items():
            if not m.get("rollouts"):
                md.append(f"| {name} | 0 | n/a | n/a | n/a | n/a | n/a |")
                continue
            probe = f" ({m['train_probe_prompts']} x {m['train_probe_samples']})" if "train_probe_start" in m else ""
            val = f" ({m['validation_prompts']})" if "validation_reward_start" in m else ""
            md.append(f"| {name} | {m['rollouts']} ({m['steps']}) | {change(m, 'train_probe')}{probe} | "
                      f"{change(m, 'validation_reward', '.1%')}{val} | {m['reward_first_third']:.3f} -> "
                      f"{m['reward_last_third']:.3f} | {m.get('kl_ref_last_third', float('nan')):.4f} | "
                      f"{m['validation_accuracy_start']:.1%} -> {m['validation_accuracy_end']:.1%} |")
        md.append("")
    students = {k: v for k, v in (summary.get("distill") or {}).items() if "kl_teacher_student" in v}
    if students:
        md += ["## Distillation (nano student, teacher = the full SFT model)", "",
               "Three students tuned on the same prompts. Closeness to the teacher on the validation prompts: "
               "KL per token on the reference replies (forward = KL(teacher || student), reverse = KL(student || "
               "teacher)), forward KL per token on the teacher's own greedy replies, and the share of prompts where "
               "the student's greedy reply equals the teacher's. Token-level KD matches the teacher's distribution; "
               "sequence-level KD matches its greedy outputs.", "",
               "| student | KL fwd (reference replies) | KL rev (reference replies) | KL fwd (teacher's replies) "
               "| greedy agreement | validation NLL |", "|---|---:|---:|---:|---:|---:|"]
        for name, m in students.items():
            md.append(f"| {name} | {m['kl_teacher_student']:.4f} | {m['kl_student_teacher']:.4f} | "
                      f"{m.get('kl_on_teacher_replies', float('nan')):.4f} | "
                      f"{m.get('greedy_agreement', float('nan')):.1%} | {m['validation_nll']:.4f} |")
        md.append("")
    md += ["## Accuracy per family", ""]
    fam_split = ["validation", "heldout_phrasing", "heldout_family"]
    md.append("| split | family | " + " | ".join(models) + " |")
    md.append("|---|---|" + "---:|" * len(models))
    for s in fam_split:
        if s not in results[models[0]]["families"]:
            continue
        for fam in results[models[0]]["families"][s]:
            md.append(f"| {s} | {fam} | " + " | ".join(
                f"{results[m]['families'][s].get(fam, float('nan')):.0%}" for m in models) + " |")
    md += ["", "## Examples (same prompt, base vs tuned)", ""]
    base_s = {(x["split"], x["prompt"]): x for x in _samples(out / "eval-base")}
    tuned = _samples(out / "eval-sft-full")
    shown = 0
    for split in ("validation", "heldout_phrasing", "heldout_family"):
        for x in [t for t in tuned if t["split"] == split][:3]:
            b = base_s.get((split, x["prompt"]))
            md += [f"**{split} / {x['family']}**: {x['prompt']}", "",
                   f"- expected: `{x['expected']}`",
                   f"- base: `{(b or {}).get('output', '')[:160]}` ({'correct' if b and b['correct'] else 'wrong'})",
                   f"- tuned (full): `{x['output'][:160]}` ({'correct' if x['correct'] else 'wrong'})", ""]
            shown += 1
    times = summary.get("times", {})
    md += ["## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    md += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    md += _sizing_section(summary)
    md += ["", "## Reproduce", "", "```bash", *commands, "```", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(_to_html("\n".join(md)), encoding="utf-8")
    return md_path, html_path


def _sizing_section(summary: dict) -> list[str]:
    """How many epochs this run trained and why: the recipe's, or what fit the time budget here."""
    epochs = summary.get("epochs")
    if not epochs:
        return []
    out = ["", "## How this run was sized", ""]
    plan = summary.get("plan")
    pre = f"{epochs['pretrain']:g} of {epochs['pretrain_recipe']:g}"
    sft = f"{epochs['sft']:g} of {epochs['sft_recipe']:g}"
    if not plan:
        return out + [f"No time budget: the recipe's epochs (pretraining {pre}, SFT {sft}).", ""]
    m = plan["measured"]
    cached = plan["pretrain_epochs"] is None
    if cached:  # a cached base may be longer than this run's recipe (e.g. a full base under --quick)
        pre = f"{epochs['pretrain']:g} (cached base)"
    total = (summary.get("times") or {}).get("total", float("nan"))
    out += [f"Budget: {summary['budget']:.0f} s from cold"
            + (f"; this run found its base cached, so its tuning was sized for {plan['budget_s']:.0f} s" if cached
               else "") + ". Before training, the demo timed a few real steps of its model on this machine and "
            "trained as many epochs as fit, tuning first (so that a rerun with the base cached fits its share) and "
            "pretraining with the rest. Fewer epochs than the recipe's mean lower accuracy than the README's "
            "numbers; `--budget 0` trains the full recipe whatever it costs.", "",
            "| | pretraining | SFT (each of full, LoRA) |", "|---|---:|---:|",
            f"| seconds per step, measured here | {m['pretrain_step_s']:.3f} | {m['sft_step_s']:.3f} |",
            f"| steps per epoch | {m['pretrain_steps_per_epoch']} | {m['sft_steps_per_epoch']} |",
            f"| epochs trained (of the recipe's) | {pre} | {sft} |", "",
            f"Predicted total {plan['predicted_total_s']:.0f} s, measured {total:.0f} s"
            + ("" if plan["fits"] else " (the smallest plan was over the budget: this machine is too slow for it)")
            + ".", ""]
    return out


def _to_html(md: str) -> str:
    """A small markdown subset (headings, tables, lists, images, code) to standalone HTML."""
    out = ["<!doctype html><meta charset='utf-8'><title>instructkit demo report</title>",
           "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;line-height:1.45}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
           "td:not(:first-child){text-align:right}code,pre{background:#f4f4f4}pre{padding:8px}</style>"]
    lines = md.splitlines()
    i = 0
    in_code = False
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            out.append(html.escape(ln))
        elif ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-: "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if r == 0 else 'td'}>{html.escape(c)}</{'th' if r == 0 else 'td'}>"
                                 for c in row) + "</tr>" for r, row in enumerate(rows)) + "</table>")
            continue
        elif ln.startswith("!["):
            alt, src = ln[2:].split("](")
            out.append(f"<p><img src='{html.escape(src.rstrip(')'))}' alt='{html.escape(alt)}'></p>")
        elif ln.startswith("#"):
            level = len(ln) - len(ln.lstrip("#"))
            out.append(f"<h{level}>{html.escape(ln.lstrip('# '))}</h{level}>")
        elif ln.startswith("- "):
            out.append(f"<li>{html.escape(ln[2:])}</li>")
        elif ln.strip():
            out.append(f"<p>{html.escape(ln)}</p>")
        i += 1
    return "\n".join(out)
