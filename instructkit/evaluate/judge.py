"""Judge-based comparison, MT-Bench style: a strong model grades answers through any OpenAI-compatible endpoint.

Two protocols (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena"):

- **Single-answer grading**: the judge explains, then rates one answer from 1 to 10 as ``[[rating]]``
  (decimals allowed: ``[[8.5]]``). Summary: mean score with its standard error, per turn and category.
- **Pairwise comparison**: the judge sees two answers and ends with ``[[A]]``, ``[[B]]`` or ``[[C]]``
  (tie). Every pair is judged in both orders (A/B, then B/A); a verdict that changes with the order is
  position bias, and counts as a tie. Summary: model A's win rate with its standard error.

Turn 2 of a two-turn question is judged on the whole conversation, with the judge told to grade the
second reply. For categories whose answers can be checked (math, reasoning, coding by default), a
reference answer is shown to the judge when one is given.

Parsing follows the published conventions with two deliberate differences: the *last* ``[[...]]``
in the judge's text is used (judges often quote the format before giving their verdict), and a
rating outside 1-10 is an error rather than a score. A judgment that cannot be parsed, or whose
request failed, is an error: it is kept in the judgments file with the judge's raw text, counted and
listed in the summary, and left out of the averages, never dropped silently.

Statistics (documented in the summary JSON too):

- win rate ``p = (wins + ties / 2) / n`` over the n games (question x turn) with a verdict, i.e. the
  mean of per-game scores ``s_i`` in {1, 0.5, 0}; its standard error is
  ``sqrt(sum_i (s_i - p)^2 / n) / sqrt(n)``, which is the binomial ``sqrt(p (1 - p) / n)`` when there
  are no ties (normal approximation; the 95% interval is ``p +- 1.96 SE`` clipped to [0, 1]);
- mean score ``m`` with standard error ``sd / sqrt(n)`` (``sd`` with n - 1 in the denominator).

Games are treated as independent, though the two turns of one question are related: with two turns,
the SE is somewhat optimistic.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from instructkit.evaluate.judge_data import AnswerSet, Question
from instructkit.openai_client import OpenAIClient, OpenAIClientError

NEED_REFERENCE = ("math", "reasoning", "coding")
JUDGE_SAMPLING = {"temperature": 0.0, "max_tokens": 2048}

# ------------------------------------------------------------------------------------------- prompts

_SINGLE_RULES = (
    "You are grading the reply of an AI assistant to a user. Judge it on how well it does what the "
    "user asked: usefulness, relevance, correctness, depth, originality and appropriate detail. {focus}"
    "Write a brief justification first and stay impartial. Then give a score from 1 (worst) to 10 "
    "(best) in exactly this form: \"[[score]]\", for example \"Score: [[6]]\".")
_SINGLE_REF_RULES = (
    "You are grading the reply of an AI assistant to a user. What matters is whether it is correct and "
    "useful. A reference answer is provided: compare the reply with it and point out every error in "
    "the reply. {focus}Write a brief justification first and stay impartial. Then give a score from 1 "
    "(worst) to 10 (best) in exactly this form: \"[[score]]\", for example \"Score: [[6]]\".")
_PAIR_RULES = (
    "You are comparing the replies of two AI assistants, A and B, to the same user. Decide which one "
    "does better what the user asked, considering usefulness, relevance, correctness, depth, "
    "originality and appropriate detail. {focus}Compare them in a brief justification first. The order "
    "in which the replies appear, their length and the assistants' names must not sway you. Finish "
    "with your verdict in exactly this form: \"[[A]]\" if A is better, \"[[B]]\" if B is better, or "
    "\"[[C]]\" if they are equally good.")
_PAIR_REF_RULES = (
    "You are comparing the replies of two AI assistants, A and B, to the same user. What matters is "
    "correctness and usefulness. A reference answer is provided: compare both replies with it and point "
    "out their errors. {focus}Compare them in a brief justification first. The order in which the "
    "replies appear, their length and the assistants' names must not sway you. Finish with your "
    "verdict in exactly this form: \"[[A]]\" if A is better, \"[[B]]\" if B is better, or \"[[C]]\" if "
    "they are equally good.")
_FOCUS_LAST = "Grade only the assistant's reply to the user's final message; earlier turns are context. "
_FOCUS_LAST_PAIR = "Compare only the replies to the user's final message; earlier turns are context. "


def _transcript(question: Question, replies: list[str], upto: int, speaker: str) -> str:
    """The conversation up to turn ``upto`` (1-based) as plain text with clear markers."""
    parts = [f"### System prompt\n{question.system}"] if question.system else []
    for t in range(upto):
        parts.append(f"### User\n{question.turns[t]}")
        parts.append(f"### {speaker}\n{replies[t]}")
    return "\n\n".join(parts)


def _block(title: str, body: str) -> str:
    return f"<<<{title}>>>\n{body}\n<<<end of {title}>>>"


def single_prompt(question: Question, answer: list[str], turn: int,
                  reference: list[str] | None) -> tuple[str, list[dict]]:
    """Prompt name and chat messages asking the judge to rate ``answer``'s reply at ``turn`` (1-based)."""
    focus = _FOCUS_LAST if turn > 1 else ""
    rules = (_SINGLE_REF_RULES if reference else _SINGLE_RULES).format(focus=focus)
    name = "single" + ("-ref" if reference else "") + ("-multi-turn" if turn > 1 else "")
    blocks = []
    if reference:
        blocks.append(_block("reference answer", _transcript(question, reference, turn, "Reference")))
    blocks.append(_block("conversation to grade", _transcript(question, answer, turn, "Assistant")))
    return name, [{"role": "system", "content": rules}, {"role": "user", "content": "\n\n".join(blocks)}]


