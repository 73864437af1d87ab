"""Questions, answers and reference answers for judge-based comparison, read with precise errors.

Questions: MT-Bench's ``question.jsonl`` (``question_id``, ``category``, ``turns``, optional
``reference``) or any prompt file: JSONL with ``prompt`` (one turn) or ``messages`` (system and user
messages; each user message is one turn). An id comes from ``question_id``, ``id`` or ``key``; a
record without one is identified by its first prompt.

Answers: JSONL with ``question_id`` (or ``prompt``, matched to a question's first turn) and the text
in ``answer`` (a string, or a list with one string per turn), ``response`` or ``output``; FastChat's
answer files (``choices[0].turns``) are read as they are. Every answer must belong to a known
question, and every question needs an answer unless missing ones are allowed (they are reported).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.data.errors import DataError
from instructkit.data.readers import json_type_name, read_records

ID_FIELDS = ("question_id", "id", "key")
TEXT_FIELDS = ("answer", "response", "output")


@dataclass
class Question:
    """One question: ``key`` matches answers; ``turns`` are the user messages in order."""

    key: str
    id: object
    category: str
    turns: list[str]
    system: str | None = None
    reference: list[str] | None = None
    line: int = 0


@dataclass
class AnswerSet:
    """One model's answers, by question key, and the model's name."""

    model: str
    file: str
    by_key: dict[str, list[str]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)


def _id_of(rec: dict) -> object | None:
    for name in ID_FIELDS:
        if rec.get(name) is not None:
            return rec[name]
    return None


def _key(value: object) -> str:
    # 81 and "81" name the same MT-Bench question; JSON floats such as 81.0 too.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _nonempty_text(path, line, name, value) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else f"a JSON {json_type_name(value)}"
        raise DataError(path, line, name, f"expected a non-empty string, got {got}",
                        "write the prompt text as a string", reason="bad_field")
    return value


def load_questions(path: str | Path) -> list[Question]:
    """Read a question file (MT-Bench format or any prompt file); ids must be unique."""
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for line, rec in read_records(path):
        if "turns" in rec:
            turns = rec["turns"]
            if not isinstance(turns, list) or not turns:
                raise DataError(path, line, "turns", "expected a non-empty list of strings",
                                'write e.g. "turns": ["first question", "follow-up"]', reason="bad_field")
            turns = [_nonempty_text(path, line, f"turns[{i}]", t) for i, t in enumerate(turns)]
            system = None
        elif "prompt" in rec:
            turns, system = [_nonempty_text(path, line, "prompt", rec["prompt"])], rec.get("system")
        elif "messages" in rec:
            turns, system = _turns_from_messages(path, line, rec["messages"])
        else:
            raise DataError(path, line, None, f"no question text (keys: {', '.join(sorted(rec)) or 'none'})",
                            'give "turns" (MT-Bench), "prompt" or "messages" (system and user messages)',
                            reason="missing_field")
        qid = _id_of(rec)
        key = _key(qid) if qid is not None else turns[0].strip()
        if key in seen:
            what = f"question id {qid!r}" if qid is not None else "prompt"
            raise DataError(path, line, ID_FIELDS[0] if qid is not None else "prompt",
                            f"duplicate {what} (first on line {seen[key]})",
                            "give every question a unique id, or remove the repeated line",
                            reason="duplicate_id")
        seen[key] = line
        reference = rec.get("reference")
        if reference is not None and not (isinstance(reference, list)
                                          and all(isinstance(r, str) for r in reference)):
            raise DataError(path, line, "reference", "expected a list of strings (one per turn)",
                            'write e.g. "reference": ["answer to turn 1", "answer to turn 2"]',
                            reason="bad_field")
        category = rec.get("category") or "general"
        questions.append(Question(key, qid if qid is not None else key, str(category), turns, system,
                                  reference, line))
    if not questions:
        raise DataError(path, None, None, "the question file holds no questions",
                        "pass a JSONL file with one question per line", reason="empty")
    return questions


def _turns_from_messages(path, line, messages) -> tuple[list[str], str | None]:
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "messages", "expected a non-empty list of {role, content}",
                        'write e.g. "messages": [{"role": "user", "content": "..."}]', reason="bad_field")
    turns, system = [], None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system" and i == 0:
            system = _nonempty_text(path, line, f"messages[{i}].content", m.get("content"))
        elif role == "user":
            turns.append(_nonempty_text(path, line, f"messages[{i}].content", m.get("content")))
        else:
            raise DataError(path, line, f"messages[{i}].role",
                            f"role {role!r} is not allowed in a question",
                            "questions hold an optional first system message and user messages only; the "
                            "assistant turns come from the answers file", reason="bad_role")
    if not turns:
        raise DataError(path, line, "messages", "no user message", "add a user message", reason="bad_field")
    return turns, system


def _answer_turns(path, line, rec: dict) -> list[str]:
    if "choices" in rec:  # FastChat: {"choices": [{"index": 0, "turns": [...]}]}
        choices = rec["choices"]
        turns = (choices[0].get("turns") if isinstance(choices, list) and choices
                 and isinstance(choices[0], dict) else None)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(path, line, "choices[0].turns", "expected a non-empty list of strings",
                            "write FastChat's format {\"choices\": [{\"index\": 0, \"turns\": [\"...\"]}]}",
                            reason="bad_field")
        return turns
    for name in TEXT_FIELDS:
        if name in rec:
            value = rec[name]
            if isinstance(value, str):
                return [value]
            if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
                return value
            raise DataError(path, line, name,
                            f"expected a string or a list of strings (one per turn), got a JSON "
                            f"{json_type_name(value)}", f'write e.g. "{name}": "the model\'s reply"',
                            reason="bad_field")
    raise DataError(path, line, None, f"no answer text (keys: {', '.join(sorted(rec)) or 'none'})",
                    f"give the answer in one of {', '.join(TEXT_FIELDS)} or FastChat's choices[0].turns",
                    reason="missing_field")


def load_answers(path: str | Path, questions: list[Question], *, required: list[Question] | None = None,
                 allow_missing: bool = False, name: str | None = None) -> tuple[AnswerSet, list[str]]:
    """Read one model's answers and match each to a question.

    Args:
        path: The answers file.
        questions: Every question of the question file (an answer to any other is an error).
        required: The questions that must be answered (default: all of ``questions``).
        allow_missing: Return unanswered ids instead of raising.
        name: The model's name in reports (default: the records' ``model_id`` or the file name).

    Returns:
        The answers and the ids of questions that have none (empty unless ``allow_missing``).

    Raises:
        DataError: Malformed line, answer for an unknown question, duplicate answer, an answer with
            more turns than its question, or (without ``allow_missing``) questions left unanswered.
    """
    by_id = {q.key: q for q in questions}
    by_prompt = {q.turns[0].strip(): q for q in questions}
    answers = AnswerSet(model=name or "", file=str(path))
    unknown: list[tuple[int, str]] = []
    models: set[str] = set()
    for line, rec in read_records(path):
        qid = _id_of(rec)
        if qid is not None:
            q = by_id.get(_key(qid))
        elif "prompt" in rec:
            prompt = _nonempty_text(path, line, "prompt", rec["prompt"])
            q = by_prompt.get(prompt.strip())
            qid = prompt[:60] + ("..." if len(prompt) > 60 else "")
        else:
            raise DataError(path, line, "question_id", "the answer does not say which question it answers",
                            'add "question_id" (as in the question file) or the question text as "prompt"',
                            reason="missing_field")
        turns = _answer_turns(path, line, rec)
        if q is None:
            unknown.append((line, str(qid)))
            continue
        if q.key in answers.by_key:
            raise DataError(path, line, ID_FIELDS[0], f"second answer for question {q.id!r} (first on line "
                            f"{answers.lines[q.key]})", "keep one answer per question", reason="duplicate_id")
        if len(turns) > len(q.turns):
            raise DataError(path, line, "turns", f"{len(turns)} answer turns for a question with "
                            f"{len(q.turns)} turn(s)", "give one answer per question turn", reason="bad_field")
        if rec.get("model_id") or rec.get("model"):
            models.add(str(rec.get("model_id") or rec.get("model")))
        answers.by_key[q.key] = turns
        answers.lines[q.key] = line
    if unknown:
        listed = ", ".join(f"{qid!r} (line {ln})" for ln, qid in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise DataError(path, unknown[0][0], "question_id",
                        f"{len(unknown)} answer(s) for questions not in the question file: {listed}{more}",
                        "pass the question file these answers were generated from, or remove those lines",
                        reason="unknown_question")
    missing = [str(q.id) for q in (questions if required is None else required) if q.key not in answers.by_key]
    if missing and not allow_missing:
        listed = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        n_req = len(questions if required is None else required)
        raise DataError(path, None, None, f"no answer for {len(missing)} of {n_req} questions: {listed}",
                        "generate answers for them (instructkit answer ...), pass --limit to judge the first "
                        "questions only, or --allow-missing to judge the answered ones and report the rest",
                        reason="missing_answer")
    if not answers.model:
        answers.model = models.pop() if len(models) == 1 else Path(path).name.split(".")[0]
    return answers, missing


def load_references(path: str | Path, questions: list[Question]) -> dict[str, list[str]]:
    """Reference answers by question key (answer-file formats; lines for other questions are ignored)."""
    known = {q.key for q in questions}
    refs: dict[str, list[str]] = {}
    for line, rec in read_records(path):
        qid = _id_of(rec)
        if qid is None:
            raise DataError(path, line, "question_id", "a reference answer needs the id of its question",
                            'add "question_id"', reason="missing_field")
        if _key(qid) in known:
            refs[_key(qid)] = _answer_turns(path, line, rec)
    return refs


def write_answers(path: str | Path, records: list[dict]) -> Path:
    """Write answer records as JSONL atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
