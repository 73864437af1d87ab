"""Self-Instruct: ROUGE-L parity with rouge_score, parsing, every filter on planted candidates,
provenance, resume after an interruption, the HTTP path (malformed replies, retries, key secrecy),
the Alpaca variant and a run with a tiny local model through the CLI.

The fake generator is a pure function of the prompt: each instruction reply plants exactly one
candidate for every instruction filter plus three acceptable tasks (a generation task, a
classification task with too many instances, and a task whose instances conflict), so every count
in the summary is known in advance.
"""

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAI, Reply

from instructkit.data.errors import DataError
from instructkit.synth.generators import EndpointGenerator, FunctionGenerator, GenResult
from instructkit.synth.rouge import RougePool, lcs_length, rouge_l, rouge_tokens
from instructkit.synth.self_instruct import (SelfInstructConfig, SelfInstructError, filter_instances,
                                             instruction_filter, load_seed_tasks, parse_alpaca,
                                             parse_classification_answer, parse_instances, parse_instructions,
                                             format_summary, run_self_instruct)

SECRET = "sk-selfinstruct-SECRET-1234abcd"


@pytest.fixture(scope="module")
def seeds(shared_data) -> Path:
    return shared_data / "self_instruct" / "seed_tasks.jsonl"


# ---------------------------------------------------------------------------------------------- ROUGE-L


def test_lcs_and_rouge_closed_form():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook CLRS example
    assert lcs_length([], [1]) == 0
    # "the cat sat" vs "the cat ran": LCS 2, F = 2 * (2/3)(2/3) / (4/3) = 2/3
    assert rouge_l("The cat sat.", "the CAT ran") == pytest.approx(2 / 3)
    assert rouge_tokens("Don't stop-me, café!") == ["don", "t", "stop", "me", "caf"]
    assert rouge_l("", "anything") == 0.0
    long_a = " ".join(f"w{i}" for i in range(100))  # > 64 tokens: the Python-int path
    assert rouge_l(long_a, long_a) == 1.0


def test_pool_max_similarity_equals_rouge_score_on_every_pair(seeds):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    base = [json.loads(x)["instruction"] for x in seeds.read_text().splitlines()][:60]
    words = " ".join(base).split()
    rng = random.Random(1)
    pool, texts = RougePool(base, block=16), list(base)
    for _ in range(80):
        if rng.random() < 0.4:  # near copies, some right at the 0.7 boundary
            w = rng.choice(texts).split()
            for _ in range(rng.randint(0, 3)):
                w[rng.randrange(len(w))] = rng.choice(words)
            cand = " ".join(w)
        else:
            cand = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        got, idx = pool.max_similarity(cand)
        ref = [scorer.score(cand, t)["rougeL"].fmeasure for t in texts]
        assert got == max(ref)
        if max(ref) > 0:
            assert idx == ref.index(max(ref))  # ties go to the earliest entry
        pool.add(cand)
        texts.append(cand)


# ---------------------------------------------------------------------------------------------- parsing and filters


def test_parse_numbered_instructions_and_filters():
    text = " Give three tips for staying healthy.\n10. Hi there\n11.\n12. What is 2+2 in words?\n13) chat style item here"
    assert parse_instructions(text) == ["Give three tips for staying healthy.", "Hi there", "",
                                        "What is 2+2 in words?", "Chat style item here"]
    assert parse_instructions("9. Repeated number from a chat model\n10. next one") == [
        "Repeated number from a chat model", "Next one"]
    cases = {"": "empty", "Say hi now": "too_short", " ".join(["word"] * 151): "too_long",
             "Describe this image in detail please": "blacklist", "Go to the store and buy milk": "blacklist",
             "Describe the mapping between two sets": None,  # 'map' only as a whole word
             "Write a program that sorts a list": "write_a_program", "\"Quote\" the following famous sentence":
             "leading_punctuation", "Écris une phrase en français maintenant": "non_ascii_start",
             "Explain why the sky is blue": None}
    for inst, want in cases.items():
        assert instruction_filter(inst) == want, inst
    assert [parse_classification_answer(x) for x in (" Yes", "no.", "Maybe")] == [True, False, None]