def pairwise_prompt(question: Question, answer_a: list[str], answer_b: list[str], turn: int,
                    reference: list[str] | None) -> tuple[str, list[dict]]:
    """Prompt name and chat messages asking the judge to compare A and B at ``turn`` (1-based)."""
    focus = _FOCUS_LAST_PAIR if turn > 1 else ""
    rules = (_PAIR_REF_RULES if reference else _PAIR_RULES).format(focus=focus)
    name = "pair" + ("-ref" if reference else "") + ("-multi-turn" if turn > 1 else "")
    blocks = []
    if reference:
        blocks.append(_block("reference answer", _transcript(question, reference, turn, "Reference")))
    blocks.append(_block("assistant A", _transcript(question, answer_a, turn, "Assistant A")))
    blocks.append(_block("assistant B", _transcript(question, answer_b, turn, "Assistant B")))
    return name, [{"role": "system", "content": rules}, {"role": "user", "content": "\n\n".join(blocks)}]


# ------------------------------------------------------------------------------------------- parsing

_NUM = r"(\d+(?:\.\d*)?)"
_SCORE = re.compile(r"\[\[\s*" + _NUM + r"\s*(?:/\s*10\s*)?\]\]")
_SCORE_SINGLE = re.compile(r"(?<!\[)\[\s*" + _NUM + r"\s*(?:/\s*10\s*)?\](?!\])")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)


def parse_score(text: str) -> tuple[float | None, str | None]:
    """The judge's 1-10 rating: the last ``[[x]]`` (``[[8]]``, ``[[8.5]]``, ``[[8/10]]``).

    Falls back to the last single-bracket ``[x]`` when there is no double-bracket one, as MT-Bench does.

    Returns:
        ``(score, None)`` or ``(None, error)``.
    """
    found = _SCORE.findall(text) or _SCORE_SINGLE.findall(text)
    if not found:
        return None, "no [[rating]] in the judge's reply"
    score = float(found[-1])
    if not 1.0 <= score <= 10.0:
        return None, f"rating {found[-1]} is outside 1-10"
    return score, None


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """The judge's pairwise verdict: ``"A"``, ``"B"`` or ``"tie"`` from the last ``[[A]]/[[B]]/[[C]]``."""
    found = _VERDICT.findall(text)
    if not found:
        return None, "no [[A]], [[B]] or [[C]] verdict in the judge's reply"
    v = found[-1].upper()
    return ("tie" if v == "C" else v), None


