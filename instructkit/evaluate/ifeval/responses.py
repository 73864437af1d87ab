"""Responses to IFEval prompts: read them from a file (published outputs) or generate them.

A responses file is JSON Lines with ``prompt`` and ``response`` per line, the layout of the
reference's ``input_response_data_*.jsonl``. Responses are matched to prompt records by the exact
prompt text, as the reference does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from instructkit.data.errors import DataError
from instructkit.data.readers import json_type_name, read_records
from instructkit.evaluate.ifeval.scoring import PromptRecord


@dataclass
class Matched:
    """Prompt records paired with their responses, and the records no response answered."""

    records: list[PromptRecord]
    responses: list[str]
    unanswered: list[PromptRecord]


def load_responses(path: str | Path) -> dict[str, tuple[str, int]]:
    """``{prompt: (response, line)}`` from a responses file.

    Raises:
        DataError: A record without a string ``prompt`` or ``response``, or a prompt answered twice.
    """
    out: dict[str, tuple[str, int]] = {}
    for line, raw in read_records(path):
        for key in ("prompt", "response"):
            if key not in raw:
                raise DataError(path, line, key, f"missing (a responses file has 'prompt' and 'response' "
                                f"on every line; this record has {', '.join(map(repr, raw)) or 'no keys'})",
                                f"add \"{key}\"", reason="missing_field")
            if not isinstance(raw[key], str):
                raise DataError(path, line, key, f"must be a string, got {json_type_name(raw[key])}",
                                "write the text as a JSON string (an empty string scores as not following)",
                                reason="wrong_type")
        prompt = raw["prompt"]
        if prompt in out:
            raise DataError(path, line, "prompt", f"this prompt was already answered on line {out[prompt][1]}",
                            "keep one response per prompt", reason="duplicate_prompt")
        out[prompt] = (raw["response"], line)
    if not out:
        raise DataError(path, None, None, "no responses", "give a JSON Lines file with prompt and response",
                        reason="empty_file")
    return out


def match_responses(records: list[PromptRecord], responses: dict[str, tuple[str, int]],
                    responses_file: str | Path, prompts_file: str | Path) -> Matched:
    """Pair records with responses by prompt text, in the order of ``records``.

    Raises:
        DataError: A response whose prompt is not among the records (wrong prompts file, or a prompt
            altered on the way, e.g. stripped of whitespace).
    """
    by_prompt = {r.prompt for r in records}
    for prompt, (_, line) in responses.items():
        if prompt not in by_prompt:
            near = next((r.prompt for r in records if r.prompt.strip() == prompt.strip()), None)
            hint = (" (it matches a prompt only after stripping whitespace: the prompt text must be "
                    "copied exactly)" if near else "")
            raise DataError(responses_file, line, "prompt",
                            f"no record of {prompts_file} has this prompt text{hint}: {prompt[:80]!r}",
                            "score against the prompts file the responses were generated from",
                            reason="unknown_prompt")
    matched = [r for r in records if r.prompt in responses]
    return Matched(matched, [responses[r.prompt][0] for r in matched],
                   [r for r in records if r.prompt not in responses])


def generate_responses(model, tokenizer, records: list[PromptRecord], max_new_tokens: int = 1280,
                       batch_size: int = 8) -> list[dict]:
    """Greedy responses to each prompt, sent as one user turn through the model's chat template.

    Returns:
        One dict per record: ``key``, ``prompt``, ``response``, ``finish_reason`` (``stop`` or
        ``length``) and ``generated_tokens``.
    """
    from instructkit.data.encode import encode_prompt
    from instructkit.generate import SamplingConfig, generate

    ids = [encode_prompt(tokenizer, [{"role": "user", "content": r.prompt}], template=tokenizer.chat_template)
           for r in records]
    gens = generate(model, tokenizer, ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                    batch_size=batch_size)
    return [{"key": r.key, "prompt": r.prompt, "response": g.text, "finish_reason": g.finish_reason,
             "generated_tokens": len(g.token_ids)} for r, g in zip(records, gens)]


def write_responses(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
