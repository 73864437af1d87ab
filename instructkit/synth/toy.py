"""Procedural toy conversations: varied lengths, system prompts and multi-turn, with checkable answers.

Used by the tiny configs, the benchmark and tests when no real data is wanted. Every answer is
computed, so a model tuned on it can be checked; lengths vary from a few tokens to a few hundred.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_NOUNS = ("apple banana cherry river mountain teacher student computer garden window bottle planet "
          "candle rocket violin pencil harbor island lantern meadow").split()
_SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a careful assistant that "
            "shows the result only.", "Be concise and exact."]


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 12))]
        return (f"Sort these numbers in ascending order: {', '.join(map(str, nums))}",
                ", ".join(map(str, sorted(nums))))
    if kind == 2:
        words = [rng.choice(_NOUNS) for _ in range(rng.randint(2, 8))]
        return f"Write these words in upper case: {' '.join(words)}", " ".join(w.upper() for w in words)
    if kind == 3:
        words = [rng.choice(_NOUNS) for _ in range(rng.randint(2, 10))]
        return (f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)))
    if kind == 4:
        words = [rng.choice(_NOUNS) for _ in range(rng.randint(3, 20))]
        target = rng.choice(words)
        return (f"How many times does the word '{target}' appear in: {' '.join(words)}?",
                f"The word '{target}' appears {words.count(target)} times.")
    n = rng.randint(3, 12)
    items = [rng.choice(_NOUNS) for _ in range(n)]
    return (f"Make a bulleted list of these {n} items: {', '.join(items)}",
            "\n".join(f"- {w}" for w in items))


def generate_conversations(n: int, seed: int = 0, max_turns: int = 3) -> list[dict]:
    """``n`` conversations in OpenAI messages format with 1..max_turns user/assistant exchanges."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        for _ in range(rng.randint(1, max_turns)):
            q, a = _task(rng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"id": f"toy_{seed}_{i}", "messages": msgs})
    return out


def write_toy_dataset(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``eval.jsonl`` (disjoint seeds) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, count, s in (("train", n_train, seed), ("eval", n_eval, seed + 10_000)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for rec in generate_conversations(count, s):
                f.write(json.dumps(rec) + "\n")
    return out
