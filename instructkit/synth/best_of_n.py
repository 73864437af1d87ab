"""Best-of-n (rejection sampling): n samples per prompt, scored, best kept as SFT data and best-vs-worst as pairs.

Scorers: a reward model folder (``method: reward`` output), the skills verifier (records need
``family`` and ``data``, as written by ``instructkit synth skills``), the IFEval checkers (records
carry ``instruction_id_list`` and ``kwargs``, as written by ``instructkit synth constraints``; the
score is the fraction of the prompt's instructions a sample follows, strict), or any Python
function ``module:function`` taking ``(record, response_text)`` and returning a number.

Rejection sampling: ``min_score`` keeps a prompt's best sample only when it scores at least that
(``--scorer ifeval --min-score 1`` keeps fully verified replies only), and ``require_stop`` never
picks a sample cut off at the token limit (its format checks may pass on a reply that never ended,
which would teach the model not to stop). Among samples with the best score the first in sample
order is kept (``prefer="first"``: an unbiased draw from the policy's own verified replies, so
lengths are not pushed down), or the shortest (``prefer="shortest"``: teaches brevity, at the risk
of terse replies).

Outputs (in ``out_dir``): ``best.jsonl`` (messages format: the prompt and the best sample), and
``pairs.jsonl`` (``prompt``/``chosen``/``rejected``: best vs worst), each record with provenance
(source file and line, policy, scorer, all scores, sampling settings); ``summary.json`` counts what
was written and what was skipped, with reasons (prompts whose samples all scored the same give no
pair), tokens generated, and for IFEval records the acceptance rate per instruction id (prompts with
at least one verified sample / prompts).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from instructkit.data.encode import encode_prompt
from instructkit.data.errors import DataError
from instructkit.data.readers import read_records
from instructkit.generate import SamplingConfig, add_end_of_turn_stops, generate

Scorer = Callable[[list[dict], list[str]], list[float]]


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Prompt records: ``messages`` (cut before the final assistant reply) or ``prompt`` (text or messages).

    Returns the raw records with ``_prompt`` (messages), ``_file`` and ``_line`` added.
    """
    out = []
    for line, rec in read_records(path):
        if "messages" in rec and isinstance(rec["messages"], list):
            msgs = list(rec["messages"])
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
        elif isinstance(rec.get("prompt"), str):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        elif isinstance(rec.get("prompt"), list):
            msgs = list(rec["prompt"])
        else:
            raise DataError(path, line, "prompt", f"the record has neither 'messages' nor 'prompt' (keys: "
                            f"{sorted(rec)})", "give each record 'prompt' (text or messages) or 'messages'",
                            reason="missing_field")
        if not msgs or msgs[-1].get("role") != "user":
            raise DataError(path, line, "messages", "the prompt does not end with a user turn",
                            "end each prompt with the user's message", reason="bad_order")
        out.append({**rec, "_prompt": msgs, "_file": str(path), "_line": line})
        if limit and len(out) >= limit:
            break
    return out


def reward_scorer(reward_dir: str | Path) -> tuple[Scorer, str]:
    from instructkit.evaluate.reward import load_reward_model, score_responses

    model, tokenizer = load_reward_model(reward_dir)

    def score(records: list[dict], texts: list[str]) -> list[float]:
        return score_responses(model, tokenizer, [r["_prompt"] for r in records], texts)
    return score, f"reward:{reward_dir}"


