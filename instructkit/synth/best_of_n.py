"""Best-of-n (rejection sampling): n samples per prompt, scored, best kept as SFT data and best-vs-worst as pairs.

Scorers: a reward model folder (``method: reward`` output), the skills verifier (records need
``family`` and ``data``, as written by ``instructkit synth skills``), or any Python function
``module:function`` taking ``(record, response_text)`` and returning a number.

Outputs (in ``out_dir``): ``best.jsonl`` (messages format: the prompt and the best sample), and
``pairs.jsonl`` (``prompt``/``chosen``/``rejected``: best vs worst), each record with provenance
(source file and line, policy, scorer, all scores, sampling settings); ``summary.json`` counts what
was written and what was skipped (prompts whose samples all scored the same give no pair).
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


def function_scorer(spec: str) -> tuple[Scorer, str]:
    """``skills`` (the curriculum's verifier) or ``module:function`` called as ``fn(record, text)``."""
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
            raise ValueError(f"verifier '{spec}' is not 'skills' or 'module:function'")
        mod, name = spec.split(":", 1)
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import verifier '{spec}': {e}") from None

    def score(records: list[dict], texts: list[str]) -> list[float]:
        return [float(fn(r, t)) for r, t in zip(records, texts)]
    return score, f"verifier:{spec}"


def best_of_n(model, tokenizer, records: list[dict], scorer: Scorer, scorer_name: str, out_dir: str | Path, *,
              n: int = 4, sampling: SamplingConfig | None = None, policy_name: str = "",
              batch_size: int = 16) -> dict:
    """Sample ``n`` replies per prompt, score them, write ``best.jsonl``, ``pairs.jsonl`` and ``summary.json``."""
    if n < 2:
        raise ValueError(f"best-of-n needs n >= 2 samples per prompt, got {n}")
    sampling = sampling or SamplingConfig(temperature=1.0, max_new_tokens=64)
    add_end_of_turn_stops(model, tokenizer)
    prompt_ids = [encode_prompt(tokenizer, r["_prompt"], template=tokenizer.chat_template) for r in records]
    gens = generate(model, tokenizer, [p for p in prompt_ids for _ in range(n)], sampling, batch_size=batch_size)
    texts = [g.text.strip() for g in gens]
    scores = scorer([r for r in records for _ in range(n)], texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_pairs = ties = 0
    settings = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed}
    with open(out / "best.jsonl", "w", encoding="utf-8") as fb, open(out / "pairs.jsonl", "w", encoding="utf-8") as fp:
        for i, rec in enumerate(records):
            cand, sc = texts[i * n:(i + 1) * n], scores[i * n:(i + 1) * n]
            best = max(range(n), key=lambda k: sc[k])
            worst = min(range(n), key=lambda k: sc[k])
            extra = {k: v for k, v in rec.items() if not k.startswith("_") and k not in ("messages", "prompt")}
            prov = {"source_file": rec["_file"], "source_line": rec["_line"], "policy": policy_name,
                    "scorer": scorer_name, "n": n, "scores": sc, "sampling": settings}
            fb.write(json.dumps({"messages": rec["_prompt"] + [{"role": "assistant", "content": cand[best]}],
                                 **extra, "best_index": best, "best_score": sc[best], **prov},
                                ensure_ascii=False) + "\n")
            if sc[best] > sc[worst] and cand[best].strip() != cand[worst].strip():
                fp.write(json.dumps({"prompt": rec["_prompt"], "chosen": cand[best], "rejected": cand[worst],
                                     **extra, "score_chosen": sc[best], "score_rejected": sc[worst], **prov},
                                    ensure_ascii=False) + "\n")
                n_pairs += 1
            else:
                ties += 1
    summary = {"prompts": len(records), "samples": len(texts), "best_written": len(records), "pairs_written": n_pairs,
               "no_pair_all_scores_equal": ties, "mean_score": sum(scores) / max(1, len(scores)),
               "mean_best_score": sum(max(scores[i * n:(i + 1) * n]) for i in range(len(records))) / max(1, len(records)),
               "scorer": scorer_name, "policy": policy_name, "n": n, "sampling": settings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
