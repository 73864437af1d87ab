"""IFEval-compatible checks: every instruction type strict and loose, reference edge cases, the four
metrics on a hand-scored set, offline NLTK-identical splitting, seeded language detection, bad
input, and the CLI end to end (scoring a responses file and generating with a tiny model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.data.errors import DataError
from instructkit.evaluate.ifeval import (INSTRUCTIONS, load_prompts, loose_variants, parse_record, score_prompt,
                                         score_responses)
from instructkit.evaluate.ifeval import text

REPO = Path(__file__).resolve().parents[1]


def judge(iid: str, kwargs: dict, response: str) -> tuple[bool, bool]:
    rec = parse_record({"prompt": "p", "instruction_id_list": [iid], "kwargs": [kwargs]})
    res = score_prompt(rec, response)
    return res.follow_instruction_list_strict[0], res.follow_instruction_list_loose[0]


KF = {"keyword": "tea", "frequency": 2, "relation": "at least"}
KF_LT = {"keyword": "tea", "frequency": 2, "relation": "less than"}
NTH = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Elm"}
NTH1 = {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "elm"}
SEC = {"section_spliter": "Section", "num_sections": 2}
END = {"end_phrase": "Any other questions?"}
HELLO_EN = "hello there my friend, how are you doing today?"
BONJOUR = "Bonjour, je suis très content de vous voir."

# (instruction id, kwargs, response, strict, loose). Every id has a strict pass and a strict fail;
# (False, True) rows are loose-only passes; (False, False) rows show what loose cannot rescue.
CASES = [
    ("keywords:existence", {"keywords": ["cat", "Dog"]}, "A cat and a dog.", True, True),
    ("keywords:existence", {"keywords": ["cat", "Dog"]}, "The CONCATENATED dogma", True, True),  # substrings count
    ("keywords:existence", {"keywords": ["cat", "Dog"]}, "A cat only.", False, False),
    ("keywords:existence", {"keywords": ["cat", "Dog"]}, "A c*at and a dog.", False, True),
    ("keywords:frequency", KF, "Tea time: I like tea.", True, True),
    ("keywords:frequency", KF, "steam from the teapot", True, True),  # inside words too
    ("keywords:frequency", KF, "one tea", False, False),
    ("keywords:frequency", KF_LT, "Tea, please.", True, True),
    ("keywords:frequency", KF_LT, "Tea tea tea, here you go:\nJust one tea.", False, True),
    ("keywords:forbidden_words", {"forbidden_words": ["dead", "night"]}, "The deadline is tonight.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["dead", "night"]}, "He is DEAD.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["dead", "night"]}, "Night mode on:\nThe answer is 4.",
     False, True),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": "at least"}, "EeE", True, True),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": "at least"}, "hello",
     False, False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "#one #two",
     True, True),  # counted literally, as the current reference does (input_data key 1122)
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "#one",
     False, False),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 2, "let_relation": "less than"},
     "Zzz, here:\nfine", False, True),
    ("language:response_language", {"language": "fr"}, BONJOUR, True, True),
    ("language:response_language", {"language": "fr"}, "Hello there, I am very happy to see you.", False, False),
    ("language:response_language", {"language": "fr"}, "1234 !!!", True, True),  # undetectable passes
    ("language:response_language", {"language": "fr"},
     "Sure, here is my answer written in French as you asked me to do today:\nBonjour, je suis content.",
     False, True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "Dr. Smith went home.", True, True),  # an abbreviation does not end a sentence
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "One. Two. Three.", False, False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "Sure. Here it is.\nMr. Smith arrived.", False, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Mr. Smith and Johann S. Bach met. And then they left. i is a name.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.\n***", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n******\nSecond.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Only one paragraph.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Here:\n***\nA\n***\nB", False, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "don't state-of-the-art",
     True, True),  # \w+ runs: don, t, state, of, the, art
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "café au lait", False, False),
    ("length_constraints:number_words", {"num_words": 4, "relation": "less than"},
     "Sure, here you go:\nShort answer.", False, True),
    ("length_constraints:nth_paragraph_first_word", NTH, 'Trees are nice.\n\n"Elm," he said.', True, True),
    ("length_constraints:nth_paragraph_first_word", NTH, "Trees are nice.\n\nOak is better.", False, False),
    ("length_constraints:nth_paragraph_first_word", NTH, "Trees.\n\n\n\nElm trees.", False, False),  # blank piece
    ("length_constraints:nth_paragraph_first_word", NTH, "Sure:\n\nTrees are nice.\n\nElm is best.", False, True),
    # strict: the blank piece before the first "\n\n" is paragraph 1; loose drops the first line
    ("length_constraints:nth_paragraph_first_word", NTH1, "\n\nElm is here.\n\nSecond.", False, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[] and [x]", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[multi\nline] and [x]", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP.S. see you", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye. p. s. later", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye. PS later", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP.*S.* later", False, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "P.P.S. one more", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "P.S. only", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "- one\n  * two\n**Bold** line", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "---\n* one", True, True),  # a rule is a dash
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one", False, False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "My answer is Yes.", False, False),
    ("detectable_format:constrained_response", {}, "My answer is *yes*.", False, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** and *it*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**only bold**", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "* * and *one*", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one\ntwo* *three*", False, False),
    ("detectable_format:multiple_sections", SEC, "Section 1\nIntro\nSection 2\nBody", True, True),
    ("detectable_format:multiple_sections", SEC, "Section 1 and Section 2 inline", True, True),
    ("detectable_format:multiple_sections", SEC, "SECTION 1\nIntro\nSECTION 2\nBody", False, False),
    ("detectable_format:multiple_sections", SEC, "Section *1*\nA\nSection *2*\nB", False, True),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True),
    ("detectable_format:json_format", {}, '{"a": 1}', True, True),
    ("detectable_format:json_format", {}, "42", True, True),  # any JSON value
    ("detectable_format:json_format", {}, '{"a": 1,}', False, False),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ("detectable_format:json_format", {}, '```python\n{"a": 1}\n```', False, True),  # first line dropped
    ("detectable_format:title", {}, "<<My Title>>\nbody", True, True),
    ("detectable_format:title", {}, "<< >> body", False, False),
    ("detectable_format:title", {}, "<<split\ntitle>>", False, False),
    ("detectable_format:title", {}, "<*<Title>*>", False, True),
    ("combination:two_responses", {}, "Answer A\n******\nAnswer B", True, True),
    ("combination:two_responses", {}, "******\nA\n******\nB\n******", True, True),
    ("combination:two_responses", {}, "Same\n******\nSame", False, False),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", False, False),
    ("combination:two_responses", {}, "A\n******\nB\n******\nC", False, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a POEM. Roses are red.", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure! Write a poem. Roses", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure!\nWrite a poem.\nRoses.", False, True),
    ("startend:end_checker", END, "Hi.\nAny other questions?", True, True),
    ("startend:end_checker", END, '"Hi. any other questions?"', True, True),
    ("startend:end_checker", END, "Any other questions? Thanks.", False, False),
    ("startend:end_checker", END, "Hi. Any other questions?\nThanks!", False, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": "at least"},
     "I DON'T KNOW", True, True),  # I, DO, N'T, KNOW
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": "at least"},
     "NASA and the USA", False, False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "OK then.", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "WOW WOW:\nok then", False, True),
    ("change_case:english_capital", {}, HELLO_EN.upper(), True, True),
    ("change_case:english_capital", {}, "Hello there my friend", False, False),
    ("change_case:english_capital", {}, BONJOUR.upper(), False, False),  # upper case but not English
    ("change_case:english_capital", {}, "Sure!\n" + HELLO_EN.upper(), False, True),
    ("change_case:english_lowercase", {}, HELLO_EN, True, True),
    ("change_case:english_lowercase", {}, "Hello there", False, False),
    ("change_case:english_lowercase", {}, BONJOUR.lower(), False, False),
    ("change_case:english_lowercase", {}, "Here:\n" + HELLO_EN, False, True),
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "A，B", True, True),  # only the ASCII comma counts
    ("punctuation:no_comma", {}, "A, B", False, False),
    ("punctuation:no_comma", {}, "Sure, here:\nNo commas here", False, True),
    ("punctuation:no_comma", {}, "   \n", False, False),  # a blank response follows nothing
    ("startend:quotation", {}, '"Hello"', True, True),
    ("startend:quotation", {}, '  "Hello"\n', True, True),
    ("startend:quotation", {}, '"', False, False),
    ("startend:quotation", {}, "Hello", False, False),
    ("startend:quotation", {}, 'Sure:\n"Hello"', False, True),
]


@pytest.mark.parametrize("iid,kwargs,response,strict,loose", CASES,
                         ids=[f"{c[0].split(':')[1]}-{i}" for i, c in enumerate(CASES)])
def test_instruction_cases(iid, kwargs, response, strict, loose):
    assert judge(iid, kwargs, response) == (strict, loose)


def test_every_instruction_type_has_pass_and_fail_cases(shared_data):
    ids = (shared_data / "ifeval" / "INSTRUCTION_IDS.txt").read_text().split()
    assert len(ids) == 25 and set(ids) == set(INSTRUCTIONS)
    for iid in ids:
        outcomes = {(s, lo) for i, _, _, s, lo in CASES if i == iid}
        assert (True, True) in outcomes and ((False, False) in outcomes or (False, True) in outcomes), iid
    loose_only = {i for i, _, _, s, lo in CASES if not s and lo}
    # Loose can never rescue "at least N placeholders/highlights": removing lines or asterisks only
    # removes matches. Every other type has a loose-only pass.
    assert set(ids) - loose_only == {"detectable_content:number_placeholders",
                                     "detectable_format:number_highlighted_sections"}


def test_blank_response_follows_nothing_strict_or_loose():
    for iid, itype in INSTRUCTIONS.items():
        kwargs = next(k for i, k, *_ in CASES if i == iid)
        assert judge(iid, kwargs, "") == (False, False), iid
        assert judge(iid, kwargs, " \n\t") == (False, False), iid


def test_loose_variants_match_the_reference_recipe():
    v = loose_variants("Sure:\n*A* b\nEnd")
    assert v == ["Sure:\n*A* b\nEnd", "Sure:\nA b\nEnd", "*A* b\nEnd", "Sure:\n*A* b", "*A* b",
                 "A b\nEnd", "Sure:\nA b", "A b"]


def test_all_shared_records_parse_and_use_every_type(shared_data):
    records = load_prompts(shared_data / "ifeval" / "input_data.jsonl")
    assert len(records) == 541
    assert sum(len(r.instructions) for r in records) == 834
    assert {i for r in records for i in r.instruction_ids} == set(INSTRUCTIONS)
    assert records[0].key == 1000 and records[0].instruction_ids[0] == "punctuation:no_comma"


def test_hugging_face_layout_with_null_kwargs_is_accepted():
    nulls = {"num_highlights": None, "relation": None, "num_words": None, "keywords": None}
    rec = parse_record({"key": 1, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
                        "kwargs": [{**nulls, "relation": "less than", "num_words": 3}]})
    assert rec.instructions[0].kwargs == {"num_words": 3, "relation": "less than"}
    assert rec.kwargs == [{"relation": "less than", "num_words": 3}]


# ---------------------------------------------------------------------------------- text processing


def test_sentence_and_word_splitting_equal_nltk_english():
    # Outputs of nltk.sent_tokenize / nltk.word_tokenize with the pretrained English Punkt model.
    doc = ("Punkt knows that the periods in Mr. Smith and Johann S. Bach do not mark sentence boundaries.  "
           "And sometimes sentences can start with non-capitalized words.  i is a good variable name.")
    assert text.split_sentences(doc) == [
        "Punkt knows that the periods in Mr. Smith and Johann S. Bach do not mark sentence boundaries.",
        "And sometimes sentences can start with non-capitalized words.", "i is a good variable name."]
    assert text.word_tokenize("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks.") == [
        "Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy", "me", "two", "of",
        "them", ".", "Thanks", "."]
    assert text.count_sentences("Hello Mr. Smith, how are you doing today? The weather is great, and Python "
                                "is awesome. The sky is pinkish-blue. You shouldn't eat cardboard.") == 4
    assert text.count_words("It's 5 o'clock; naïve café-goers, 漢字.") == 9


def test_language_detection_is_seeded_and_repeats():
    samples = ["ok", "Hi", "no se", "Ciao bella", "Das ist gut", "le chat", BONJOUR, HELLO_EN]
    first = [text.detect_language(s) for s in samples]
    assert all(first == [text.detect_language(s) for s in samples] for _ in range(3))
    assert first[-2:] == ["fr", "en"]
    code = ("from instructkit.evaluate.ifeval import text; import json; "
            f"print(json.dumps([text.detect_language(s) for s in {samples!r}]))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(fresh.stdout) == first  # same answers in a new process


# ------------------------------------------------------------------------------------------- metrics


def test_four_metrics_and_per_type_accuracy_on_a_hand_scored_set(tmp_path):
    records = [
        {"key": 1, "prompt": "p1", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
         "kwargs": [{}, {}]},
        {"key": 2, "prompt": "p2", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
        {"key": 3, "prompt": "p3", "instruction_id_list": ["detectable_format:json_format", "punctuation:no_comma"],
         "kwargs": [{}, {}]},
    ]
    responses = {"p1": '"hello, world"', "p2": "Sure:\n<<T>>\nbody", "p3": 'Here you go:\n{"a": 1}'}
    result = score_responses(records, responses)
    # p1: comma fails (both modes), quotation passes. p2: title passes. p3: JSON fails strict (preamble)
    # but passes loose (first line removed); no comma passes.
    assert [p.follow_instruction_list_strict for p in result.prompts] == [[False, True], [True], [False, True]]
    assert [p.follow_instruction_list_loose for p in result.prompts] == [[False, True], [True], [True, True]]
    m = result.metrics()
    assert (m["n_prompts"], m["n_instructions"]) == (3, 5)
    assert m["prompt_level_strict_acc"] == pytest.approx(1 / 3)
    assert m["inst_level_strict_acc"] == pytest.approx(3 / 5)
    assert m["prompt_level_loose_acc"] == pytest.approx(2 / 3)
    assert m["inst_level_loose_acc"] == pytest.approx(4 / 5)
    assert m["per_instruction"]["punctuation:no_comma"] == {"n": 2, "strict_acc": 0.5, "loose_acc": 0.5}
    assert m["per_instruction"]["detectable_format:json_format"] == {"n": 1, "strict_acc": 0.0, "loose_acc": 1.0}
    assert m["per_category"]["detectable_format"] == {"n": 2, "strict_acc": 0.5, "loose_acc": 1.0}
    assert m["per_category"]["startend"] == {"n": 1, "strict_acc": 1.0, "loose_acc": 1.0}
    # the same scores from a list aligned with the records
    aligned = score_responses(records, [responses[r["prompt"]] for r in records]).metrics()
    assert aligned == m
    metrics_path, details_path = result.write(tmp_path)
    assert json.loads(metrics_path.read_text())["inst_level_loose_acc"] == pytest.approx(0.8)
    details = [json.loads(x) for x in details_path.read_text().splitlines()]
    assert details[2]["instruction_id_list"] == ["detectable_format:json_format", "punctuation:no_comma"]
    assert details[2]["follow_instruction_list_strict"] == [False, True]
    assert details[2]["follow_all_instructions_loose"] is True
    with pytest.raises(KeyError, match="no response"):
        score_responses(records, {"p1": "x"})


# ----------------------------------------------------------------------------------------- bad input


def _prompts_file(tmp_path, *records) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("ids,kwargs,field,words", [
    (["punctuation:no_comas"], [{}], "instruction_id_list[0]", "did you mean 'punctuation:no_comma'"),
    (["punctuation:no_comma"], [{"num_words": 3}], "kwargs[0].num_words", "takes no arguments"),
    (["length_constraints:number_words"], [{"num_words": 3}], "kwargs[0].relation", "missing"),
    (["length_constraints:number_words"], [{"num_words": 3, "relation": "at most"}], "kwargs[0].relation",
     "'less than' or 'at least'"),
    (["length_constraints:number_words"], [{"num_words": "3", "relation": "at least"}], "kwargs[0].num_words",
     "integer >= 0"),
    (["keywords:letter_frequency"], [{"letter": "ab", "let_frequency": 1, "let_relation": "at least"}],
     "kwargs[0].letter", "single character"),
    (["keywords:existence"], [{"keywords": "cat"}], "kwargs[0].keywords", "list"),
    (["keywords:existence"], [{"keywords": ["c(at"]}], "kwargs[0].keywords", "regular expression"),
    (["language:response_language"], [{"language": "xx"}], "kwargs[0].language", "langdetect"),
    (["length_constraints:nth_paragraph_first_word"], [{"num_paragraphs": 2, "nth_paragraph": 3,
                                                        "first_word": "a"}], "kwargs[0].nth_paragraph", "<="),
    (["punctuation:no_comma", "startend:quotation"], [{}], "kwargs", "one object per instruction"),
])
def test_bad_prompt_records_name_file_line_field_and_fix(tmp_path, ids, kwargs, field, words):
    good = {"key": 1, "prompt": "fine", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = _prompts_file(tmp_path, good, {"key": 2, "prompt": "bad", "instruction_id_list": ids, "kwargs": kwargs})
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, field)
    assert words in str(e.value) and "Fix:" in str(e.value)


def test_duplicate_prompts_are_an_error(tmp_path):
    rec = {"key": 1, "prompt": "same", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    with pytest.raises(DataError, match="same prompt text as line 1"):
        load_prompts(_prompts_file(tmp_path, rec, {**rec, "key": 2}))


# ----------------------------------------------------------------------------------------------- CLI


def _shared_records(shared_data, keys):
    recs = {r["key"]: r for r in map(json.loads, (shared_data / "ifeval" / "input_data.jsonl").open())}
    return [recs[k] for k in keys]


def test_cli_scores_a_responses_file(shared_data, tmp_path, capsys):
    prompts = shared_data / "ifeval" / "input_data.jsonl"
    r1001, r1005, r1000 = _shared_records(shared_data, [1001, 1005, 1000])
    assert r1001["instruction_id_list"] == ["punctuation:no_comma"]
    assert r1005["instruction_id_list"] == ["detectable_content:number_placeholders"]
    assert r1005["kwargs"] == [{"num_placeholders": 12}]
    responses = [
        {"prompt": r1001["prompt"], "response": "Hark thou shalt see Tokyo and Kyoto"},  # follows
        {"prompt": r1005["prompt"], "response": "Sure, here it is:\n" + " ".join(f"[f{i}]" for i in range(11))},
        # 1000: no commas (yes), 3 highlights (yes), 300+ words (no) -> prompt fails, 2 of 3 instructions
        {"prompt": r1000["prompt"], "response": "*One* *Two* *Three* " + "word " * 20},
    ]
    resp_file = tmp_path / "responses.jsonl"
    resp_file.write_text("".join(json.dumps(r) + "\n" for r in responses), encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["eval", "--suite", "ifeval", "--prompts", str(prompts), "--responses", str(resp_file),
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "prompt-level accuracy" in printed.out and "instruction-level accuracy" in printed.out
    assert "number_placeholders" in printed.out and "538 of 541 prompts have no response" in printed.err
    m = json.loads((out / "ifeval.json").read_text())
    assert (m["n_prompts"], m["n_instructions"], m["n_prompts_without_response"]) == (3, 5, 538)
    assert m["prompt_level_strict_acc"] == pytest.approx(1 / 3)  # only 1001
    assert m["inst_level_strict_acc"] == pytest.approx(3 / 5)  # 1001 + no_comma and highlights of 1000
    assert m["prompt_level_loose_acc"] == pytest.approx(1 / 3)
    assert m["per_instruction"]["detectable_content:number_placeholders"]["strict_acc"] == 0.0  # 11 < 12
    details = [json.loads(x) for x in (out / "ifeval_details.jsonl").read_text().splitlines()]
    assert [d["key"] for d in details] == [1000, 1001, 1005]  # the prompts file's order
    assert details[0]["follow_instruction_list_strict"] == [True, True, False]

    # A response to a prompt that is not in the prompts file: exit 2 with file, line and fix.
    resp_file.write_text(json.dumps({"prompt": "not an IFEval prompt", "response": "x"}) + "\n")
    rc = main(["eval", "--suite", "ifeval", "--prompts", str(prompts), "--responses", str(resp_file),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{resp_file}:1: field 'prompt'" in err and "Fix:" in err
    # --prompts is required, and --data only for the skills suite
    assert main(["eval", "--suite", "ifeval", "--responses", str(resp_file), "--out", str(out)]) == 2
    assert "--prompts is required" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--out", str(out)]) == 2
    assert "--data is required for --suite skills" in capsys.readouterr().err


def test_cli_generates_with_a_model_and_scores(shared_data, tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    proc = subprocess.run(
        [sys.executable, "-m", "instructkit", "eval", "--suite", "ifeval", "--prompts",
         str(shared_data / "ifeval" / "input_data.jsonl"), "--model", str(tiny_model_dir), "--out", str(out),
         "--limit", "3", "--max-new-tokens", "8"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "IFEval: 3 prompts" in proc.stdout
    rows = [json.loads(x) for x in (out / "ifeval_responses.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [1000, 1001, 1005]
    assert all(r["generated_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in rows)
    m = json.loads((out / "ifeval.json").read_text())
    assert m["n_prompts"] == 3 and m["max_new_tokens"] == 8
    # the saved responses score the same through the responses path
    again = score_responses(load_prompts(shared_data / "ifeval" / "input_data.jsonl", limit=3),
                            [r["response"] for r in rows]).metrics()
    assert all(again[k] == m[k] for k in ("prompt_level_strict_acc", "inst_level_strict_acc",
                                          "prompt_level_loose_acc", "inst_level_loose_acc"))