def ifeval_follows(records: list[dict], texts: list[str]) -> list[list[bool]]:
    """Per sample, whether each of its record's IFEval instructions is followed (strict).

    Raises:
        DataError: A record lacks ``instruction_id_list``, or its arguments are invalid (file, line, field).
    """
    from instructkit.evaluate.ifeval.scoring import parse_record

    parsed: dict[int, object] = {}
    out = []
    for rec, text in zip(records, texts):
        if id(rec) not in parsed:
            if "instruction_id_list" not in rec:
                raise DataError(rec["_file"], rec["_line"], "instruction_id_list", "the ifeval scorer needs "
                                "'instruction_id_list' and 'kwargs' in each prompt record", "use a file written "
                                "by `instructkit synth constraints` (or IFEval's input layout), or another scorer",
                                reason="missing_field")
            given = rec.get("prompt")
            raw = {**rec, "prompt": given if isinstance(given, str) else rec["_prompt"][-1]["content"]}
            parsed[id(rec)] = parse_record(raw, file=rec["_file"], line=rec["_line"])
        out.append([ins.follows(text) for ins in parsed[id(rec)].instructions])
    return out


def ifeval_scorer() -> tuple[Scorer, str]:
    """Score = fraction of the record's IFEval instructions the sample follows (strict)."""
    def score(records: list[dict], texts: list[str]) -> list[float]:
        return [sum(f) / len(f) for f in ifeval_follows(records, texts)]
    return score, "ifeval"


def function_scorer(spec: str) -> tuple[Scorer, str]:
    """``skills`` (the curriculum's verifier), ``ifeval`` (:func:`ifeval_scorer`) or ``module:function``
    called as ``fn(record, text)``."""
    if spec == "ifeval":
        return ifeval_scorer()
    if spec == "skills":
        from instructkit.synth.skills import verify_response

        def fn(rec, text):
            if "family" not in rec or "data" not in rec:
                raise DataError(rec["_file"], rec["_line"], "family", "the skills verifier needs 'family' and "
                                "'data' in each prompt record", "use a file written by `instructkit synth "
                                "skills`, or another scorer", reason="missing_field")
            return float(verify_response(rec, text))
    else:
        if ":" not in spec:
            raise ValueError(f"verifier '{spec}' is not 'skills', 'ifeval' or 'module:function'")
        mod, name = spec.split(":", 1)
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import verifier '{spec}': {e}") from None

    def score(records: list[dict], texts: list[str]) -> list[float]:
        return [float(fn(r, t)) for r, t in zip(records, texts)]
    return score, f"verifier:{spec}"


def select(scores: list[float], texts: list[str], finish: list[str], *, require_stop: bool = False,
           prefer: str = "first") -> tuple[int | None, int]:
    """Indices of the best and the worst sample of one prompt.

    The best is the highest score among the eligible samples (all, or with ``require_stop`` those
    with finish reason ``"stop"``), ties going to the first (``prefer="first"``) or the shortest text
    (``prefer="shortest"``); None when no sample is eligible. The worst is the lowest score, a sample
    cut off at the token limit ranking below every eligible one when ``require_stop`` is set.
    """
    if prefer not in ("first", "shortest"):
        raise ValueError(f"prefer must be 'first' or 'shortest', got {prefer!r}")
    ok = [not require_stop or f == "stop" for f in finish]
    eligible = [k for k in range(len(scores)) if ok[k]]
    best = None
    if eligible:
        top = max(scores[k] for k in eligible)
        tied = [k for k in eligible if scores[k] == top]
        best = min(tied, key=lambda k: len(texts[k])) if prefer == "shortest" else tied[0]
    worst = min(range(len(scores)), key=lambda k: (ok[k], scores[k]))
    return best, worst


def _acceptance(records: list[dict], n: int, texts: list[str], ok: list[bool]) -> dict:
    """Per IFEval instruction id: prompts, prompts with >= 1 eligible fully verified sample, and the
    fraction of eligible samples that follow that instruction."""
    follows = ifeval_follows([r for r in records for _ in range(n)], texts)
    stats: dict[str, dict] = {}
    for i, rec in enumerate(records):
        rows = [(follows[i * n + k], ok[i * n + k]) for k in range(n)]
        verified = any(all(f) and e for f, e in rows)
        for j, iid in enumerate(rec["instruction_id_list"]):
            st = stats.setdefault(iid, {"prompts": 0, "prompts_verified": 0, "samples": 0, "samples_followed": 0})
            st["prompts"] += 1
            st["prompts_verified"] += verified
            st["samples"] += sum(e for _, e in rows)
            st["samples_followed"] += sum(f[j] and e for f, e in rows)
    for st in stats.values():
        st["acceptance_rate"] = st["prompts_verified"] / st["prompts"]
        st["sample_follow_rate"] = st["samples_followed"] / max(1, st["samples"])
    return dict(sorted(stats.items()))


