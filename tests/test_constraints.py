"""`instructkit synth constraints` (IFEval-style prompts), the ifeval scorer and selection of best-of-n,
and prompt-only decontamination."""

import json
import random
from itertools import combinations

import pytest

from instructkit.evaluate.ifeval.scoring import parse_record, score_prompt
from instructkit.synth.constraints import (ALL_IDS, MAKERS, TASKS, Context, compatible, generate_constraint_prompts,
                                           write_constraint_prompts)


@pytest.fixture(scope="module")
def records():
    return generate_constraint_prompts(2000, seed=0)


def test_deterministic_and_distinct(records):
    again = generate_constraint_prompts(2000, seed=0)
    assert again == records
    assert generate_constraint_prompts(50, seed=1) != records[:50]
    assert len({r["prompt"] for r in records}) == len(records)
    assert [r["key"] for r in records] == list(range(len(records)))


def test_records_parse_and_cover_every_id(records):
    assert len(TASKS) >= 80
    seen = set()
    for r in records:
        rec = parse_record(r)  # kwargs pass bind()
        assert rec.instruction_ids == r["instruction_id_list"]
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}]
        assert r["source"] == "instructkit-constraints" and r["task"] in {t.id for t in TASKS}
        assert 1 <= len(r["instruction_id_list"]) <= 3
        seen.update(r["instruction_id_list"])
    assert seen == set(ALL_IDS)
    assert "language:response_language" not in seen and len(seen) == 24
    sizes = [len(r["instruction_id_list"]) for r in records]
    assert sizes.count(1) + sizes.count(2) > 0.75 * len(sizes)  # mostly one or two constraints


def test_no_incompatible_combinations(records):
    yes_no = {t.id for t in TASKS if t.yes_no}
    for r in records:
        ids = r["instruction_id_list"]
        assert all(compatible(a, b) for a, b in combinations(ids, 2)), ids
        if "detectable_format:constrained_response" in ids:
            assert r["task"] in yes_no
    for a, b in [("change_case:english_lowercase", "change_case:english_capital"),
                 ("detectable_format:json_format", "detectable_format:number_bullet_lists"),
                 ("combination:two_responses", "startend:end_checker")]:
        assert not compatible(a, b) and not compatible(b, a)


def test_prompt_states_the_arguments(records):
    """Every argument the checker uses is written in the prompt, so the verdict matches what was asked."""
    for r in records:
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            for name, v in kw.items():
                values = v if isinstance(v, list) else [v]
                for x in values:
                    if name == "relation" or name.endswith("_relation"):
                        said = ("fewer than", "or more") if x == "less than" else ("at least", "or more")
                        assert any(w in r["prompt"].lower() for w in said), (iid, r)
                    elif name != "nth_paragraph":
                        assert str(x) in r["prompt"], (iid, name, x, r["prompt"])


def _compliant(iid: str, kw: dict, request: str) -> str:
    """A reply hand-written to follow one instruction with the given arguments."""
    n = next((v for k, v in kw.items() if isinstance(v, int)), 1)
    if iid == "change_case:capital_word_frequency":
        return ("LOOK HERE NOW PLEASE friend." if kw["capital_relation"] == "at least" else "plain words only.")
    if iid == "length_constraints:number_words":
        return "short answer here." if kw["relation"] == "less than" else " ".join(["word"] * n)
    if iid == "length_constraints:number_sentences":
        return "One sentence here." if kw["relation"] == "less than" else "This is a sentence. " * n
    if iid == "length_constraints:nth_paragraph_first_word":
        paras = ["Some text here."] * kw["num_paragraphs"]
        paras[kw["nth_paragraph"] - 1] = f"{kw['first_word'].capitalize()}, this paragraph starts right."
        return "\n\n".join(paras)
    if iid == "keywords:letter_frequency":
        return (kw["letter"] + " ") * n if kw["let_relation"] == "at least" else "hello"
    fixed = {
        "change_case:english_lowercase": "this is a short answer about the weather today.",
        "change_case:english_capital": "THIS IS A SHORT ANSWER ABOUT THE WEATHER TODAY.",
        "punctuation:no_comma": "No commas here at all.",
        "length_constraints:number_paragraphs": "\n***\n".join(["A paragraph."] * kw.get("num_paragraphs", 1)),
        "keywords:existence": "Here: " + " ".join(kw.get("keywords", [])),
        "keywords:forbidden_words": "Nothing bad here.",
        "keywords:frequency": (kw.get("keyword", "") + " ") * 3,
        "detectable_format:number_bullet_lists": "\n".join(["* an item"] * n),
        "detectable_format:number_highlighted_sections": " and ".join(["*a part*"] * n),
        "detectable_format:multiple_sections": "\n".join(f"{kw.get('section_spliter')} {i}\ntext"
                                                         for i in range(1, kw.get("num_sections", 1) + 1)),
        "detectable_format:json_format": '```json\n{"answer": "ok"}\n```',
        "detectable_format:title": "<<A Title>>\nThe body.",
        "detectable_format:constrained_response": "My answer is yes.",
        "startend:end_checker": f"Sure thing. {kw.get('end_phrase')}",
        "startend:quotation": '"Hello there."',
        "combination:repeat_prompt": f"{request} Here is my answer.",
        "combination:two_responses": "First answer.\n******\nSecond answer.",
        "detectable_content:number_placeholders": " ".join(["[blank]"] * n),
        "detectable_content:postscript": f"The answer.\n\n{kw.get('postscript_marker')} one more thing.",
    }
    return fixed[iid]