def combine_orders(first: str | None, second: str | None) -> tuple[str, bool]:
    """Outcome for model A from the verdicts of both orders.

    Args:
        first: Verdict with model A shown as assistant A (``"A"``, ``"B"``, ``"tie"`` or None).
        second: Verdict with the order swapped (model A shown as assistant B).

    Returns:
        ``(outcome, inconsistent)`` with outcome ``"win"``, ``"loss"``, ``"tie"`` (for model A) or
        ``"error"``; verdicts that disagree once positions are swapped back are a tie.
    """
    if first is None or second is None:
        return "error", False
    a = {"A": "win", "B": "loss", "tie": "tie"}[first]
    b = {"A": "loss", "B": "win", "tie": "tie"}[second]
    return (a, False) if a == b else ("tie", True)


# ---------------------------------------------------------------------------------------- statistics


def _ci(p: float, se: float, lo: float, hi: float) -> list[float]:
    return [max(lo, p - 1.96 * se), min(hi, p + 1.96 * se)]


def win_rate(outcomes: list[str]) -> dict:
    """Win rate of model A, ``(wins + ties/2) / n``, with its standard error (see the module docstring)."""
    wins, losses, ties = (outcomes.count(x) for x in ("win", "loss", "tie"))
    n = wins + losses + ties
    out = {"n": n, "wins": wins, "losses": losses, "ties": ties}
    if n == 0:
        return {**out, "win_rate": None, "se": None, "ci95": None}
    scores = [1.0] * wins + [0.0] * losses + [0.5] * ties
    p = sum(scores) / n
    se = math.sqrt(sum((s - p) ** 2 for s in scores) / n) / math.sqrt(n)
    return {**out, "win_rate": p, "se": se, "ci95": _ci(p, se, 0.0, 1.0)}


def mean_score(scores: list[float]) -> dict:
    """Mean rating with the standard error ``sd / sqrt(n)`` (sample sd; None below two scores)."""
    n = len(scores)
    if n == 0:
        return {"n": 0, "mean": None, "se": None, "ci95": None}
    m = sum(scores) / n
    if n < 2:
        return {"n": n, "mean": m, "se": None, "ci95": None}
    se = math.sqrt(sum((s - m) ** 2 for s in scores) / (n - 1)) / math.sqrt(n)
    return {"n": n, "mean": m, "se": se, "ci95": _ci(m, se, 1.0, 10.0)}


WIN_RATE_FORMULA = ("win_rate = (wins + 0.5 * ties) / n over games with a verdict (position-inconsistent "
                    "verdicts are ties); se = sqrt(mean((s_i - win_rate)^2) / n) with s_i in {1, 0.5, 0}, "
                    "= sqrt(p(1-p)/n) without ties; ci95 = win_rate +- 1.96 se, clipped to [0, 1]")
SCORE_FORMULA = "mean of 1-10 ratings; se = sample sd / sqrt(n); ci95 = mean +- 1.96 se"

# -------------------------------------------------------------------------------------------- running


@dataclass
class JudgeOptions:
    """What to judge and how.

    Attributes:
        references: Reference answers by question key (None: no references).
        reference_categories: Categories whose questions are judged against a reference.
        max_turn: Judge turns 1..max_turn at most (None: every turn the answers have).
        sampling: Request fields for the judge (deterministic by default).
        cache_path: JSONL of judge replies keyed by request; reused so an interrupted or repeated
            run does not pay twice. None turns caching off.
    """

    references: dict[str, list[str]] | None = None
    reference_categories: tuple[str, ...] = NEED_REFERENCE
    max_turn: int | None = None
    sampling: dict | None = None
    cache_path: Path | None = None