def test_parse_instances_both_directions_and_instance_filters():
    gen = "Example 1\nInput: 3, 1, 2\nOutput: 1, 2, 3\nExample 2\nList: 9, 8\nOutput: 8, 9\nInput: stray"
    assert parse_instances(gen, classification=False) == [("3, 1, 2", "1, 2, 3"), ("List: 9, 8", "8, 9")]
    assert parse_instances("Output: just an answer", classification=False) == [("", "just an answer")]
    assert parse_instances("no structure at all", classification=False) == []
    clf = " Positive\nInput: I love it\nClass label: Negative\nInput: I hate it"
    assert parse_instances(clf, classification=True) == [("I love it", "Positive"), ("I hate it", "Negative")]

    rng = random.Random(0)
    pairs = [("a", "b"), ("c", "c"), ("d", ""), ("e:", "f"), ("a", "b"), ("g", "h"), ("last", "cut")]
    kept, removed = filter_instances(pairs, truncated=True, max_instances=5, rng=rng)
    assert kept == [("a", "b"), ("g", "h")]
    assert dict(removed) == {"truncated_last": 1, "input_equals_output": 1, "empty_output": 1,
                             "ends_with_colon": 1, "duplicate_in_task": 1}
    kept, removed = filter_instances([("x", "1"), ("x", "2"), ("y", "3")], False, 5, rng)
    assert kept == [] and removed["conflicting_outputs"] == 3
    kept, removed = filter_instances([(str(i), f"o{i}") for i in range(8)], False, 5, rng)
    assert len(kept) == 5 and removed["over_cap"] == 3


def test_alpaca_parsing():
    text = (" Name a fruit that is red and sweet.\n4. Input:\n<noinput>\n4. Output:\nA strawberry.\n###\n"
            "5. Instruction: Sort the numbers.\n5. Input:\n3 1 2\n5. Output:\n1 2 3\n###\n6. Instruction: broken")
    tasks, bad = parse_alpaca(text, 4)
    assert tasks == [{"instruction": "Name a fruit that is red and sweet.", "input": "", "output": "A strawberry."},
                     {"instruction": "Sort the numbers.", "input": "3 1 2", "output": "1 2 3"}]
    assert bad == 1


def test_seed_errors_name_line_and_field(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"id": "a", "instruction": "Do x", "instances": [{"input": "", "output": "y"}], '
                   '"is_classification": false}\n{"id": "b", "instruction": "Do y", "instances": "oops"}\n')
    with pytest.raises(DataError) as e:
        load_seed_tasks(bad)
    assert ":2:" in str(e.value) and "instances" in str(e.value) and "Fix:" in str(e.value)


# ---------------------------------------------------------------------------------------------- the fake generator


def _codes(prompt: str, n: int) -> list[str]:
    h = hashlib.sha256(prompt.encode()).hexdigest()
    return [f"z{h[i * 4:(i + 1) * 4]}q{i}" for i in range(n)]


def fake_reply(prompt: str) -> str:
    """Deterministic replies for the three kinds of Self-Instruct prompt (and the Alpaca one)."""
    if prompt.rstrip().endswith("Classification:"):
        task = prompt.rstrip().splitlines()[-2]
        return " Yes" if "Classify" in task else " No"
    if prompt.rstrip().endswith("Class label:"):
        c = _codes(prompt, 1)[0]
        labels = ["Positive", "Negative"] * 4
        return " " + "\nClass label: ".join(f"{lab}\nInput: review {i} {c}" for i, lab in enumerate(labels[:7]))
    if prompt.endswith("\n") and prompt.rstrip().splitlines()[-1].startswith("Task:"):
        c = _codes(prompt, 1)[0]
        if "Summarize" in prompt.rstrip().splitlines()[-1]:
            return f"Example 1\nInput: text {c}\nOutput: short\nExample 2\nInput: text {c}\nOutput: other"
        return (f"Example 1\nInput: alpha {c}\nOutput: beta {c}\nExample 2\nInput: same {c}\nOutput: same {c}\n"
                f"Example 3\nInput: gamma {c}\nOutput:\nExample 4\nInput: alpha {c}\nOutput: beta {c}\n"
                f"Example 5\nInput: delta {c}\nOutput: epsilon {c}")
    if "Instruction:" in prompt.splitlines()[-1]:  # alpaca
        c = _codes(prompt, 2)
        return (f" Describe {c[0]} for a new reader today.\n4. Input:\n<noinput>\n4. Output:\nIt is {c[0]}.\n###\n"
                f"5. Instruction: Fixed shared task text for everyone.\n5. Input:\nsame\n5. Output:\nsame out\n###\n"
                f"6. Instruction: Draw {c[1]} with a pen today.\n6. Input:\n<noinput>\n6. Output:\nok\n")
    c = _codes(prompt, 30)
    first_example = re.search(r"\n1\. (.*)\n", prompt).group(1)
    items = [f"Describe {c[0]} {c[1]} {c[2]} {c[3]} in plain words.",     # accepted (generation)
             f"Classify {c[4]} {c[5]} {c[6]} as positive or negative.",   # accepted (classification)
             f"Summarize {c[7]} {c[8]} {c[9]} {c[10]} for a friend.",     # accepted (conflicting instances)
             f"Hi {c[11]}",                                                # too_short
             " ".join(c[12:16]) + " " + " ".join(["more"] * 150),          # too_long
             f"Draw {c[16]} {c[17]} {c[18]} on a sheet.",                  # blacklist
             f"Write a program that {c[19]} {c[20]} forever.",             # write_a_program
             f"\"{c[21]} {c[22]} {c[23]}\" means what here?",              # leading_punctuation
             f"\u00dcber {c[24]} {c[25]} {c[26]} deeply now.",            # non_ascii_start
             first_example,                                                # rouge_similar (a prompt example)
             ""]                                                           # empty
    return " " + "\n".join(f"{i}. {x}" if i > 9 else x for i, x in enumerate(items, 9))


