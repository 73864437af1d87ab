"""Answer a question file with a local model, writing an answers file the judge reads.

Turn by turn: every question's first turn is generated in one batched pass, then each second turn is
asked with the model's own first reply in the history (as MT-Bench does), and so on. Prompts are
rendered with the model's chat template exactly as in training (``data.encode.encode_prompt``).
Records use FastChat's answer format (``question_id``, ``model_id``, ``choices[0].turns``) plus
``category``, ``finish_reasons`` and, for questions without an id, ``prompt``.
"""

from __future__ import annotations

import time

from instructkit.data.encode import encode_prompt
from instructkit.data.errors import DataError
from instructkit.evaluate.judge_data import Question
from instructkit.generate import SamplingConfig, generate


def generate_answers(model, tokenizer, questions: list[Question], *, model_id: str,
                     sampling: SamplingConfig, max_turn: int | None = None, batch_size: int = 8,
                     questions_file: str = "questions", progress=None) -> list[dict]:
    """One answer record per question, with a reply for each of its turns (up to ``max_turn``).

    Raises:
        DataError: When a prompt plus ``max_new_tokens`` would not fit the model's context.
    """
    n_turns = max(len(q.turns) for q in questions)
    if max_turn:
        n_turns = min(n_turns, max_turn)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    replies: dict[str, list[str]] = {q.key: [] for q in questions}
    finish: dict[str, list[str]] = {q.key: [] for q in questions}
    for t in range(n_turns):
        active = [q for q in questions if len(q.turns) > t]
        prompts = []
        for q in active:
            messages = [{"role": "system", "content": q.system}] if q.system else []
            for u, a in zip(q.turns[:t], replies[q.key]):
                messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": q.turns[t]})
            ids = encode_prompt(tokenizer, messages, template=tokenizer.chat_template)
            if context and len(ids) + sampling.max_new_tokens > context:
                raise DataError(questions_file, q.line, f"turns[{t}]",
                                f"question {q.id!r} turn {t + 1} takes {len(ids)} prompt tokens; with "
                                f"max_new_tokens {sampling.max_new_tokens} it exceeds the model's context "
                                f"of {context}", "lower --max-new-tokens, or answer the first turn only "
                                "with --max-turn 1", reason="too_long")
            prompts.append(ids)
        t0 = time.perf_counter()
        gens = generate(model, tokenizer, prompts, sampling, batch_size=batch_size)
        for q, g in zip(active, gens):
            replies[q.key].append(g.text.strip())
            finish[q.key].append(g.finish_reason)
        if progress:
            progress(f"answer: turn {t + 1}: {len(active)} questions in {time.perf_counter() - t0:.1f}s")
    records = []
    for q in questions:
        rec = {"question_id": q.id, "category": q.category, "model_id": model_id,
               "choices": [{"index": 0, "turns": replies[q.key]}], "finish_reasons": finish[q.key]}
        if q.key == q.turns[0].strip():  # no id in the question file: match by the prompt text
            rec = {"prompt": q.turns[0], **{k: v for k, v in rec.items() if k != "question_id"}}
        records.append(rec)
    return records