class JudgeCache:
    """Judge replies by a hash of (endpoint, judge model, messages, sampling), appended as they arrive."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, str] = {}
        if path is not None and path.exists():
            for raw in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(raw)
                    self.entries[rec["key"]] = rec["text"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interruption; that request is simply re-sent

    @staticmethod
    def key(base_url: str, model: str, messages: list[dict], sampling: dict) -> str:
        blob = json.dumps({"url": base_url, "model": model, "messages": messages, "sampling": sampling},
                          sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def add(self, key: str, text: str) -> None:
        self.entries[key] = text
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")


def _reference_for(q: Question, turn: int, opts: JudgeOptions) -> tuple[list[str] | None, bool]:
    """(reference turns or None, whether the question needed one and had none)."""
    if q.category not in opts.reference_categories or opts.references is None:
        return None, False
    ref = opts.references.get(q.key)
    if ref is None or len(ref) < turn:
        return None, True
    return ref, False


def _ask_all(client: OpenAIClient, requests: list[list[dict]], opts: JudgeOptions,
             progress: Callable[[str], None] | None) -> list[tuple[str | None, str | None, bool]]:
    """Judge replies for every request: ``(text, request_error, from_cache)``, cache first."""
    sampling = {**JUDGE_SAMPLING, **(opts.sampling or {})}
    cache = JudgeCache(opts.cache_path)
    keys = [JudgeCache.key(client.base_url, client.model, m, sampling) for m in requests]
    out: list = [None] * len(requests)
    todo = []
    for i, k in enumerate(keys):
        if k in cache.entries:
            out[i] = (cache.entries[k], None, True)
        else:
            todo.append(i)
    done = [0]
    report_every = max(1, len(todo) // 10)

    def on_result(j: int, res) -> None:
        i = todo[j]
        if isinstance(res, OpenAIClientError):
            out[i] = (None, f"request failed: {res}", False)
        else:
            out[i] = (res, None, False)
            cache.add(keys[i], res)
        done[0] += 1
        if progress and (done[0] % report_every == 0 or done[0] == len(todo)):
            progress(f"judge: {done[0]}/{len(todo)} requests done"
                     f"{f' ({len(requests) - len(todo)} from cache)' if len(todo) < len(requests) else ''}")

    if todo:
        client.chat_many([requests[i] for i in todo], return_exceptions=True, on_result=on_result,
                         **sampling)
    return out


def _turns_to_judge(answer_lists: list[list[str]], opts: JudgeOptions) -> int:
    n = min(len(a) for a in answer_lists)
    return min(n, opts.max_turn) if opts.max_turn else n


def judge_single(client: OpenAIClient, questions: list[Question], answers: AnswerSet,
                 opts: JudgeOptions | None = None,
                 progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Rate every answered turn; returns the judgments (one dict per question x turn) and a summary."""
    opts = opts or JudgeOptions()
    jobs, requests, notes = [], [], _Notes()
    for q in questions:
        ans = answers.by_key.get(q.key)
        if ans is None:
            notes.unanswered(q)
            continue
        n_turns = _turns_to_judge([ans], opts)
        notes.unjudged_turns(q, len(q.turns) - n_turns)
        for turn in range(1, n_turns + 1):
            ref, lacking = _reference_for(q, turn, opts)
            notes.lacking_reference(q, turn, lacking)
            name, messages = single_prompt(q, ans, turn, ref)
            jobs.append((q, turn, name))
            requests.append(messages)
    replies = _ask_all(client, requests, opts, progress)
    judgments = []
    for (q, turn, name), messages, (text, req_err, cached) in zip(jobs, requests, replies):
        score, err = parse_score(text) if text is not None else (None, req_err)
        judgments.append({"question_id": q.id, "category": q.category, "turn": turn,
                          "model": answers.model, "judge": client.model, "prompt": name, "score": score,
                          "error": err, "judgment": text, "cached": cached,
                          "judge_prompt": messages[-1]["content"]})
    return judgments, summarize_single(judgments, answers.model, client, notes)