PLANTED = {"empty": 1, "too_short": 1, "too_long": 1, "blacklist": 1, "write_a_program": 1,
           "leading_punctuation": 1, "non_ascii_start": 1, "rouge_similar": 1}


def function_generator(calls=None, fail_after=None):
    def fn(request, sampling):
        if calls is not None:
            calls.append(request)
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt("simulated interruption")
        return GenResult(fake_reply(request), "stop")
    return FunctionGenerator(fn, name="fake-fn")


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pipeline_counts_every_filter_and_writes_provenance(seeds, tmp_path):
    out = tmp_path / "si.jsonl"
    cfg = SelfInstructConfig(num=9, seed=3, request_batch_size=2)
    s = run_self_instruct(seeds, function_generator(), out, cfg, log=lambda m: None)
    # Each round sends 2 instruction prompts; every reply holds 3 acceptable tasks and one candidate for
    # each filter. Round 0 accepts 6, round 1 the 3 still needed (the second reply's 3: target_reached).
    assert s["status"] == "completed" and s["instructions"] == 9 and s["rounds"] == 2
    assert s["requests"]["sent"] == (2 + 6 + 6) + (2 + 3 + 3)  # instructions + classify + instances
    assert s["candidates"] == 4 * 11 and s["instructions_accepted"] == 9
    assert s["instruction_filters"] == {**{k: 4 * v for k, v in PLANTED.items()}, "target_reached": 3}
    assert s["classification"] == {"yes": 3, "no": 6, "unparsed": 0}
    # 3 describe tasks (5 instances: 1 empty output, 1 input == output, 1 duplicate), 3 classify tasks
    # (7 instances, cap 5), 3 summarize tasks (2 instances with one input and two outputs)
    assert s["instances_parsed"] == 3 * 5 + 3 * 7 + 3 * 2
    assert s["instance_filters"] == {"truncated_last": 0, "empty_output": 3, "input_equals_output": 3,
                                     "ends_with_colon": 0, "conflicting_outputs": 6, "duplicate_in_task": 3,
                                     "over_cap": 6, "duplicate_final": 0}
    assert s["tasks_without_instances"] == 3
    recs = _lines(out)
    assert len(recs) == s["records"] == 3 * 2 + 3 * 5
    assert json.loads(Path(str(out) + ".summary.json").read_text()) == s
    by_id = {}
    for r in recs:
        by_id.setdefault(r["id"], []).append(r)
        p = r["provenance"]
        assert p["generator"]["name"] == "fake-fn" and p["variant"] == "self-instruct"
        assert len(p["prompt_seed_ids"]) + len(p["prompt_machine_ids"]) == 8
        assert len(p["prompt_machine_ids"]) == (0 if p["round"] == 0 else 2)
        assert 0 < p["max_rouge_l"] <= 0.7 and p["most_similar"] and p["most_similar_id"]
        assert r["is_classification"] == r["instruction"].startswith("Classify")
    assert all(len(v) == (5 if v[0]["is_classification"] else 2) for v in by_id.values())
    # every removed candidate is listed with its reason; similar ones name what they were similar to
    rejected = _lines(Path(str(out) + ".rejected.jsonl"))
    reasons = [r["reason"] for r in rejected]
    assert reasons.count("rouge_similar") == 4 and reasons.count("no_instance_left") == 3
    assert all(r["max_rouge_l"] == 1.0 for r in rejected if r["reason"] == "rouge_similar")
    # a rerun of a finished run adds nothing
    again = run_self_instruct(seeds, function_generator(), out, cfg, log=lambda m: None)
    assert again["records"] == len(recs) and _lines(out) == recs