def best_of_n(model, tokenizer, records: list[dict], scorer: Scorer, scorer_name: str, out_dir: str | Path, *,
              n: int = 4, sampling: SamplingConfig | None = None, policy_name: str = "",
              batch_size: int = 16, min_score: float | None = None, require_stop: bool = False,
              prefer: str = "first", repair: bool = False) -> dict:
    """Sample ``n`` replies per prompt, score them, write ``best.jsonl``, ``pairs.jsonl`` and ``summary.json``.

    ``min_score``, ``require_stop`` and ``prefer`` select what is kept (see the module docstring and
    :func:`select`); a prompt whose best sample is not kept gets no pair either.
    """
    if n < 2:
        raise ValueError(f"best-of-n needs n >= 2 samples per prompt, got {n}")
    sampling = sampling or SamplingConfig(temperature=1.0, max_new_tokens=64)
    add_end_of_turn_stops(model, tokenizer)
    prompt_ids = [encode_prompt(tokenizer, r["_prompt"], template=tokenizer.chat_template) for r in records]
    gens = generate(model, tokenizer, [p for p in prompt_ids for _ in range(n)], sampling, batch_size=batch_size)
    texts = [g.text.strip() for g in gens]
    finish = [g.finish_reason for g in gens]
    return write_best_of_n(records, texts, finish, scorer, scorer_name, out_dir, n=n, sampling=sampling,
                           policy_name=policy_name, min_score=min_score, require_stop=require_stop, prefer=prefer,
                           tokens_generated=sum(len(g.token_ids) for g in gens), repair=repair)


