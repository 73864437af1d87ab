"""The skills curriculum: every family's checker, split hygiene, determinism, corpus and preferences."""

import json
import random
import re

import pytest

from instructkit.data.formats import load_examples
from instructkit.synth.skills import (
    DEFAULT_HELDOUT_FAMILIES,
    FAMILIES,
    SPLITS,
    canonical_key,
    clean,
    heldout_phrasings,
    make_corpus,
    make_splits,
    verify_response,
    write_skills,
)

UNRELATED = "Purple elephants dance quietly under the bridge"
# Families whose answer is case-insensitive: the same answer in another case must still pass.
CASE_FREE = ("first_item", "last_item", "reverse_list", "reverse_words", "first_letters", "longest_word",
             "extract_email", "extract_date", "sentiment", "bullet_list", "clarify")
# Families whose whole point is the case: the answer in another case must fail.
CASE_BOUND = {"upper_case": str.lower, "lower_case": str.upper, "answer_upper": str.lower}
SMALL = dict(n_train=1200, n_corpus=3000)


def instances(name: str, n: int = 50, seed: int = 0):
    rng = random.Random(f"test/{name}/{seed}")
    fam = FAMILIES[name]
    for _ in range(n):
        # A JSON round trip, because verifiers see the data as an evaluator reads it back.
        yield json.loads(json.dumps(fam.sample(rng))), rng


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = write_skills(tmp_path_factory.mktemp("skills"), seed=0, **SMALL)
    return out, {s: read_jsonl(out / f"{s}.jsonl") for s in SPLITS}


# --- The registry -------------------------------------------------------------------------------

