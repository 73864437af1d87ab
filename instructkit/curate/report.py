"""The data report: what is in a dataset before compute is spent on it.

One streaming pass over the files collects counts per source, family and format, prompt and reply
lengths (tokens with a tokenizer, else whitespace words), the leading word of every instruction (a
cheap view of task diversity, after Self-Instruct's verb analysis), duplicates (the dedup rules) and,
with evaluation files, contamination (the decontamination rules). The result is written as
Markdown, HTML, JSON and two PNG plots.
"""

from __future__ import annotations

import html
import json
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from instructkit.curate.decontam import build_index
from instructkit.curate.dedup import DedupConfig, Deduplicator, dedup_text
from instructkit.curate.text import iter_examples, leading_word, preview, record_text
from instructkit.data.errors import SkipReport

_TOP_VERBS = 20
_EXAMPLES = 5


def _length_fn(model_dir: str | None):
    if not model_dir:
        return (lambda text: len(text.split())), "words"
    from instructkit.config import ModelConfig
    from instructkit.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), "tokens"


def collect(files: Sequence[str | Path], *, model_dir: str | None = None,
            against: Sequence[str | Path] | None = None, fields: Sequence[str] | None = None,
            format: str = "auto", dedup: DedupConfig = DedupConfig(),
            contamination_threshold: float = 0.3, ngram: int | None = None) -> dict:
    """All statistics of the report as one JSON-ready dict."""
    t0 = time.perf_counter()
    length, unit = _length_fn(model_dir)
    index = build_index(against, fields, ngram) if against else None
    sources, families, formats, verbs = Counter(), Counter(), Counter(), Counter()
    prompt_len, reply_len = array("I"), array("I")
    dup_examples, contam_examples = [], []
    n_exact = n_near = n_contam = n = 0
    skips = SkipReport()
    kept_where: list[tuple[str, int]] = []  # kept id -> (file, line); 16-ish bytes per record
    per_file: dict[str, dict] = {}
    with Deduplicator(dedup) as dd:
        for path in files:
            file_skips = SkipReport()
            batch = []
            n_file = 0

            def flush():
                nonlocal n_exact, n_near
                for ex, m in zip(batch, dd.process([dedup_text(e.canonical, dedup.field) for e in batch])):
                    if m is None:
                        kept_where.append((Path(ex.file).name, ex.line))
                        continue
                    n_exact += m.rule == "exact"
                    n_near += m.rule == "near"
                    if len(dup_examples) < _EXAMPLES:
                        f, line = kept_where[m.kept]
                        dup_examples.append({"where": f"{Path(ex.file).name}:{ex.line}", "rule": m.rule,
                                             "matches": f"{f}:{line}", "jaccard": round(m.jaccard, 3),
                                             "text": preview(dedup_text(ex.canonical), 120)})
                batch.clear()

            for ex in iter_examples(path, format, "skip", file_skips):
                n += 1
                n_file += 1
                rt = record_text(ex.canonical)
                sources[str(ex.raw.get("source") or Path(path).name)] += 1
                if ex.raw.get("family") is not None:
                    families[str(ex.raw["family"])] += 1
                formats[ex.canonical["_format"]] += 1
                prompt_len.append(sum(length(t) for t in rt.prompt))
                reply_len.append(length(rt.reply))
                verbs[leading_word(rt.instruction) or "(empty)"] += 1
                if index is not None:
                    c = index.match(rt.all)
                    if c is not None and c.score >= contamination_threshold:
                        n_contam += 1
                        if len(contam_examples) < _EXAMPLES:
                            e = c.eval
                            contam_examples.append({
                                "where": f"{Path(ex.file).name}:{ex.line}", "score": round(c.score, 3),
                                "eval": f"{Path(e.file).name}:{e.line}" + (f" (id {e.item_id})"
                                                                           if e.item_id is not None else ""),
                                "field": e.field, "ngram": c.ngram})
                batch.append(ex)
                if len(batch) >= dedup.batch_size:
                    flush()
            flush()
            per_file[str(path)] = {"records_seen": file_skips.total_seen, "valid": n_file,
                                   "skipped": len(file_skips)}
            skips.merge(file_skips)

    def pct(a):
        if not len(a):
            return {}
        x = np.frombuffer(a, dtype=np.uint32) if isinstance(a, array) else np.asarray(a)
        return {f"p{p}": int(np.percentile(x, p)) for p in (0, 10, 50, 90, 99, 100)} | \
            {"mean": round(float(x.mean()), 1)}

    return {
        "files": per_file, "records_seen": skips.total_seen, "valid": n, "skipped": len(skips),
        "skipped_by_reason": {k: len(v) for k, v in skips.by_reason().items()},
        "skipped_examples": [r.message for r in skips.records[:10]],
        "sources": dict(sources.most_common()), "families": dict(families.most_common()),
        "formats": dict(formats.most_common()), "length_unit": unit,
        "prompt_length": pct(prompt_len), "reply_length": pct(reply_len),
        "_prompt_len": prompt_len, "_reply_len": reply_len,
        "duplicates": {"exact": n_exact, "near": n_near, "rate": round((n_exact + n_near) / max(1, n), 4),
                       "near_threshold": dedup.threshold if dedup.near else None,
                       "examples": dup_examples},
        "contamination": None if index is None else {
            "contaminated": n_contam, "rate": round(n_contam / max(1, n), 4),
            "threshold": contamination_threshold, "index": index.summary(), "examples": contam_examples},
        "leading_words": dict(verbs.most_common(_TOP_VERBS)), "distinct_leading_words": len(verbs),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _plots(stats: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = stats["length_unit"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "_prompt_len", "prompt"), (axes[1], "_reply_len", "reply")):
        x = np.frombuffer(stats[key], dtype=np.uint32)
        ax.hist(x, bins=min(50, max(5, len(np.unique(x)))), color="#4C72B0" if title == "prompt" else "#DD8452")
        ax.set_title(f"{title} length ({unit}), n={len(x)}")
        ax.set_xlabel(unit)
        ax.set_ylabel("records")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=100)
    plt.close(fig)
    names = ["lengths.png"]
    verbs = stats["leading_words"]
    if verbs:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(verbs) + 1.2))
        items = list(verbs.items())[::-1]
        ax.barh([k for k, _ in items], [v for _, v in items], color="#55A868")
        ax.set_xlabel("records")
        ax.set_title(f"Most frequent leading words ({stats['distinct_leading_words']} distinct)")
        fig.tight_layout()
        fig.savefig(out / "leading_words.png", dpi=100)
        plt.close(fig)
        names.append("leading_words.png")
    return names


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def _markdown(stats: dict, files: Sequence[str], images: list[str]) -> str:
    n = max(1, stats["valid"])
    md = [f"# Data report: {', '.join(Path(f).name for f in files)}", "",
          f"{stats['valid']} valid of {stats['records_seen']} records ({stats['skipped']} skipped); "
          f"lengths in {stats['length_unit']}.", ""]
    for title, key in (("Sources", "sources"), ("Families", "families"), ("Formats", "formats")):
        if stats[key]:
            md += [f"## {title}", ""] + _table(["name", "records", "share"],
                                               [(k, v, f"{v / n:.1%}") for k, v in stats[key].items()]) + [""]
    md += ["## Lengths", ""] + _table(["", *stats["prompt_length"].keys()],
                                      [("prompt", *stats["prompt_length"].values()),
                                       ("reply", *stats["reply_length"].values())]) if stats["valid"] else []
    md += ["", "![lengths](lengths.png)", ""]
    d = stats["duplicates"]
    md += ["## Duplicates", "", f"{d['exact']} exact and {d['near']} near duplicates "
           f"(estimated Jaccard >= {d['near_threshold']}): {d['rate']:.2%} of valid records would be "
           "removed by `instructkit data dedup`.", ""]
    if d["examples"]:
        md += _table(["record", "rule", "duplicate of", "Jaccard", "text"],
                     [(e["where"], e["rule"], e["matches"], e["jaccard"], e["text"]) for e in d["examples"]])
        md += [""]
    c = stats["contamination"]
    md += ["## Contamination", ""]
    if c is None:
        md += ["Not checked (pass `--against EVAL_FILE ...`).", ""]
    else:
        files_ = ", ".join(Path(f).name for f in c["index"]["eval_files"])
        md += [f"{c['contaminated']} record(s) ({c['rate']:.2%}) cover at least {c['threshold']:.0%} of the "
               f"n-grams of an evaluation text from {files_}.", ""]
        if c["examples"]:
            md += _table(["record", "score", "evaluation item", "field", "overlapping n-gram"],
                         [(e["where"], e["score"], e["eval"], e["field"], e["ngram"]) for e in c["examples"]])
            md += [""]
    md += ["## Leading words of instructions", "",
           f"{stats['distinct_leading_words']} distinct first words (after 'please', 'can you' ...).", ""]
    md += _table(["word", "records", "share"], [(k, v, f"{v / n:.1%}") for k, v in stats["leading_words"].items()])
    if "leading_words.png" in images:
        md += ["", "![leading words](leading_words.png)"]
    md += ["", "## Skipped records", ""]
    if stats["skipped"]:
        md += _table(["reason", "records"], list(stats["skipped_by_reason"].items())) + ["", "Examples:", ""]
        md += [f"- `{m}`" for m in stats["skipped_examples"]]
    else:
        md += ["None: every record is valid."]
    return "\n".join(md) + "\n"


def _html(markdown: str) -> str:
    """A small Markdown subset (headings, tables, images, lists, paragraphs) as standalone HTML."""
    body, table = [], []

    def end_table():
        if table:
            rows = [r.strip().strip("|").split(" | ") for r in table if not set(r) <= set("|-: ")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{html.escape(c.replace(chr(92) + '|', '|'))}</td>"
                                                 for c in r) + "</tr>" for r in rest) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        end_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:].strip('`'))}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    end_table()
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;font-size:90%}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Data report</title><style>{style}" \
           f"</style></head><body>{''.join(body)}</body></html>\n"


def write_report(files: Sequence[str | Path], out_dir: str | Path, **kw) -> dict:
    """Collect statistics and write ``report.md``, ``report.html``, ``report.json`` and the PNGs.

    Keyword arguments go to :func:`collect`. Returns the statistics (``report.json``'s content).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = collect(files, **kw)
    images = _plots(stats, out)
    md = _markdown(stats, [str(f) for f in files], images)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(_html(md), encoding="utf-8")
    public = {k: v for k, v in stats.items() if not k.startswith("_")}
    (out / "report.json").write_text(json.dumps(public, indent=2, default=str) + "\n", encoding="utf-8")
    return public