@pytest.mark.parametrize("iid", ALL_IDS)
def test_compliant_reply_passes_and_plain_reply_fails(iid):
    for seed in range(6):  # several argument draws and phrasings per id
        request = "Write a short note about tea."
        kw, sentence = MAKERS[iid](Context(random.Random(seed), request, ["cup", "leaves", "steep"]))
        rec = parse_record({"prompt": f"{request} {sentence}", "instruction_id_list": [iid], "kwargs": [kw]})
        assert score_prompt(rec, _compliant(iid, kw, request)).follow_all_instructions_strict, (iid, kw)
    if iid not in ("keywords:forbidden_words", "change_case:capital_word_frequency", "keywords:letter_frequency",
                   "length_constraints:number_words", "length_constraints:number_sentences"):
        assert not score_prompt(rec, "Sure, a bit of text, Here!").follow_all_instructions_strict, iid


def test_combined_compliant_replies_pass(records):
    """Records whose constraints are all of a composable kind get a reply built from all of them."""
    simple = {"punctuation:no_comma", "startend:end_checker", "detectable_content:postscript", "keywords:existence",
              "detectable_format:title", "detectable_content:number_placeholders"}
    checked = 0
    for r in records:
        ids = r["instruction_id_list"]
        if len(ids) < 2 or not set(ids) <= simple:
            continue
        kw = {i: k for i, k in zip(ids, r["kwargs"])}
        parts = ["<<Notes>>"] if "detectable_format:title" in kw else []
        parts.append("Here: " + " ".join(kw.get("keywords:existence", {}).get("keywords", [])) + " [a] [b] [c].")
        if "detectable_content:postscript" in kw:
            parts.append(kw["detectable_content:postscript"]["postscript_marker"] + " see you soon.")
        if "startend:end_checker" in kw:
            parts.append(kw["startend:end_checker"]["end_phrase"])
        assert score_prompt(parse_record(r), "\n".join(parts)).follow_all_instructions_strict, r
        checked += 1
    assert checked >= 10


def test_write_and_cli(tmp_path):
    from instructkit.cli import main

    s = write_constraint_prompts(tmp_path / "c.jsonl", 40, seed=2)
    assert s["records"] == 40 and sum(s["constraints_per_prompt"].values()) == 40
    assert main(["synth", "constraints", "--out", str(tmp_path / "d.jsonl"), "--n", "40", "--seed", "2"]) == 0
    assert (tmp_path / "c.jsonl").read_text() == (tmp_path / "d.jsonl").read_text()


# ------------------------------------------------------------------------------------ best-of-n


def _prompt_file(tmp_path, recs):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return p


RECS = [
    {"key": 0, "prompt": "Tell a joke. Use no commas and end with: Bye now.",
     "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"], "kwargs": [{}, {"end_phrase": "Bye now."}]},
    {"key": 1, "prompt": "Describe tea in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Describe coffee in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
     "kwargs": [{}]},
]


def test_ifeval_scorer_and_selection(tmp_path):
    from instructkit.synth.best_of_n import function_scorer, read_prompts, select

    records = read_prompts(_prompt_file(tmp_path, RECS))
    score, name = function_scorer("ifeval")
    assert name == "ifeval"
    assert score([records[0]] * 3, ["A joke, ha. Bye now.", "A joke ha. Bye now.", "A joke, ha."]) == [0.5, 1.0, 0.0]
    # a cut-off sample never wins with require_stop, and ranks as the worst
    assert select([1.0, 0.5], ["a", "b"], ["length", "stop"], require_stop=True) == (1, 0)
    assert select([1.0, 0.5], ["a", "b"], ["length", "stop"]) == (0, 1)
    assert select([1.0], ["a"], ["length"], require_stop=True)[0] is None
    assert select([1.0, 1.0, 1.0], ["long one", "s", "mid"], ["stop"] * 3) == (0, 0)
    assert select([1.0, 1.0, 1.0], ["long one", "s", "mid"], ["stop"] * 3, prefer="shortest")[0] == 1


