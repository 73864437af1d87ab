"""Judge-based comparison against a deterministic fake judge on 127.0.0.1.

The fake judge reads the prompt it is sent: in single mode it rates the graded reply with the number
planted in it ("quality 7" -> "[[7]]"); in pairwise mode it prefers the reply containing GOOD, calls
a tie when both or neither do, and is position-biased ("[[A]]" whatever the order) for replies
containing BIASED, so the both-orders rule must turn those into ties. Win rates and standard errors
are checked against values computed by hand.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAI, Reply

from instructkit.cli import main
from instructkit.data.errors import DataError
from instructkit.evaluate.judge import (JudgeOptions, combine_orders, judge_pairwise, judge_single,
                                        mean_score, pairwise_prompt, parse_score, parse_verdict,
                                        single_prompt, win_rate)
from instructkit.evaluate.judge_data import load_answers, load_questions, load_references
from instructkit.openai_client import OpenAIClient

SECRET = "sk-judge-SECRET-9f8e7d6c5b4a"


# ------------------------------------------------------------------------------------------ fake judge

def _block(text: str, title: str) -> str:
    m = re.search(rf"<<<{title}>>>\n(.*?)\n<<<end of {title}>>>", text, re.S)
    return m.group(1) if m else ""


def _last_reply(block: str, speaker: str) -> str:
    return block.rsplit(f"### {speaker}\n", 1)[-1]


def fake_judge(call) -> str:
    user = call.body["messages"][-1]["content"]
    if "<<<conversation to grade>>>" in user:
        reply = _last_reply(_block(user, "conversation to grade"), "Assistant")
        if "HTTP500" in reply:
            return Reply(500, {"error": {"message": "judge crashed"}})
        m = re.search(r"quality (\d+(?:\.\d+)?)", reply)
        # Quotes the format first, as real judges do, so only the last [[...]] may count.
        return f'The format is "[[rating]]". Solid reply. Rating: [[{m.group(1)}]]' if m else "I cannot rate this."
    a = _last_reply(_block(user, "assistant A"), "Assistant A")
    b = _last_reply(_block(user, "assistant B"), "Assistant B")
    if "CONFUSE" in a:  # this model's reply in position A makes the judge ramble without a verdict
        return "Both have merits and flaws."
    if "BIASED" in a or "BIASED" in b:
        return "The first reply is better. [[A]]"
    good_a, good_b = "GOOD" in a, "GOOD" in b
    if good_a == good_b:
        return "Equally good. [[C]]"
    return 'Verdict format: "[[A]]", "[[B]]" or "[[C]]". Final verdict: ' + ("[[A]]" if good_a else "[[B]]")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def planted(tmp_path):
    """Six questions (writing x3, math x2, coding x1); q1 has two turns."""
    qs = [
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now make it sadder."]},
        {"question_id": 2, "category": "writing", "turns": ["Write a limerick."]},
        {"question_id": 3, "category": "writing", "turns": ["Write a slogan."]},
        {"question_id": 4, "category": "math", "turns": ["What is 2+2?"], "reference": ["2+2 = 4"]},
        {"question_id": 5, "category": "math", "turns": ["What is 3*3?"]},
        {"question_id": 6, "category": "coding", "turns": ["Reverse a list in Python."]},
    ]
    a = [("GOOD haiku", "plain sadder haiku"), ("plain limerick",), ("GOOD slogan",), ("BIASED four",),
         ("GOOD nine",), ("CONFUSE GOOD code",)]
    b = [("plain haiku", "GOOD sadder haiku"), ("GOOD limerick",), ("GOOD slogan too",), ("BIASED 4",),
         ("plain nine",), ("plain code",)]
    single = [("quality 8", "quality 6"), ("quality 9.5",), ("no number here",), ("quality 3",),
              ("quality 7",), ("quality 10",)]
    return {
        "questions": write_jsonl(tmp_path / "q.jsonl", qs),
        "a": write_jsonl(tmp_path / "model-a.jsonl", [{"question_id": q["question_id"], "model_id": "alpha",
                                                       "choices": [{"index": 0, "turns": list(t)}]}
                                                      for q, t in zip(qs, a)]),
        "b": write_jsonl(tmp_path / "model-b.jsonl", [{"question_id": str(q["question_id"]), "answer": list(t)}
                                                      for q, t in zip(qs, b)]),
        "single": write_jsonl(tmp_path / "single.jsonl", [{"question_id": q["question_id"], "answer": list(t)}
                                                          for q, t in zip(qs, single)]),
        "refs": write_jsonl(tmp_path / "refs.jsonl", [{"question_id": 4, "choices": [{"turns": ["4"]}]}]),
        "dir": tmp_path,
    }


def client_for(srv, **kw):
    kw.setdefault("backoff_base", 0.01)
    return OpenAIClient(srv.url, "fake-judge", **kw)


# --------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,score", [
    ("Rating: [[8]]", 8.0), ("[[8.5]]", 8.5), ("Rating: [[ 7 ]]", 7.0), ("[[8/10]]", 8.0), ("[[8.]]", 8.0),
    ('use "Rating: [[5]]" as format ... so: [[9]]', 9.0),  # the last one is the verdict
    ("Rating: [7]", 7.0),  # single brackets only as a fallback
    ("[[7]] see note [3]", 7.0), ("[[1]]", 1.0), ("[[10]]", 10.0),
])
def test_parse_score(text, score):
    assert parse_score(text) == (score, None)


@pytest.mark.parametrize("text,problem", [
    ("a fine answer, 8 out of 10", "no [[rating]]"), ("[[11]]", "outside 1-10"), ("[[0]]", "outside 1-10"),
    ("[[A]]", "no [[rating]]"), ("[[-3]]", "no [[rating]]"), ("", "no [[rating]]"),
])
def test_parse_score_errors(text, problem):
    score, err = parse_score(text)
    assert score is None and problem in err


@pytest.mark.parametrize("text,verdict", [
    ("[[A]]", "A"), ("so [[B]]", "B"), ("[[C]]", "tie"), ("[[ b ]]", "B"),
    ('"[[A]]" if A is better, "[[B]]" if B is better. Final: [[B]]', "B"),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == (verdict, None)


def test_parse_verdict_error():
    v, err = parse_verdict("Assistant A is better.")
    assert v is None and "no [[A]]" in err


def test_combine_orders_counts_position_inconsistency_as_tie():
    # first = verdict with model A shown first; second = with the order swapped.
    assert combine_orders("A", "B") == ("win", False)
    assert combine_orders("B", "A") == ("loss", False)
    assert combine_orders("tie", "tie") == ("tie", False)
    assert combine_orders("A", "A") == ("tie", True)  # always the first position: bias
    assert combine_orders("B", "B") == ("tie", True)
    assert combine_orders("A", "tie") == ("tie", True)
    assert combine_orders(None, "A") == ("error", False)


def test_win_rate_and_standard_error_by_hand():
    # W=2, L=1, T=2: p = (2 + 1) / 5 = 0.6; squared deviations .16 + .36 + .01 + .01 + .16 = .70.
    r = win_rate(["win", "loss", "tie", "tie", "win"])
    assert (r["n"], r["wins"], r["losses"], r["ties"]) == (5, 2, 1, 2)
    assert r["win_rate"] == pytest.approx(0.6)
    assert r["se"] == pytest.approx(math.sqrt(0.70 / 5 / 5))  # 0.167332
    assert r["ci95"] == pytest.approx([0.6 - 1.96 * 0.167332, 0.6 + 1.96 * 0.167332], abs=1e-4)
    # Without ties it is the binomial sqrt(p(1-p)/n).
    r = win_rate(["win"] * 3 + ["loss"])
    assert r["win_rate"] == 0.75 and r["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert win_rate(["win"] * 4)["ci95"] == [1.0, 1.0]
    assert win_rate([])["win_rate"] is None and win_rate(["error"])["n"] == 0


def test_mean_score_by_hand():
    r = mean_score([8, 6, 9.5, 3, 7, 10])
    assert r["mean"] == pytest.approx(7.25)
    # squared deviations sum to 32.875; sample sd = sqrt(32.875 / 5); se = sd / sqrt(6)
    assert r["se"] == pytest.approx(1.0468206, abs=1e-6)
    assert mean_score([5])["se"] is None and mean_score([])["mean"] is None


# --------------------------------------------------------------------------------------------- prompts

def test_prompts_carry_turns_references_and_focus(planted):
    qs = load_questions(planted["questions"])
    q1, q4 = qs[0], qs[3]
    name, msgs = single_prompt(q1, ["first reply", "second reply"], 1, None)
    assert name == "single" and "[[score]]" in msgs[0]["content"]
    assert "Write a haiku." in msgs[1]["content"] and "first reply" in msgs[1]["content"]
    assert "second reply" not in msgs[1]["content"] and "Now make it sadder." not in msgs[1]["content"]
    name, msgs = single_prompt(q1, ["first reply", "second reply"], 2, None)
    assert name == "single-multi-turn" and "final message" in msgs[0]["content"]
    assert msgs[1]["content"].index("first reply") < msgs[1]["content"].index("second reply")
    name, msgs = pairwise_prompt(q4, ["four"], ["4"], 1, ["The answer is 4."])
    assert name == "pair-ref" and "reference answer" in msgs[0]["content"]
    assert "<<<reference answer>>>" in msgs[1]["content"] and "The answer is 4." in msgs[1]["content"]
    assert '"[[A]]"' in msgs[0]["content"] and '"[[C]]"' in msgs[0]["content"]


# -------------------------------------------------------------------------------------------- protocol

def test_pairwise_both_orders_win_rate_per_category_and_turn(planted):
    qs = load_questions(planted["questions"])
    a, _ = load_answers(planted["a"], qs)
    b, _ = load_answers(planted["b"], qs)
    assert a.model == "alpha" and b.model == "model-b"
    refs = load_references(planted["refs"], qs)
    with FakeOpenAI(fake_judge) as srv:
        judgments, summary = judge_pairwise(client_for(srv), qs, a, b, JudgeOptions(references=refs))
        assert len(srv.calls) == 14  # 7 games x 2 orders
        assert all(c.body["temperature"] == 0.0 for c in srv.calls)
    by = {(j["question_id"], j["turn"]): j for j in judgments}
    assert by[(1, 1)]["outcome"] == "win" and (by[(1, 1)]["verdict_ab"], by[(1, 1)]["verdict_ba"]) == ("A", "B")
    assert by[(1, 2)]["outcome"] == "loss" and by[(1, 2)]["prompt"] == "pair-multi-turn"
    assert by[(2, 1)]["outcome"] == "loss"
    assert by[(3, 1)]["outcome"] == "tie" and not by[(3, 1)]["inconsistent"]
    assert by[(4, 1)]["outcome"] == "tie" and by[(4, 1)]["inconsistent"]  # [[A]] in both orders
    assert by[(4, 1)]["prompt"] == "pair-ref" and by[(5, 1)]["prompt"] == "pair"  # only q4 has a reference
    assert by[(5, 1)]["outcome"] == "win"
    assert by[(6, 1)]["outcome"] == "error" and "A/B order: no [[A]]" in by[(6, 1)]["error"]
    assert by[(6, 1)]["judgment_ab"] == "Both have merits and flaws."  # raw text kept
    o = summary["overall"]
    # W=2 (q1t1, q5), L=2 (q1t2, q2), T=2 (q3, q4): p = 0.5, every |s - p| = 0.5 or 0 -> var 1/6.
    assert (o["n"], o["wins"], o["losses"], o["ties"], o["inconsistent"]) == (6, 2, 2, 2, 1)
    assert o["win_rate"] == pytest.approx(0.5) and o["se"] == pytest.approx(math.sqrt(1 / 6 / 6))
    t1 = summary["by_turn"]["1"]
    assert (t1["n"], t1["win_rate"]) == (5, pytest.approx(0.6)) and t1["se"] == pytest.approx(0.167332, abs=1e-6)
    assert summary["by_turn"]["2"]["win_rate"] == 0.0
    w, m = summary["by_category"]["writing"], summary["by_category"]["math"]
    assert (w["n"], w["win_rate"]) == (4, pytest.approx(0.375))
    assert (m["n"], m["win_rate"], m["se"]) == (2, pytest.approx(0.75), pytest.approx(math.sqrt(0.125 / 2 / 2)))
    assert summary["by_category"]["coding"]["n"] == 0
    assert summary["errors"]["count"] == 1 and summary["errors"]["items"][0]["question_id"] == 6
    # q5 (math) and q6 (coding) have no reference in refs.jsonl: reported, not hidden.
    assert summary["judged_without_reference"]["items"] == ["5:turn1", "6:turn1"]


def test_single_grading_scores_errors_and_turns(planted):
    qs = load_questions(planted["questions"])
    ans, _ = load_answers(planted["single"], qs)
    with FakeOpenAI(fake_judge) as srv:
        judgments, summary = judge_single(client_for(srv), qs, ans, JudgeOptions())
    assert [j["score"] for j in judgments] == [8.0, 6.0, 9.5, None, 3.0, 7.0, 10.0]
    bad = judgments[3]
    assert bad["question_id"] == 3 and "no [[rating]]" in bad["error"] and bad["judgment"] == "I cannot rate this."
    o = summary["overall"]
    assert o["n"] == 6 and o["mean"] == pytest.approx(7.25) and o["se"] == pytest.approx(1.0468206, abs=1e-6)
    assert summary["by_turn"]["2"] == {"n": 1, "mean": 6.0, "se": None, "ci95": None}
    assert summary["by_category"]["math"]["mean"] == pytest.approx(5.0)
    assert summary["errors"]["count"] == 1
    assert judgments[1]["prompt"] == "single-multi-turn"


def test_first_turn_only_answers_and_max_turn(planted, tmp_path):
    qs = load_questions(planted["questions"])
    ans, _ = load_answers(planted["single"], qs)
    with FakeOpenAI(fake_judge) as srv:
        judgments, summary = judge_single(client_for(srv), qs, ans, JudgeOptions(max_turn=1))
    assert len(judgments) == 6 and summary["turns_not_judged"]["items"] == ["1:turn2"]


def test_failed_requests_are_errors_not_dropped(planted, tmp_path):
    qs = load_questions(planted["questions"])
    path = write_jsonl(tmp_path / "s.jsonl", [{"question_id": i, "answer": "HTTP500" if i == 2 else "quality 5"}
                                              for i in range(1, 7)])
    ans, _ = load_answers(path, qs)
    with FakeOpenAI(fake_judge) as srv:
        judgments, summary = judge_single(client_for(srv, max_retries=1), qs, ans, JudgeOptions())
    assert summary["overall"]["n"] == 5 and summary["errors"]["count"] == 1
    err = summary["errors"]["items"][0]
    assert err["question_id"] == 2 and "request failed" in err["error"] and "HTTP 500" in err["error"]
    assert summary["requests"]["retries"] == 1


def test_cache_reuses_judge_replies(planted, tmp_path):
    qs = load_questions(planted["questions"])
    ans, _ = load_answers(planted["single"], qs)
    opts = JudgeOptions(cache_path=tmp_path / "cache.jsonl")
    with FakeOpenAI(fake_judge) as srv:
        first, _ = judge_single(client_for(srv), qs, ans, opts)
        n = len(srv.calls)
        second, _ = judge_single(client_for(srv), qs, ans, opts)
        assert len(srv.calls) == n == 7  # nothing re-sent
    assert [j["score"] for j in first] == [j["score"] for j in second]
    assert all(j["cached"] for j in second)


def test_prompt_file_questions_match_answers_by_prompt(tmp_path):
    q = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."},
                                                 {"messages": [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Say bye."}]}])
    a = write_jsonl(tmp_path / "resp.jsonl", [{"prompt": "Say bye.", "response": "quality 4"},
                                              {"prompt": "Say hi.", "response": "quality 9"}])
    qs = load_questions(q)
    assert qs[1].system == "Be brief." and qs[1].category == "general"
    ans, _ = load_answers(a, qs)
    with FakeOpenAI(fake_judge) as srv:
        judgments, summary = judge_single(client_for(srv), qs, ans)
        assert "### System prompt\nBe brief." in srv.calls[1].body["messages"][-1]["content"] or \
               "### System prompt\nBe brief." in srv.calls[0].body["messages"][-1]["content"]
    assert sorted(j["score"] for j in judgments) == [4.0, 9.0] and summary["overall"]["mean"] == 6.5


# --------------------------------------------------------------------------------------------- bad input

def test_missing_answers_are_named(planted, tmp_path):
    qs = load_questions(planted["questions"])
    part = write_jsonl(tmp_path / "part.jsonl", [{"question_id": 1, "answer": "x"}, {"question_id": 4, "answer": "y"}])
    with pytest.raises(DataError) as e:
        load_answers(part, qs)
    assert "no answer for 4 of 6 questions: 2, 3, 5, 6" in str(e.value) and "--allow-missing" in str(e.value)
    ans, missing = load_answers(part, qs, allow_missing=True)
    assert missing == ["2", "3", "5", "6"] and set(ans.by_key) == {"1", "4"}
    assert load_answers(part, qs, required=[qs[0], qs[3]])[1] == []  # e.g. --limit


def test_unknown_ids_duplicates_and_malformed_lines(planted, tmp_path):
    qs = load_questions(planted["questions"])
    cases = {
        "unknown": ([{"question_id": 1, "answer": "x"}, {"question_id": 99, "answer": "y"}],
                    r"unknown.jsonl:2: field 'question_id': 1 answer\(s\) for questions not in the question file: '99'"),
        "dup": ([{"question_id": 1, "answer": "x"}, {"question_id": "1", "answer": "y"}],
                r"dup.jsonl:2: .*second answer for question 1 \(first on line 1\)"),
        "type": ([{"question_id": 1, "answer": 5}], r"type.jsonl:1: field 'answer': expected a string or a list"),
        "noid": ([{"answer": "x"}], r"noid.jsonl:1: field 'question_id': .*does not say which question"),
        "notext": ([{"question_id": 1, "text": "x"}], r"notext.jsonl:1: no answer text .*Fix: give the answer"),
        "turns": ([{"question_id": 2, "answer": ["a", "b"]}], r"turns.jsonl:1: .*2 answer turns for a question with 1"),
        "fastchat": ([{"question_id": 1, "choices": [{"turns": "x"}]}], r"field 'choices\[0\].turns'"),
    }
    for name, (rows, pattern) in cases.items():
        with pytest.raises(DataError, match=pattern):
            load_answers(write_jsonl(tmp_path / f"{name}.jsonl", rows), qs, allow_missing=True)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question_id": 1, "answer": "x"}\n{"question_id": 2, "answer": "y"\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        load_answers(bad, qs, allow_missing=True)


def test_bad_question_files(tmp_path):
    cases = {
        "dupq": ([{"question_id": 1, "turns": ["a"]}, {"question_id": 1, "turns": ["b"]}],
                 r"dupq.jsonl:2: .*duplicate question id 1 \(first on line 1\)"),
        "role": ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                 r"role.jsonl:1: field 'messages\[1\].role': role 'assistant' is not allowed"),
        "empty": ([{"question_id": 1, "turns": ["ok", ""]}], r"field 'turns\[1\]': expected a non-empty string"),
        "none": ([{"question_id": 1, "text": "?"}], r"no question text .*Fix: give \"turns\""),
    }
    for name, (rows, pattern) in cases.items():
        with pytest.raises(DataError, match=pattern):
            load_questions(write_jsonl(tmp_path / f"{name}.jsonl", rows))


def test_mt_bench_files_load(shared_data):
    qs = load_questions(shared_data / "mt_bench" / "question.jsonl")
    assert len(qs) == 80 and all(len(q.turns) == 2 for q in qs)
    assert sorted({q.category for q in qs}) == ["coding", "extraction", "humanities", "math", "reasoning",
                                                "roleplay", "stem", "writing"]
    refs = load_references(shared_data / "mt_bench" / "reference_answer_gpt4.jsonl", qs)
    cats = {q.category for q in qs if q.key in refs}
    assert len(refs) == 30 and cats == {"math", "reasoning", "coding"} and all(len(r) == 2 for r in refs.values())
    assert sum(q.reference is not None for q in qs) == 39  # the inline 'reference' field


# ------------------------------------------------------------------------------------------------- CLI

def _judge_args(planted, srv, out, *extra):
    return ["judge", "pairwise", "--questions", str(planted["questions"]), "--answers-a", str(planted["a"]),
            "--answers-b", str(planted["b"]), "--judge-url", srv.url, "--judge-model", "fake-judge",
            "--out", str(out), "--references", str(planted["refs"]), *extra]


def test_cli_pairwise_end_to_end_as_a_user(planted, tmp_path):
    out = tmp_path / "pair"
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with FakeOpenAI(fake_judge) as srv:
        proc = subprocess.run([sys.executable, "-m", "instructkit", *_judge_args(planted, srv, out)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert all(c.headers["authorization"] == f"Bearer {SECRET}" for c in srv.calls)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("pairwise: alpha (A) vs model-b (B), judge fake-judge")
    overall = next(ln for ln in lines if ln.startswith("overall"))
    assert overall.split() == ["overall", "6", "2", "2", "2", "1", "0.500", "0.167"]
    assert any(ln.startswith("math") and ln.split()[-2] == "0.750" for ln in lines)
    assert "1 judgment(s) had errors and are not counted above: 6:turn1" in proc.stdout
    assert "judged without reference" in proc.stdout and "5:turn1" in proc.stdout
    assert "judge: 14/14 requests done" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["win_rate"] == 0.5 and summary["judge"]["api_key_env"] == "OPENAI_API_KEY"
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 7 and all(j["judgment_ab"] is not None for j in judgments)
    for f in out.iterdir():  # the key is never written anywhere
        assert SECRET not in f.read_text()
    assert SECRET not in proc.stdout + proc.stderr


def test_cli_single_and_errors(planted, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with FakeOpenAI(fake_judge) as srv:
        code = main(["judge", "single", "--questions", str(planted["questions"]), "--answers",
                     str(planted["single"]), "--judge-url", srv.url, "--judge-model", "fake-judge",
                     "--out", str(tmp_path / "s"), "--limit", "3"])
        out = capsys.readouterr().out
        assert code == 0
        assert next(ln for ln in out.splitlines() if ln.startswith("overall")).split()[:3] == ["overall", "3", "7.83"]
        # missing answers: names the ids and the options
        part = write_jsonl(tmp_path / "part.jsonl", [{"question_id": 1, "answer": "quality 5"}])
        code = main(["judge", "single", "--questions", str(planted["questions"]), "--answers", str(part),
                     "--judge-url", srv.url, "--judge-model", "fake-judge", "--out", str(tmp_path / "m")])
        err = capsys.readouterr().err
        assert code == 2 and "no answer for 5 of 6 questions: 2, 3, 4, 5, 6" in err
        code = main(["judge", "single", "--questions", str(planted["questions"]), "--answers", str(part),
                     "--judge-url", srv.url, "--judge-model", "fake-judge", "--out", str(tmp_path / "m"),
                     "--allow-missing"])
        out = capsys.readouterr().out
        assert code == 0 and "5 questions without answers" in out
        code = main(["judge", "single", "--questions", str(planted["questions"]), "--answers",
                     str(planted["single"]), "--judge-url", srv.url, "--judge-model", "fake-judge",
                     "--out", str(tmp_path / "r"), "--references", "questions"])
        assert code == 0 and "judged without reference" in capsys.readouterr().out
        judged = [json.loads(x) for x in (tmp_path / "r" / "judgments.jsonl").read_text().splitlines()]
        q4 = next(j for j in judged if j["question_id"] == 4)
        assert q4["prompt"] == "single-ref" and "2+2 = 4" in q4["judge_prompt"]
        assert {j["prompt"] for j in judged if j["question_id"] != 4} <= {"single", "single-multi-turn"}
    with FakeOpenAI(lambda call: Reply(401, {"error": {"message": "bad key"}})) as srv:
        code = main(_judge_args(planted, srv, tmp_path / "x", "--api-key-env", "MY_JUDGE_KEY", "--no-cache"))
        err = capsys.readouterr().err
        assert code == 2 and "MY_JUDGE_KEY is not set" in err and len(srv.calls) <= 8  # no retries
    with FakeOpenAI(lambda call: Reply(404, {"error": {"message": "no such model"}}), models=("judge-x",)) as srv:
        code = main(_judge_args(planted, srv, tmp_path / "y", "--no-cache"))
        assert code == 2 and "the server offers: judge-x" in capsys.readouterr().err


def test_cli_answer_then_judge_mt_bench(tiny_model_dir, shared_data, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    q = shared_data / "mt_bench" / "question.jsonl"
    code = main(["answer", "--model", str(tiny_model_dir), "--questions", str(q), "--out", str(answers),
                 "--limit", "3", "--max-new-tokens", "6", "--model-id", "nano"])
    assert code == 0
    out = capsys.readouterr().out
    assert "answered 3 questions (6 turns) as 'nano'" in out
    recs = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [81, 82, 83]
    assert all(r["model_id"] == "nano" and len(r["choices"][0]["turns"]) == 2 for r in recs)
    with FakeOpenAI(lambda call: "Fine. [[4]]") as srv:
        code = main(["judge", "single", "--questions", str(q), "--answers", str(answers), "--limit", "3",
                     "--judge-url", srv.url, "--judge-model", "fake-judge", "--out", str(tmp_path / "j")])
        out = capsys.readouterr().out
        assert code == 0 and len(srv.calls) == 6
        # the second turn is judged on the whole conversation, with the model's own first reply
        turn2 = [c for c in srv.calls if "final message" in c.body["messages"][0]["content"]]
        assert len(turn2) == 3 and recs[0]["choices"][0]["turns"][0] in \
            next(c for c in turn2 if "Hawaii" in c.user_text).user_text
    assert next(ln for ln in out.splitlines() if ln.startswith("overall")).split()[:3] == ["overall", "6", "4.00"]