def test_registry_shape():
    assert len(FAMILIES) >= 24
    assert len({f.category for f in FAMILIES.values()}) >= 8
    assert "clarify" in FAMILIES
    for name, fam in FAMILIES.items():
        assert fam.name == name
        assert len(fam.phrasings) >= 6 and len(set(fam.phrasings)) == len(fam.phrasings), name
    assert set(DEFAULT_HELDOUT_FAMILIES) <= set(FAMILIES)
    assert len({FAMILIES[n].category for n in DEFAULT_HELDOUT_FAMILIES}) == len(DEFAULT_HELDOUT_FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_solve_verify_wrong(name):
    fam = FAMILIES[name]
    for data, rng in instances(name):
        answer = fam.solve(data)
        assert fam.verify(data, answer), (data, answer)
        wrong = fam.wrong(data, rng)
        assert wrong != answer and not fam.verify(data, wrong), (data, answer, wrong)
        assert not fam.verify(data, "") and not fam.verify(data, "   ")
        assert not fam.verify(data, UNRELATED)
        # Tolerant normalisation: surrounding whitespace and a trailing period do not matter.
        assert fam.verify(data, f"  {answer}.\n"), (data, answer)
        if name in CASE_FREE:
            assert fam.verify(data, answer.upper()) and fam.verify(data, answer.lower()), data
        if name in CASE_BOUND:
            assert not fam.verify(data, CASE_BOUND[name](answer)), data
        # Short inputs and answers: tiny models with a max_length of about 256 tokens.
        for p in range(len(fam.phrasings)):
            prompt = fam.render(data, p)
            assert prompt.strip() and len(prompt) <= 300, prompt
        assert 0 < len(answer) <= 160, answer
        statement = fam.state(data)
        assert statement.strip() and "\n" not in statement and "?" not in statement, statement


def test_verifiers_accept_common_answer_forms():
    add, date = FAMILIES["add"], FAMILIES["extract_date"]
    assert add.verify({"a": 2, "b": 45}, "The answer is 47.")
    assert not add.verify({"a": 2, "b": 45}, "46")
    assert FAMILIES["sort_ascending"].verify({"nums": [9, 3, 5]}, "[3, 5, 9]")
    assert FAMILIES["sort_ascending"].verify({"nums": [9, 3, 5]}, "3 5 9")
    assert not FAMILIES["sort_ascending"].verify({"nums": [9, 3, 5]}, "9, 5, 3")
    d = {"sentence": "x", "day": 1, "month": 8, "year": 2006}
    for text in ("1 August 2006", "August 1, 2006", "2006-08-01", "1st of August 2006", "1 Aug 2006"):
        assert date.verify(d, text), text
    assert not date.verify(d, "2 August 2006")
    js = {"a": 1, "b": 2, "key": "total"}
    assert FAMILIES["json_answer"].verify(js, '```json\n{"total": 3}\n```')
    assert not FAMILIES["json_answer"].verify(js, '{"total": 3, "extra": 1}')
    assert not FAMILIES["json_answer"].verify(js, '{"total": true}')
    assert FAMILIES["bullet_list"].verify({"items": ["owl", "cat"]}, "* owl\n* cat")
    assert not FAMILIES["bullet_list"].verify({"items": ["owl", "cat"]}, "owl\ncat")
    assert clean('  "The answer is: cat".  ') == "cat"


def test_clarify_uses_the_two_fixed_reply_styles():
    fam = FAMILIES["clarify"]
    cases = set()
    for data, _ in instances("clarify", 200):
        cases.add(data["case"])
        answer = fam.solve(data)
        assert answer.startswith(("I need more information:", "I cannot do that:"))
        assert len(answer.split()) <= 12
        other = "I cannot do that: no." if answer.startswith("I need") else "I need more information: which?"
        assert not fam.verify(data, other)
    assert cases == {"missing_list", "missing_word", "divide_zero", "empty_list"}
    assert fam.verify({"case": "divide_zero", "verb": "divide", "a": 7, "zero": "0"},
                      "i cannot do that: you cannot divide by zero")


def test_verify_response_dispatches_and_rejects_unknown_families():
    record = {"family": "add", "data": {"a": 1, "b": 2}}
    assert verify_response(record, "3") and not verify_response(record, "4")
    with pytest.raises(KeyError, match="unknown skills family"):
        verify_response({"family": "nope", "data": {}}, "3")


# --- Splits -------------------------------------------------------------------------------------

def test_split_hygiene(written):
    out, splits = written
    manifest = json.loads((out / "manifest.json").read_text())
    held = set(manifest["heldout_families"])
    assert held == set(DEFAULT_HELDOUT_FAMILIES)
    held_phr = {k: set(v) for k, v in manifest["heldout_phrasings"].items()}
    assert set(held_phr) == set(FAMILIES) - held
    assert all(len(v) == 2 for v in held_phr.values())

    owner: dict[str, str] = {}
    for split, records in splits.items():
        assert len(records) == manifest["sizes"][split]
        for rec in records:
            key = canonical_key(rec["family"], rec["data"])
            assert key not in owner, f"{key} in {owner.get(key)} and {split}"
            owner[key] = split
            fam = FAMILIES[rec["family"]]
            assert rec["split"] == split and rec["category"] == fam.category
            assert rec["messages"][0]["content"] == fam.render(rec["data"], rec["phrasing"])
            assert verify_response(rec, rec["messages"][1]["content"])
            if split == "heldout_family":
                assert rec["family"] in held
            else:
                assert rec["family"] not in held
                assert (rec["phrasing"] in held_phr[rec["family"]]) == (split == "heldout_phrasing")
    seen = set(FAMILIES) - held
    for split in ("train", "validation", "heldout_phrasing"):
        assert {r["family"] for r in splits[split]} == seen, split
    assert {r["family"] for r in splits["heldout_family"]} == held
    # Every allowed phrasing is used, so heldout_phrasing really tests the held-out wordings.
    for name in seen:
        used = {r["phrasing"] for r in splits["train"] if r["family"] == name}
        assert used == set(range(len(FAMILIES[name].phrasings))) - held_phr[name], name
    assert manifest["counts"]["validation"] == {n: 20 for n in sorted(seen)}


def test_records_load_with_instructkit_loader(written):
    out, splits = written
    for split in SPLITS:
        loaded = load_examples([out / f"{split}.jsonl"], kind="sft")
        assert len(loaded) == len(splits[split])
        assert [m["role"] for m in loaded[0]["messages"]] == ["user", "assistant"]


def test_preference_pairs(written):
    out, splits = written
    train, held = read_jsonl(out / "preference.jsonl"), read_jsonl(out / "preference_validation.jsonl")
    assert len(train) == len(splits["train"]) and len(held) == len(splits["validation"])
    assert {p["split"] for p in train} == {"train"} and {p["split"] for p in held} == {"validation"}
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    prefs = train + held
    for p in prefs:
        assert p["chosen"] != p["rejected"]
        assert verify_response(p, p["chosen"]), p
        assert not verify_response(p, p["rejected"]), p
    assert len(load_examples([out / "preference.jsonl", out / "preference_validation.jsonl"],
                             kind="preference")) == len(prefs)


def test_deterministic_for_a_seed(tmp_path, written):
    out, _ = written
    again = write_skills(tmp_path / "again", seed=0, **SMALL)
    names = ["train.jsonl", "validation.jsonl", "heldout_phrasing.jsonl", "heldout_family.jsonl",
             "corpus.txt", "preference.jsonl", "preference_validation.jsonl", "manifest.json"]
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = write_skills(tmp_path / "other", seed=1, **SMALL)
    for name in names:
        assert (other / name).read_bytes() != (out / name).read_bytes(), name


def test_default_sizes():
    splits = make_splits(0)
    seen = len(FAMILIES) - len(DEFAULT_HELDOUT_FAMILIES)
    assert {s: len(v) for s, v in splits.items()} == {
        "train": 10000, "validation": 20 * seen, "heldout_phrasing": 20 * seen,
        "heldout_family": 40 * len(DEFAULT_HELDOUT_FAMILIES)}


def test_cli_and_demo_default_to_the_same_sizes():
    """`instructkit synth skills` with no sizes writes the demo's curriculum."""
    import inspect

    from instructkit.cli import build_parser
    from instructkit.demo import run_demo
    from instructkit.synth.skills import N_CORPUS, N_TRAIN

    args = build_parser().parse_args(["synth", "skills", "--out", "x"])
    assert (args.n_train, args.n_corpus) == (N_TRAIN, N_CORPUS)
    demo = inspect.signature(run_demo).parameters
    assert (demo["n_train"].default, demo["n_corpus"].default) == (N_TRAIN, N_CORPUS)


def test_evaluation_splits_do_not_depend_on_train_size():
    small, large = make_splits(0, n_train=100), make_splits(0, n_train=400)
    for split in ("validation", "heldout_phrasing", "heldout_family"):
        assert small[split] == large[split]


def test_custom_heldout_families_and_errors():
    splits = make_splits(3, n_train=60, n_val=30, n_heldout_phrasing=30, n_heldout_family=20,
                         heldout_families=["add", "clarify"])
    assert {i.family for i in splits["heldout_family"]} == {"add", "clarify"}
    assert "add" not in {i.family for i in splits["train"]}
    assert "add" not in heldout_phrasings(3, ["add", "clarify"])
    with pytest.raises(ValueError, match="unknown heldout families"):
        make_splits(0, n_train=10, heldout_families=["no_such_family"])
    # multiply has 21 x 21 distinct inputs; asking for more must fail loudly, naming the family.
    with pytest.raises(ValueError, match="multiply"):
        make_splits(0, n_train=600 * (len(FAMILIES) - len(DEFAULT_HELDOUT_FAMILIES)))


# --- Corpus -------------------------------------------------------------------------------------

def test_corpus_states_every_family_without_instruction_format(written):
    out, splits = written
    text = (out / "corpus.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(lines) == manifest["sizes"]["corpus"] == SMALL["n_corpus"]
    assert set(manifest["corpus_counts"]) == set(FAMILIES)  # held-out families included
    assert all(n >= SMALL["n_corpus"] // len(FAMILIES) - 1 for n in manifest["corpus_counts"].values())

    for line in lines:
        assert line.strip() and "?" not in line
        assert not re.match(r"(user|assistant|human|system)\s*:", line, re.I), line
    for split, records in splits.items():
        for rec in records:
            assert rec["messages"][0]["content"] not in text, rec
    # The instruction wording of every phrasing (its text before the first field) never appears.
    for fam in FAMILIES.values():
        for phrasing in fam.phrasings:
            lead = phrasing.split("{")[0].strip()
            if len(lead) >= 8:
                assert lead not in text, (fam.name, lead)
    # No evaluation instance is stated, so evaluation measures generalisation, not recall.
    corpus = set(lines)
    for split in ("validation", "heldout_phrasing", "heldout_family"):
        for rec in splits[split]:
            assert FAMILIES[rec["family"]].state(rec["data"]) not in corpus, rec


def test_make_corpus_matches_the_written_file_and_excludes_keys():
    pairs = make_corpus(5, 620)
    assert {name for name, _ in pairs} == set(FAMILIES) and len(pairs) == 620
    rng = random.Random(0)
    data = FAMILIES["add"].sample(rng)
    everything_but = {canonical_key("add", {"a": a, "b": b}) for a in range(100) for b in range(100)}
    everything_but.discard(canonical_key("add", data))
    lines = [line for name, line in make_corpus(5, 620, exclude=everything_but) if name == "add"]
    assert set(lines) <= {FAMILIES["add"].state(data)}