def test_rejection_sampling_keeps_verified_and_counts_skips(tmp_path):
    from instructkit.generate import SamplingConfig
    from instructkit.synth.best_of_n import format_summary, ifeval_scorer, read_prompts, write_best_of_n

    records = read_prompts(_prompt_file(tmp_path, RECS))
    texts = ["A joke, ha. Bye now.", "A joke ha. Bye now.",  # prompt 0: the second is verified
             "Tea is Warm.", "TEA.",                          # prompt 1: nothing verified
             "tea is warm.", "Coffee."]                       # prompt 2: verified but cut off
    finish = ["stop", "stop", "stop", "stop", "length", "stop"]
    scorer, name = ifeval_scorer()
    s = write_best_of_n(records, texts, finish, scorer, name, tmp_path / "out", n=2,
                        sampling=SamplingConfig(max_new_tokens=8), min_score=1.0, require_stop=True,
                        tokens_generated=42)
    best = [json.loads(line) for line in (tmp_path / "out/best.jsonl").read_text().splitlines()]
    assert len(best) == 1 and best[0]["messages"][-1] == {"role": "assistant", "content": "A joke ha. Bye now."}
    assert best[0]["messages"][0]["role"] == "user" and best[0]["instruction_id_list"] == RECS[0]["instruction_id_list"]
    assert s["best_written"] == 1 and s["skipped"] == {"no_stopped_sample": 0, "below_min_score": 2}
    assert s["samples_cut_off"] == 1 and s["tokens_generated"] == 42
    low = s["per_instruction"]["change_case:english_lowercase"]
    assert (low["prompts"], low["prompts_verified"], low["acceptance_rate"]) == (2, 0, 0.0)
    assert s["per_instruction"]["punctuation:no_comma"]["acceptance_rate"] == 1.0
    pairs = [json.loads(line) for line in (tmp_path / "out/pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 1 and pairs[0]["chosen"] == "A joke ha. Bye now."
    assert json.loads((tmp_path / "out/summary.json").read_text())["best_written"] == 1
    assert "below --min-score" in format_summary(s, tmp_path / "out")
    # without require_stop the cut-off verified sample of prompt 2 would be kept
    s2 = write_best_of_n(records, texts, finish, scorer, name, tmp_path / "out2", n=2,
                         sampling=SamplingConfig(max_new_tokens=8), min_score=1.0)
    assert s2["best_written"] == 2


def test_best_of_n_with_a_tiny_policy(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.generate import SamplingConfig
    from instructkit.synth.best_of_n import best_of_n, ifeval_scorer, read_prompts

    write_constraint_prompts(tmp_path / "c.jsonl", 3, seed=0)
    records = read_prompts(tmp_path / "c.jsonl")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    scorer, name = ifeval_scorer()
    s = best_of_n(model, tok, records, scorer, name, tmp_path / "bon", n=2, min_score=1.0, require_stop=True,
                  sampling=SamplingConfig(temperature=1.0, max_new_tokens=6, seed=0))
    assert s["best_written"] + sum(s["skipped"].values()) == 3
    assert 0 < s["tokens_generated"] <= 3 * 2 * 6
    assert set(s["per_instruction"]) == {i for r in records for i in r["instruction_id_list"]}
    kept = (tmp_path / "bon/best.jsonl").read_text().splitlines()
    assert all(json.loads(line)["best_score"] == 1.0 for line in kept)


# -------------------------------------------------------------------------------- decontamination


def test_decontaminate_prompt_only_records(tmp_path):
    from instructkit.curate.decontam import decontaminate_file

    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"key": 1, "prompt": "Write a limerick about a frog who learns to juggle plates at "
                              "the county fair, and do not use any commas in your entire response.",
                              "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    train = _prompt_file(tmp_path, [
        {"prompt": "Write a limerick about a frog who learns to juggle plates at the county fair, and do not use "
                   "any commas in your entire response.", "instruction_id_list": [], "kwargs": []},
        *generate_constraint_prompts(5, seed=0), {"other": "no prompt"}])
    res = decontaminate_file(train, [ev], tmp_path / "clean.jsonl", format="prompts")
    assert (res.removed, res.kept, res.skipped, res.seen) == (1, 5, 1, 7)
    kept = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert all(r["source"] == "instructkit-constraints" for r in kept)