def write_best_of_n(records: list[dict], texts: list[str], finish: list[str], scorer: Scorer, scorer_name: str,
                    out_dir: str | Path, *, n: int, sampling: SamplingConfig, policy_name: str = "",
                    min_score: float | None = None, require_stop: bool = False, prefer: str = "first",
                    tokens_generated: int = 0, repair: bool = False) -> dict:
    """Score given samples (``n`` per record, in record order, with their finish reasons), select and
    write the outputs; :func:`best_of_n` after generation, and testable without a model.

    With ``repair`` (IFEval records only) each sample is first rewritten by
    :func:`instructkit.synth.repair.repair` for the formatting constraints it fails, then scored;
    kept records list the repairs in ``repaired``. A sample holding U+FFFD (bytes that do not decode:
    a broken multi-byte character) counts as garbled and, with ``require_stop``, is never kept.
    """
    texts, finish = list(texts), list(finish)
    garbled = 0
    for k, t in enumerate(texts):
        if "\ufffd" in t and finish[k] == "stop":
            finish[k], garbled = "garbled", garbled + 1
    repaired: list[list[str]] = [[] for _ in texts]
    if repair:
        from instructkit.synth.repair import repair as repair_reply

        if not all("instruction_id_list" in r for r in records):
            raise ValueError("repair needs IFEval records (instruction_id_list and kwargs on every prompt)")
        for k, t in enumerate(texts):
            rec = records[k // n]
            texts[k], repaired[k] = repair_reply(t, rec["instruction_id_list"], rec.get("kwargs") or
                                                 [{}] * len(rec["instruction_id_list"]))
    scores = scorer([r for r in records for _ in range(n)], texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_pairs = ties = kept = 0
    kept_repairs: dict[str, int] = {}
    skipped = {"no_stopped_sample": 0, "below_min_score": 0}
    settings = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed}
    with open(out / "best.jsonl", "w", encoding="utf-8") as fb, open(out / "pairs.jsonl", "w", encoding="utf-8") as fp:
        for i, rec in enumerate(records):
            cand, sc, fin = texts[i * n:(i + 1) * n], scores[i * n:(i + 1) * n], finish[i * n:(i + 1) * n]
            best, worst = select(sc, cand, fin, require_stop=require_stop, prefer=prefer)
            if best is None:
                skipped["no_stopped_sample"] += 1
                continue
            if min_score is not None and sc[best] < min_score:
                skipped["below_min_score"] += 1
                continue
            kept += 1
            for iid in repaired[i * n + best]:
                kept_repairs[iid] = kept_repairs.get(iid, 0) + 1
            extra = {k: v for k, v in rec.items() if not k.startswith("_") and k not in ("messages", "prompt")}
            prov = {"source_file": rec["_file"], "source_line": rec["_line"], "policy": policy_name,
                    "scorer": scorer_name, "n": n, "scores": sc, "finish_reasons": fin, "sampling": settings}
            fb.write(json.dumps({"messages": rec["_prompt"] + [{"role": "assistant", "content": cand[best]}],
                                 **extra, "best_index": best, "best_score": sc[best], **prov,
                                 **({"repaired": repaired[i * n + best]} if repair else {})},
                                ensure_ascii=False) + "\n")
            worse = sc[best] > sc[worst] or (require_stop and fin[worst] != "stop")
            if worse and cand[best].strip() != cand[worst].strip():
                fp.write(json.dumps({"prompt": rec["_prompt"], "chosen": cand[best], "rejected": cand[worst],
                                     **extra, "score_chosen": sc[best], "score_rejected": sc[worst], **prov},
                                    ensure_ascii=False) + "\n")
                n_pairs += 1
            else:
                ties += 1
    summary = {"prompts": len(records), "samples": len(texts), "best_written": kept, "skipped": skipped,
               "pairs_written": n_pairs, "no_pair_all_scores_equal": ties,
               "samples_cut_off": sum(f == "length" for f in finish), "samples_garbled": garbled,
               "samples_repaired": sum(bool(r) for r in repaired), "tokens_generated": tokens_generated,
               "mean_score": sum(scores) / max(1, len(scores)),
               "mean_best_score": sum(max(scores[i * n:(i + 1) * n]) for i in range(len(records))) / max(1, len(records)),
               "scorer": scorer_name, "policy": policy_name, "n": n, "min_score": min_score,
               "require_stop": require_stop, "prefer": prefer, "repair": repair, "sampling": settings}
    if repair:
        summary["kept_with_repair"] = dict(sorted(kept_repairs.items()))
    if records and all("instruction_id_list" in r for r in records):
        ok = [not require_stop or f == "stop" for f in finish]
        summary["per_instruction"] = _acceptance(records, n, texts, ok)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def format_summary(summary: dict, out_dir: str | Path) -> str:
    """The console report of a best-of-n run: scores, what was kept and skipped, acceptance per id."""
    sk = summary["skipped"]
    lines = [f"{summary['prompts']} prompts x {summary['n']} samples ({summary['tokens_generated']} tokens, "
             f"{summary['samples_cut_off']} samples cut off): mean score {summary['mean_score']:.3f}, mean best "
             f"{summary['mean_best_score']:.3f}; wrote {summary['best_written']} best replies "
             f"(skipped {sk['no_stopped_sample']} with no stopped sample, {sk['below_min_score']} below "
             f"--min-score) and {summary['pairs_written']} pairs ({summary['no_pair_all_scores_equal']} kept "
             f"prompts had equal scores) to {out_dir}"]
    for iid, st in summary.get("per_instruction", {}).items():
        lines.append(f"  {iid:48s} {st['prompts_verified']:4d}/{st['prompts']:<4d} prompts verified "
                     f"({st['acceptance_rate']:.0%}), samples following it {st['sample_follow_rate']:.0%}")
    return "\n".join(lines)