def test_interrupted_run_resumes_without_duplicates(seeds, tmp_path):
    cfg = SelfInstructConfig(num=15, seed=5, request_batch_size=2)
    ref = tmp_path / "ref.jsonl"
    run_self_instruct(seeds, function_generator(), ref, cfg, log=lambda m: None)
    out = tmp_path / "si.jsonl"
    calls: list = []
    with pytest.raises(KeyboardInterrupt):  # stops mid-way through round 1's instance requests
        run_self_instruct(seeds, function_generator(calls, fail_after=14 + 2 + 6 + 3), out, cfg, log=lambda m: None)
    first = _lines(out)
    assert 0 < len(first) < len(_lines(ref))
    with open(out, "a") as f:  # a kill can also leave half a line behind
        f.write('{"instruction": "half a li')
    logs = []
    s = run_self_instruct(seeds, function_generator(), out, cfg, log=logs.append)
    assert any("resuming" in m for m in logs)
    recs = _lines(out)
    keys = [(r["instruction"], r["input"], r["output"]) for r in recs]
    assert len(keys) == len(set(keys)) == s["records"]
    assert recs[:len(first)] == first
    # deterministic generator + per-round seeds: the resumed run equals an uninterrupted one
    assert recs == _lines(ref)
    assert s == {**json.loads(Path(str(ref) + ".summary.json").read_text()), "out": str(out),
                 "files": s["files"]}
    # more instructions later: the same command with a larger --num continues the same file
    more = run_self_instruct(seeds, function_generator(), out, SelfInstructConfig(num=21, seed=5, request_batch_size=2),
                             log=lambda m: None)
    assert more["instructions"] == 21 and _lines(out)[:len(recs)] == recs
    with pytest.raises(SelfInstructError, match="different arguments"):
        run_self_instruct(seeds, function_generator(), out, SelfInstructConfig(num=21, seed=6, request_batch_size=2),
                          log=lambda m: None)


def test_truncated_replies_are_dropped_or_cut(seeds, tmp_path):
    def fn(request, sampling):
        res = GenResult(fake_reply(request), "stop")
        if "numbered list" in request:
            res.finish_reason = "length"
        return res
    cfg = SelfInstructConfig(num=3, seed=0, request_batch_size=2, patience=2)
    s = run_self_instruct(seeds, FunctionGenerator(fn), tmp_path / "a.jsonl", cfg, log=lambda m: None)
    assert s["status"] == "stalled" and s["instructions"] == 0 and s["rounds"] == 2
    assert s["requests"]["truncated_responses_dropped"] == 4 and s["requests"]["truncated_items_dropped"] == 44
    cfg = SelfInstructConfig(num=3, seed=0, request_batch_size=2, keep_truncated=True)
    s = run_self_instruct(seeds, FunctionGenerator(fn), tmp_path / "b.jsonl", cfg, log=lambda m: None)
    assert s["status"] == "completed" and s["requests"]["truncated_items_dropped"] == 2
    assert s["instruction_filters"]["empty"] == 0  # the empty last item was the one cut


def test_alpaca_variant_one_instance_each_and_final_dedup(seeds, tmp_path):
    cfg = SelfInstructConfig(num=4, variant="alpaca", seed=0, request_batch_size=3, similarity_threshold=1.0)
    s = run_self_instruct(seeds, function_generator(), tmp_path / "a.jsonl", cfg, log=lambda m: None)
    recs = _lines(tmp_path / "a.jsonl")
    # 3 replies, each: a unique task, a task every reply shares (the ROUGE threshold of 1.0 lets the
    # repeat into the pool; the final dedup removes its record), a blacklisted task. Reply 2 reaches 4.
    assert s["instructions"] == 4 and s["instruction_filters"]["blacklist"] == 3
    assert s["instruction_filters"]["target_reached"] == 2
    assert s["instance_filters"]["duplicate_final"] == 1 and len(recs) == 3
    assert all(len(r["provenance"]["prompt_seed_ids"]) == 3 and r["is_classification"] is None for r in recs)
    assert "classification" not in format_summary(s)