def judge_pairwise(client: OpenAIClient, questions: list[Question], answers_a: AnswerSet,
                   answers_b: AnswerSet, opts: JudgeOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Compare A and B on every turn both answered, in both orders; returns judgments and a summary."""
    opts = opts or JudgeOptions()
    jobs, requests, notes = [], [], _Notes()
    for q in questions:
        a, b = answers_a.by_key.get(q.key), answers_b.by_key.get(q.key)
        if a is None or b is None:
            notes.unanswered(q)
            continue
        n_turns = _turns_to_judge([a, b], opts)
        notes.unjudged_turns(q, len(q.turns) - n_turns)
        for turn in range(1, n_turns + 1):
            ref, lacking = _reference_for(q, turn, opts)
            notes.lacking_reference(q, turn, lacking)
            name, ab = pairwise_prompt(q, a, b, turn, ref)
            _, ba = pairwise_prompt(q, b, a, turn, ref)
            jobs.append((q, turn, name))
            requests.extend([ab, ba])
    replies = _ask_all(client, requests, opts, progress)
    judgments = []
    for k, (q, turn, name) in enumerate(jobs):
        (t1, e1, c1), (t2, e2, c2) = replies[2 * k], replies[2 * k + 1]
        v1, p1 = parse_verdict(t1) if t1 is not None else (None, e1)
        v2, p2 = parse_verdict(t2) if t2 is not None else (None, e2)
        outcome, inconsistent = combine_orders(v1, v2)
        errors = [f"{order}: {e}" for order, e in (("A/B order", p1), ("B/A order", p2)) if e]
        judgments.append({"question_id": q.id, "category": q.category, "turn": turn,
                          "model_a": answers_a.model, "model_b": answers_b.model, "judge": client.model,
                          "prompt": name, "outcome": outcome, "inconsistent": inconsistent,
                          "verdict_ab": v1, "verdict_ba": v2, "error": "; ".join(errors) or None,
                          "judgment_ab": t1, "judgment_ba": t2, "cached": c1 and c2,
                          "judge_prompt_ab": requests[2 * k][-1]["content"],
                          "judge_prompt_ba": requests[2 * k + 1][-1]["content"]})
    return judgments, summarize_pairwise(judgments, answers_a.model, answers_b.model, client, notes)


class _Notes:
    """What was not judged, or judged without a reference it should have had, by question id."""

    def __init__(self):
        self.turns_not_judged: list[str] = []
        self.without_reference: list[str] = []
        self.no_answer: list[str] = []

    def unanswered(self, q: Question) -> None:
        self.no_answer.append(str(q.id))

    def unjudged_turns(self, q: Question, n: int) -> None:
        self.turns_not_judged.extend(f"{q.id}:turn{t}" for t in range(len(q.turns) - n + 1, len(q.turns) + 1))

    def lacking_reference(self, q: Question, turn: int, lacking: bool) -> None:
        if lacking:
            self.without_reference.append(f"{q.id}:turn{turn}")

    def as_dict(self) -> dict:
        return {"questions_without_answers": {"count": len(self.no_answer), "items": self.no_answer,
                                              "why": "no answer in the answers file(s) (--allow-missing)"},
                "turns_not_judged": {"count": len(self.turns_not_judged), "items": self.turns_not_judged,
                                     "why": "the answers have fewer turns than the question, or --max-turn"},
                "judged_without_reference": {"count": len(self.without_reference),
                                             "items": self.without_reference,
                                             "why": "reference category, but no reference answer given"}}


def _group(judgments: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for j in judgments:
        groups.setdefault(str(j[key]), []).append(j)
    return dict(sorted(groups.items()))


def _errors(judgments: list[dict]) -> dict:
    bad = [j for j in judgments if j["error"]]
    return {"count": len(bad), "items": [{"question_id": j["question_id"], "turn": j["turn"],
                                          "error": j["error"]} for j in bad]}


def summarize_single(judgments: list[dict], model: str, client: OpenAIClient, notes: _Notes) -> dict:
    def stats(js):
        return mean_score([j["score"] for j in js if j["score"] is not None])

    return {"mode": "single", "model": model, "judge": client.describe(), "judgments": len(judgments),
            "overall": stats(judgments),
            "by_turn": {t: stats(js) for t, js in _group(judgments, "turn").items()},
            "by_category": {c: stats(js) for c, js in _group(judgments, "category").items()},
            "errors": _errors(judgments), **notes.as_dict(), "requests": client.stats.as_dict(),
            "formula": SCORE_FORMULA}


def summarize_pairwise(judgments: list[dict], model_a: str, model_b: str, client: OpenAIClient,
                       notes: _Notes) -> dict:
    def stats(js):
        return {**win_rate([j["outcome"] for j in js]),
                "inconsistent": sum(j["inconsistent"] for j in js)}

    return {"mode": "pairwise", "model_a": model_a, "model_b": model_b, "judge": client.describe(),
            "games": len(judgments), "overall": stats(judgments),
            "by_turn": {t: stats(js) for t, js in _group(judgments, "turn").items()},
            "by_category": {c: stats(js) for c, js in _group(judgments, "category").items()},
            "errors": _errors(judgments), **notes.as_dict(), "requests": client.stats.as_dict(),
            "formula": WIN_RATE_FORMULA}


def write_judgments(out_dir: str | Path, judgments: list[dict], summary: dict) -> tuple[Path, Path]:
    """``judgments.jsonl`` (one line per judgment, with the judge's raw text) and ``summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, spath = out / "judgments.jsonl", out / "summary.json"
    with open(jpath, "w", encoding="utf-8") as fh:
        for j in judgments:
            fh.write(json.dumps(j, ensure_ascii=False) + "\n")
    spath.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return jpath, spath


def _fmt(x, spec: str) -> str:
    return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table for the terminal."""
    lines = []
    if summary["mode"] == "single":
        lines.append(f"single-answer grading of {summary['model']} by {summary['judge']['model']} (1-10)")
        lines.append(f"{'group':24s} {'n':>5s} {'mean':>7s} {'se':>7s}")
        rows = ([("overall", summary["overall"])] + [(f"turn {t}", s) for t, s in summary["by_turn"].items()]
                + [(c, s) for c, s in summary["by_category"].items()])
        for name, s in rows:
            lines.append(f"{name:24s} {s['n']:5d} {_fmt(s['mean'], '7.2f')} {_fmt(s['se'], '7.2f')}")
    else:
        lines.append(f"pairwise: {summary['model_a']} (A) vs {summary['model_b']} (B), judge "
                     f"{summary['judge']['model']}, both orders; win rate of A = (wins + ties/2) / n")
        lines.append(f"{'group':24s} {'n':>5s} {'win':>5s} {'loss':>5s} {'tie':>5s} {'incons':>6s} "
                     f"{'win rate':>9s} {'se':>7s}")
        rows = ([("overall", summary["overall"])] + [(f"turn {t}", s) for t, s in summary["by_turn"].items()]
                + [(c, s) for c, s in summary["by_category"].items()])
        for name, s in rows:
            lines.append(f"{name:24s} {s['n']:5d} {s['wins']:5d} {s['losses']:5d} {s['ties']:5d} "
                         f"{s['inconsistent']:6d} {_fmt(s['win_rate'], '9.3f')} {_fmt(s['se'], '7.3f')}")
    err = summary["errors"]
    if err["count"]:
        shown = ", ".join(f"{e['question_id']}:turn{e['turn']}" for e in err["items"][:10])
        lines.append(f"{err['count']} judgment(s) had errors and are not counted above: {shown}"
                     f"{' ...' if err['count'] > 10 else ''} (first: {err['items'][0]['error'][:300]})")
    for key in ("questions_without_answers", "turns_not_judged", "judged_without_reference"):
        if summary[key]["count"]:
            items = summary[key]["items"]
            lines.append(f"note: {summary[key]['count']} {key.replace('_', ' ')} ({summary[key]['why']}): "
                         f"{', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
    return "\n".join(lines)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
