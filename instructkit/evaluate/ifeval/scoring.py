"""Prompt records, strict and loose scoring, and the four IFEval metrics.

Strict: a response follows an instruction when the check passes on the response as given. Loose
(an upper bound the paper also reports): the check may pass on any of eight variants: the response,
the response without its first line, without its last line, without both, and each of those four
with every ``*`` removed (lines are split on ``"\\n"``; the trimmed variants are stripped). A prompt
is followed when all of its instructions are. The four metrics are the fraction of prompts followed
(prompt level) and of instructions followed (instruction level), each strict and loose.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructkit.data.errors import DataError
from instructkit.data.readers import json_type_name, read_records
from instructkit.evaluate.ifeval.checks import Instruction, bind

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


@dataclass
class PromptRecord:
    """One IFEval prompt: its text and its bound instructions.

    Attributes:
        key: The record's ``key`` (None when the file has none).
        prompt: The text given to the model; responses are matched to records by it.
        instructions: Validated instructions, in the order of ``instruction_id_list``.
        kwargs: The arguments as given (null values dropped), for the details file.
        file, line: Where the record came from, for messages.
    """

    key: int | str | None
    prompt: str
    instructions: list[Instruction]
    kwargs: list[dict] = field(default_factory=list)
    file: str = "<input>"
    line: int | None = None

    @property
    def instruction_ids(self) -> list[str]:
        return [i.id for i in self.instructions]


def parse_record(raw: dict, *, file: str | Path = "<input>", line: int | None = None) -> PromptRecord:
    """Validate one input record (``prompt``, ``instruction_id_list``, ``kwargs``, optional ``key``)."""
    if not isinstance(raw, dict):
        raise DataError(file, line, None, f"a record must be a JSON object, got {json_type_name(raw)}",
                        "write one object per line", reason="not_an_object")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(file, line, "prompt", f"must be a non-empty string, got {prompt!r}",
                        "give the prompt text as a JSON string", reason="missing_field")
    ids = raw.get("instruction_id_list")
    if not isinstance(ids, list) or not ids:
        raise DataError(file, line, "instruction_id_list",
                        f"must be a non-empty list of instruction ids, got {ids!r}",
                        'write e.g. ["punctuation:no_comma"]', reason="missing_field")
    kwargs = raw.get("kwargs", [{}] * len(ids))
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(file, line, "kwargs",
                        f"must be a list with one object per instruction ({len(ids)}), got {kwargs!r}",
                        "give one object of arguments per entry of instruction_id_list, in the same order",
                        reason="invalid_kwargs")
    instructions = [bind(i, k, file=file, line=line, index=n) for n, (i, k) in enumerate(zip(ids, kwargs))]
    given = [{k: v for k, v in kw.items() if v is not None} for kw in kwargs]
    return PromptRecord(raw.get("key"), prompt, instructions, given, str(file), line)


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """Read and validate an IFEval input file (JSON Lines such as ``input_data.jsonl``, or any file
    :func:`~instructkit.data.readers.read_records` reads, e.g. the Hugging Face Parquet export).

    Raises:
        DataError: The first bad record, naming file, line, field and fix; or duplicate prompts.
    """
    records: list[PromptRecord] = []
    seen: dict[str, int | None] = {}
    for line, raw in read_records(path):
        rec = parse_record(raw, file=path, line=line)
        if rec.prompt in seen:
            raise DataError(path, line, "prompt", f"the same prompt text as line {seen[rec.prompt]}",
                            "keep each prompt once: responses are matched to prompts by their text",
                            reason="duplicate_prompt")
        seen[rec.prompt] = line
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(path, None, None, "no prompt records", "point --prompts at an IFEval input file",
                        reason="empty_file")
    return records


# ------------------------------------------------------------------------------------------ scoring


def loose_variants(response: str) -> list[str]:
    """The eight versions of a response the loose score tries (the reference's order)."""
    lines = response.split("\n")
    no_first = "\n".join(lines[1:]).strip()
    no_last = "\n".join(lines[:-1]).strip()
    no_both = "\n".join(lines[1:-1]).strip()
    trimmed = [response, no_first, no_last, no_both]
    return [response, response.replace("*", ""), no_first, no_last, no_both,
            *(t.replace("*", "") for t in trimmed[1:])]


@dataclass
class PromptResult:
    """Scores of one prompt's response."""

    key: int | str | None
    prompt: str
    response: str
    instruction_id_list: list[str]
    kwargs: list[dict]
    follow_instruction_list_strict: list[bool]
    follow_instruction_list_loose: list[bool]

    @property
    def follow_all_instructions_strict(self) -> bool:
        return all(self.follow_instruction_list_strict)

    @property
    def follow_all_instructions_loose(self) -> bool:
        return all(self.follow_instruction_list_loose)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["follow_all_instructions_strict"] = self.follow_all_instructions_strict
        d["follow_all_instructions_loose"] = self.follow_all_instructions_loose
        return d


def score_prompt(record: PromptRecord, response: str) -> PromptResult:
    variants = loose_variants(response)
    strict = [ins.follows(response) for ins in record.instructions]
    loose = [s or any(ins.follows(v) for v in variants[1:]) for s, ins in zip(strict, record.instructions)]
    return PromptResult(record.key, record.prompt, response, record.instruction_ids,
                        record.kwargs or [dict(ins.kwargs) for ins in record.instructions], strict, loose)


def _accuracy(pairs: Iterable[tuple[str, bool, bool]]) -> dict[str, dict]:
    n: dict[str, int] = defaultdict(int)
    strict: dict[str, int] = defaultdict(int)
    loose: dict[str, int] = defaultdict(int)
    for name, s, lo in pairs:
        n[name] += 1
        strict[name] += s
        loose[name] += lo
    return {k: {"n": n[k], "strict_acc": strict[k] / n[k], "loose_acc": loose[k] / n[k]} for k in sorted(n)}


@dataclass
class IFEvalResult:
    """Per-prompt results plus the aggregate metrics (see :meth:`metrics`)."""

    prompts: list[PromptResult]
    info: dict = field(default_factory=dict)

    def _instruction_rows(self):
        for p in self.prompts:
            yield from zip(p.instruction_id_list, p.follow_instruction_list_strict, p.follow_instruction_list_loose)

    def metrics(self) -> dict:
        """The four published metrics, counts, and accuracy per instruction id and per category."""
        n_prompts = len(self.prompts)
        rows = list(self._instruction_rows())
        n_inst = len(rows)
        out = {
            "suite": "ifeval",
            "n_prompts": n_prompts,
            "n_instructions": n_inst,
            **self.info,
            "prompt_level_strict_acc": sum(p.follow_all_instructions_strict for p in self.prompts) / max(1, n_prompts),
            "inst_level_strict_acc": sum(s for _, s, _ in rows) / max(1, n_inst),
            "prompt_level_loose_acc": sum(p.follow_all_instructions_loose for p in self.prompts) / max(1, n_prompts),
            "inst_level_loose_acc": sum(lo for _, _, lo in rows) / max(1, n_inst),
            "per_instruction": _accuracy(rows),
            "per_category": _accuracy((i.split(":")[0], s, lo) for i, s, lo in rows),
        }
        return out

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``ifeval.json`` (metrics) and ``ifeval_details.jsonl`` (one line per prompt)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path, details_path = out / "ifeval.json", out / "ifeval_details.jsonl"
        metrics_path.write_text(json.dumps(self.metrics(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with open(details_path, "w", encoding="utf-8") as f:
            for p in self.prompts:
                f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        return metrics_path, details_path

    def table(self) -> str:
        """The four metrics, then strict/loose accuracy per category and per instruction id."""
        m = self.metrics()
        lines = [f"IFEval: {m['n_prompts']} prompts, {m['n_instructions']} instructions",
                 f"{'':28s} {'strict':>8s} {'loose':>8s}",
                 f"{'prompt-level accuracy':28s} {m['prompt_level_strict_acc']:8.2%} {m['prompt_level_loose_acc']:8.2%}",
                 f"{'instruction-level accuracy':28s} {m['inst_level_strict_acc']:8.2%} {m['inst_level_loose_acc']:8.2%}",
                 "", f"{'instruction':46s} {'n':>4s} {'strict':>8s} {'loose':>8s}"]
        for name, a in m["per_category"].items():
            lines.append(f"{name:46s} {a['n']:4d} {a['strict_acc']:8.2%} {a['loose_acc']:8.2%}")
            for iid, b in m["per_instruction"].items():
                if iid.split(":")[0] == name:
                    lines.append(f"  {iid.split(':', 1)[1]:44s} {b['n']:4d} {b['strict_acc']:8.2%} {b['loose_acc']:8.2%}")
        return "\n".join(lines)


def score_responses(records: Sequence[PromptRecord | dict], responses: Mapping[str, str] | Sequence[str]) -> IFEvalResult:
    """Score responses against IFEval prompt records.

    Args:
        records: :class:`PromptRecord` objects (e.g. from :func:`load_prompts`) or raw input dicts.
        responses: Either ``{prompt text: response}`` (every record's prompt must be a key, as in the
            reference) or a list of response strings aligned with ``records``.

    Returns:
        An :class:`IFEvalResult`; ``result.metrics()`` holds the four metrics.

    Raises:
        DataError: A raw record is invalid. KeyError: A record's prompt has no response.
        ValueError: An aligned list of the wrong length, or a response that is not a string.
    """
    recs = [r if isinstance(r, PromptRecord) else parse_record(r, line=n + 1) for n, r in enumerate(records)]
    if isinstance(responses, Mapping):
        missing = [r.prompt for r in recs if r.prompt not in responses]
        if missing:
            raise KeyError(f"{len(missing)} prompt(s) have no response, e.g. {missing[0][:80]!r}")
        texts = [responses[r.prompt] for r in recs]
    else:
        texts = list(responses)
        if len(texts) != len(recs):
            raise ValueError(f"{len(texts)} responses for {len(recs)} prompts; give one response per prompt")
    for r, t in zip(recs, texts):
        if not isinstance(t, str):
            raise ValueError(f"the response to prompt {r.key!r} is {json_type_name(t)}, not a string")
    return IFEvalResult([score_prompt(r, t) for r, t in zip(recs, texts)])