# ---------------------------------------------------------------------------------------------- HTTP


def test_http_generator_retries_counts_malformed_and_never_leaks_the_key(seeds, tmp_path, monkeypatch):
    monkeypatch.setenv("SI_KEY", SECRET)
    seen = {"n": 0}

    def respond(call):
        assert call.headers["authorization"] == f"Bearer {SECRET}"
        seen["n"] += 1
        text = call.body["messages"][-1]["content"]
        if seen["n"] == 1:
            return Reply(status=429, body={"error": {"message": f"slow down {SECRET}"}},
                         headers={"Retry-After": "0"})
        if seen["n"] == 2:
            return Reply(status=200, body="<html>not json</html>")  # malformed: counted as a failed request
        if seen["n"] == 3:
            return "I'm sorry, I can't help with that."  # no numbered list: one junk candidate
        return fake_reply(text)

    with FakeOpenAI(respond) as server:
        gen = EndpointGenerator(server.url, "fake", api_key_env="SI_KEY", max_retries=2, concurrency=2)
        gen.client.backoff_base = 0.0
        out = tmp_path / "http.jsonl"
        s = run_self_instruct(seeds, gen, out, SelfInstructConfig(num=6, seed=1, request_batch_size=3),
                              log=lambda m: None)
    assert s["status"] == "completed" and s["requests"]["failed_after_retries"] == 1
    assert s["generator"]["api_key_env"] == "SI_KEY" and s["generator"]["api_key_set"] is True
    assert all(c.body["model"] == "fake" for c in server.calls)
    for f in tmp_path.iterdir():
        assert SECRET not in f.read_text(), f


def test_cli_auth_failure_is_clear_and_keyless(seeds, tmp_path, monkeypatch):
    monkeypatch.setenv("SI_KEY", SECRET)
    with FakeOpenAI(lambda call: Reply(status=401, body={"error": {"message": f"bad key {SECRET}"}})) as server:
        proc = subprocess.run([sys.executable, "-m", "instructkit", "synth", "self-instruct", "--seeds", str(seeds),
                               "--generator", server.url, "--model-name", "fake", "--api-key-env", "SI_KEY",
                               "--num", "3", "--out", str(tmp_path / "o.jsonl")],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "SI_KEY" in proc.stderr and "authentication" in proc.stderr.lower()
    assert SECRET not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------------------------- tiny local model


@pytest.mark.slow
def test_cli_with_tiny_local_model(seeds, tiny_model_dir, tmp_path):
    out = tmp_path / "tiny.jsonl"
    cmd = [sys.executable, "-m", "instructkit", "synth", "self-instruct", "--seeds", str(seeds),
           "--generator", str(tiny_model_dir), "--num", "4", "--out", str(out), "--request-batch-size", "2",
           "--max-rounds", "2", "--max-tokens", "24", "--keep-truncated"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(Path(str(out) + ".summary.json").read_text())
    assert s["rounds"] == 2 and s["requests"]["sent"] >= 4 and s["generator"]["kind"] == "local"
    assert s["candidates"] == sum(s["instruction_filters"].values()) + s["instructions_accepted"]
    # a random model rarely ends a numbered item: its cut-off items are counted, never silently lost
    assert s["candidates"] + s["requests"]["truncated_items_dropped"] > 0
    assert "removed by filter" in proc.stdout and "instructions" in proc.stdout
    # records (if the random model produced any usable task) are valid Alpaca-format training data
    for r in _lines(out):
        assert set(r) >= {"instruction", "input", "output", "provenance"}


def test_completions_api_sends_raw_prompts(seeds, tmp_path):
    def respond(call):
        assert call.path.endswith("/completions") and not call.path.endswith("/chat/completions")
        return Reply(body={"choices": [{"text": fake_reply(call.body["prompt"]), "finish_reason": "stop"}]})

    with FakeOpenAI(respond) as server:
        gen = EndpointGenerator(server.url, "fake", api="completions", api_key_env="UNSET_KEY_VAR")
        s = run_self_instruct(seeds, gen, tmp_path / "c.jsonl", SelfInstructConfig(num=3, request_batch_size=1),
                              log=lambda m: None)
    assert s["instructions"] == 3 and s["instruction_filters"]["rouge_similar"] == 1
    assert all("authorization" not in c.headers for c in server.calls)  # no key set: no header
