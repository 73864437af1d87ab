"""Formatting repairs of sampled replies (best-of-n --repair) and garbled-sample rejection."""

import json

import pytest

from instructkit.evaluate.ifeval.checks import bind
from instructkit.synth.repair import REPAIRS, repair

REPLY = "The sea is calm today. Boats drift slowly. Gulls cry overhead. The wind is soft."
ARGS = {"length_constraints:number_paragraphs": {"num_paragraphs": 3},
        "combination:repeat_prompt": {"prompt_to_repeat": "Describe the sea at dawn."},
        "startend:end_checker": {"end_phrase": "Is there anything else I can help with?"},
        "change_case:english_lowercase": {}, "change_case:english_capital": {}, "startend:quotation": {}}


@pytest.mark.parametrize("iid", list(REPAIRS))
def test_each_repair_makes_its_check_pass_and_keeps_the_words(iid):
    ins = bind(iid, ARGS[iid])
    assert not ins.follows(REPLY)
    fixed, applied = repair(REPLY, [iid], [ARGS[iid]])
    assert applied == [iid] and ins.follows(fixed)
    for word in ("sea", "boats", "gulls", "wind"):
        assert word in fixed.lower()


def test_repairs_compose_and_a_passing_reply_is_left_alone():
    ids = ["length_constraints:number_paragraphs", "startend:end_checker", "change_case:english_lowercase"]
    kwargs = [{"num_paragraphs": 2}, ARGS["startend:end_checker"], {}]
    fixed, applied = repair(REPLY, ids, kwargs)
    assert applied == ids
    assert all(bind(i, k).follows(fixed) for i, k in zip(ids, kwargs))
    assert fixed.split("\n\n***\n\n")[0] == "the sea is calm today. boats drift slowly."
    assert repair("all lower here.", ["change_case:english_lowercase"], [{}]) == ("all lower here.", [])


def test_content_constraints_and_impossible_repairs_are_not_touched():
    # a title or a keyword needs new content: never repaired
    assert repair(REPLY, ["detectable_format:title", "keywords:existence"], [{}, {"keywords": ["moon"]}]) == (REPLY, [])
    # two sentences cannot make three paragraphs
    short = "One sentence. Two sentences."
    assert repair(short, ["length_constraints:number_paragraphs"], [{"num_paragraphs": 3}]) == (short, [])
    assert repair("  ", ["change_case:english_capital"], [{}]) == ("  ", [])


def test_best_of_n_repair_keeps_repaired_replies_and_rejects_garbled(tmp_path):
    from instructkit.generate import SamplingConfig
    from instructkit.synth.best_of_n import ifeval_scorer, read_prompts, write_best_of_n

    recs = [{"prompt": "Describe the sea. Write only in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
             "kwargs": [{}]},
            {"prompt": "Describe tea. Wrap your reply in double quotes.", "instruction_id_list": ["startend:quotation"],
             "kwargs": [{}]},
            {"prompt": "Describe a cat. Include a title in <<double angular brackets>>.",
             "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = read_prompts(path)
    texts = ["The Sea is Blue.", "The sea \ufffd is blue.",   # repaired by lowercasing; garbled
             "Tea is warm.", "Tea is hot.",                 # both repaired by quoting: the first is kept
             "A cat.", "<<Cats>> \ufffd A cat."]            # title is never repaired; the titled one is garbled
    finish = ["stop"] * 6
    scorer, name = ifeval_scorer()
    s = write_best_of_n(records, texts, finish, scorer, name, tmp_path / "out", n=2,
                        sampling=SamplingConfig(max_new_tokens=8), min_score=1.0, require_stop=True, repair=True)
    best = [json.loads(line) for line in (tmp_path / "out/best.jsonl").read_text().splitlines()]
    assert [b["messages"][-1]["content"] for b in best] == ["the sea is blue.", '"Tea is warm."']
    assert [b["repaired"] for b in best] == [["change_case:english_lowercase"], ["startend:quotation"]]
    assert s["samples_garbled"] == 2 and s["samples_repaired"] == 4
    assert s["kept_with_repair"] == {"change_case:english_lowercase": 1, "startend:quotation": 1}
    assert s["skipped"]["below_min_score"] == 1
    # without --repair nothing here is verified
    s2 = write_best_of_n(records, texts, finish, scorer, name, tmp_path / "out2", n=2,
                         sampling=SamplingConfig(max_new_tokens=8), min_score=1.0, require_stop=True)
    assert s2["best_written"] == 0 and "kept_with_repair" not in s2
