"""Readers, format detection and normalisation: every format, every container, the real sample files."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from instructkit.data.errors import DataError, SkipReport
from instructkit.data.formats import (FORMATS, detect_file_format, detect_format, load_examples,
                                      normalize)
from instructkit.data.readers import read_records

HH = "hh_rlhf/harmless-base-test.jsonl.gz"
SHAREGPT = "sharegpt/dummy_conversation.json"
SEED = "self_instruct/seed_tasks.jsonl"
# The real hh-rlhf test split has 5 pairs whose transcripts differ before the final reply.
HH_MISMATCHED = [1255, 1689, 1951, 1953, 2037]


def write_jsonl(path, records, blank_after=()):
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(records, 1):
            fh.write(json.dumps(r) + "\n")
            if i in blank_after:
                fh.write("\n")
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def seed_as_alpaca(shared_data):
    """The Self-Instruct seed tasks rewritten as Alpaca records (instruction/input/output)."""
    out = []
    for line in (shared_data / SEED).read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        inst = task["instances"][0]
        out.append({"instruction": task["instruction"], "input": inst["input"], "output": inst["output"]})
    return out


# --- detection ------------------------------------------------------------------------------------

@pytest.mark.parametrize("record,expected", [
    ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"instruction": "a", "input": "", "output": "b", "system": "s"}, "alpaca"),
    ({"instruction": "a", "context": "c", "response": "b", "category": "qa"}, "dolly"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"conversations": [{"role": "user", "content": "a"}], "system": "s"}, "sharegpt"),
    ({"messages": msgs(("user", "a"), ("assistant", "b"))}, "messages"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"prompt": "a", "completion": "b", "label": False}, "kto"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
    ({"chosen": msgs(("user", "a"), ("assistant", "b")),
      "rejected": msgs(("user", "a"), ("assistant", "c"))}, "preference"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh_rlhf"),
    ({"chosen": "b", "rejected": "c"}, None),
    ({"question_id": 1, "turns": ["a"]}, None),
    ({"instruction": "a", "output": None, "response": "b"}, "dolly"),  # nulls count as absent
    ([1, 2], None),
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_formats_tuple():
    assert FORMATS == ("alpaca", "sharegpt", "messages", "dolly", "prompt_completion", "preference",
                       "hh_rlhf", "kto")


# --- SFT formats ----------------------------------------------------------------------------------

def test_alpaca_with_and_without_input_and_system():
    a = normalize({"instruction": "Add.", "input": "2 2", "output": "4"}, "alpaca", "f.jsonl", 7)
    assert a == {"messages": msgs(("user", "Add.\n\n2 2"), ("assistant", "4")),
                 "_file": "f.jsonl", "_line": 7, "_format": "alpaca"}
    b = normalize({"instruction": "Hi.", "input": "  ", "output": "Hello", "system": "Be brief."},
                  "alpaca", "f.jsonl", 1)
    assert b["messages"] == msgs(("system", "Be brief."), ("user", "Hi."), ("assistant", "Hello"))


def test_dolly_context_joins_like_alpaca_input():
    r = normalize({"instruction": "Summarise.", "context": "Long text.", "response": "Short.",
                   "category": "summarization"}, "dolly", "d.jsonl", 1)
    assert r["messages"] == msgs(("user", "Summarise.\n\nLong text."), ("assistant", "Short."))
    assert r["_format"] == "dolly"


def test_sharegpt_role_map_and_system():
    convo = [{"from": "system", "value": "sys"}, {"from": "human", "value": "q1"},
             {"from": "gpt", "value": "a1"}, {"from": "user", "value": "q2"},
             {"from": "chatgpt", "value": "a2"}, {"from": "Human", "value": "q3"},
             {"from": "bing", "value": "a3"}, {"from": "human", "value": "q4"},
             {"from": "bard", "value": "a4"}, {"from": "human", "value": "q5"},
             {"from": "model", "value": "a5"}]
    r = normalize({"conversations": convo}, "sharegpt", "s.json", 1)
    assert [m["role"] for m in r["messages"]] == ["system"] + ["user", "assistant"] * 5
    top = normalize({"system": "top", "conversations": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]},
                    "sharegpt", "s.json", 2)
    assert top["messages"] == msgs(("system", "top"), ("user", "q"), ("assistant", "a"))


def test_messages_and_text_parts():
    r = normalize({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                             {"type": "text", "text": "there"}]},
                                {"role": "assistant", "content": "Hello"}]}, "messages", "m.jsonl", 1)
    assert r["messages"] == msgs(("user", "Hi there"), ("assistant", "Hello"))


def test_prompt_completion_strings_and_lists():
    a = normalize({"prompt": "2+2?", "completion": "4"}, "prompt_completion", "p.jsonl", 1)
    assert a["messages"] == msgs(("user", "2+2?"), ("assistant", "4"))
    b = normalize({"prompt": msgs(("system", "s"), ("user", "q")),
                   "completion": msgs(("assistant", "a"))}, "prompt_completion", "p.jsonl", 2)
    assert b["messages"] == msgs(("system", "s"), ("user", "q"), ("assistant", "a"))


# --- preference and KTO ---------------------------------------------------------------------------

def test_preference_string_and_list_forms_agree():
    want = {"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "good")),
            "rejected": msgs(("assistant", "bad"))}
    forms = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "good")),
         "rejected": msgs(("assistant", "bad"))},
        {"prompt": "q", "chosen": msgs(("user", "q"), ("assistant", "good")), "rejected": "bad"},
        {"chosen": msgs(("user", "q"), ("assistant", "good")),
         "rejected": msgs(("user", "q"), ("assistant", "bad"))},
    ]
    for rec in forms:
        got = normalize(rec, "preference", "p.jsonl", 1)
        assert {k: got[k] for k in want} == want, rec


def test_preference_multi_turn_prompt_and_system():
    rec = {"system": "sys", "prompt": msgs(("user", "q1"), ("assistant", "a1"), ("user", "q2")),
           "chosen": "good", "rejected": "bad"}
    got = normalize(rec, "preference", "p.jsonl", 1)
    assert got["prompt"] == msgs(("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))


def test_kto_record_and_pairs_become_unpaired(tmp_path):
    r = normalize({"prompt": "q", "completion": "a", "label": False}, "kto", "k.jsonl", 3)
    assert r["prompt"] == msgs(("user", "q")) and r["completion"] == msgs(("assistant", "a"))
    assert r["label"] is False and r["_line"] == 3
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    ex = load_examples(path, kind="kto")
    assert [(e["completion"][0]["content"], e["label"]) for e in ex] == [("good", True), ("bad", False)]
    assert all(e["_line"] == 1 and e["_format"] == "preference" for e in ex)


# --- real files -----------------------------------------------------------------------------------

def test_real_sharegpt_file(shared_data):
    report = SkipReport()
    ex = load_examples(shared_data / SHAREGPT, report=report, on_error="skip")
    assert len(ex) == 500 and len(report) == 0 and report.total_seen == 500
    roles = [m["role"] for e in ex for m in e["messages"]]
    assert len(roles) == 2000 and roles.count("user") == 1000 and roles.count("assistant") == 1000
    for e in ex:
        assert [m["role"] for m in e["messages"]] == ["user", "assistant"] * (len(e["messages"]) // 2)
    assert [e["_line"] for e in ex] == list(range(1, 501))
    assert ex[0]["messages"][0]["content"] == "Who are you?"


def test_real_hh_rlhf_split(shared_data):
    path = shared_data / HH
    raw = {line: rec for line, rec in read_records(path)}
    assert len(raw) == 2312
    report = SkipReport()
    pairs = load_examples(path, kind="preference", on_error="skip", report=report)
    assert report.total_seen == 2312 and len(pairs) + len(report) == 2312
    by_reason = report.by_reason()
    assert [r.line for r in by_reason["mismatched_prompt"]] == HH_MISMATCHED
    for pair in pairs:
        assert pair["prompt"][0]["role"] == "user" and pair["prompt"][-1]["role"] == "user"
        assert len(pair["chosen"]) == len(pair["rejected"]) == 1
        # Re-assembling the parsed turns gives back the original transcripts exactly.
        prefix = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                         for m in pair["prompt"])
        for side in ("chosen", "rejected"):
            assert prefix + "\n\nAssistant: " + pair[side][0]["content"] == raw[pair["_line"]][side]
    first = pairs[0]
    assert first["_line"] == 1 and first["_format"] == "hh_rlhf"
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["prompt"][0]["content"] == raw[1]["chosen"].split("\n\nAssistant:")[0][len("\n\nHuman: "):]
    assert not first["chosen"][0]["content"].startswith(" ")


def test_real_hh_rlhf_mismatched_pairs_raise(shared_data, tmp_path):
    raw = dict(read_records(shared_data / HH))
    for line in HH_MISMATCHED:
        with pytest.raises(DataError) as e:
            normalize(raw[line], "hh_rlhf", shared_data / HH, line)
        assert e.value.reason == "mismatched_prompt" and e.value.line == line
        assert "Fix:" in str(e.value) and "differ before their last" in e.value.problem
    path = write_jsonl(tmp_path / "hh.jsonl", [raw[1], raw[2], raw[1255]])
    with pytest.raises(DataError) as e:
        load_examples(path, kind="preference")
    assert (e.value.line, e.value.reason, e.value.field) == (3, "mismatched_prompt", "rejected")


def test_real_seed_tasks_as_alpaca_in_every_container(shared_data, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = seed_as_alpaca(shared_data)
    files = {
        "jsonl": write_jsonl(tmp_path / "seed.jsonl", records),
        "json": tmp_path / "seed.json",
        "wrapped": tmp_path / "wrapped.json",
        "jsonl_named_json": write_jsonl(tmp_path / "lines.json", records),
        "gz": tmp_path / "seed.jsonl.gz",
        "json_gz": tmp_path / "seed.json.gz",
        "parquet": tmp_path / "seed.parquet",
        "arrow": tmp_path / "seed_arrow",
    }
    files["json"].write_text(json.dumps(records, indent=2), encoding="utf-8")
    files["wrapped"].write_text(json.dumps({"version": 1, "data": records}), encoding="utf-8")
    with gzip.open(files["gz"], "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    with gzip.open(files["json_gz"], "wt", encoding="utf-8") as fh:
        json.dump(records, fh)
    pq.write_table(pa.Table.from_pylist(records), files["parquet"], row_group_size=50)
    datasets.Dataset.from_list(records).save_to_disk(str(files["arrow"]))

    reference = None
    for name, path in files.items():
        assert detect_file_format(path) == "alpaca", name
        ex = load_examples(path)
        assert len(ex) == 175, name
        assert [e["_line"] for e in ex] == list(range(1, 176)), name
        got = [e["messages"] for e in ex]
        reference = reference or got
        assert got == reference, name
    for rec, e in zip(records, reference):
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"].strip() else "")
        assert e == msgs(("user", user), ("assistant", rec["output"]))
    assert sum(bool(r["input"]) for r in records) > 0  # both branches of the join are exercised


# --- containers and reader behaviour --------------------------------------------------------------

def test_jsonl_blank_lines_are_not_records(tmp_path):
    recs = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "b.jsonl", recs, blank_after=(1,))
    assert [line for line, _ in read_records(path)] == [1, 3, 4]


def test_single_object_json_and_bom(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                  {"from": "gpt", "value": "a"}]}), encoding="utf-8")
    assert [line for line, _ in read_records(path)] == [1]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "q", "completion": "a"}).encode() + b"\n")
    assert load_examples(bom)[0]["messages"][0]["content"] == "q"


def test_parquet_nulls_count_as_absent(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"instruction": "a", "output": "b", "system": None, "input": None},
            {"instruction": "c", "output": "d", "system": "sys", "input": "x"}]
    path = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    ex = load_examples(path)
    assert ex[0]["messages"] == msgs(("user", "a"), ("assistant", "b"))
    assert ex[1]["messages"] == msgs(("system", "sys"), ("user", "c\n\nx"), ("assistant", "d"))


def test_parquet_sharegpt_struct_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    assert load_examples(path)[0]["messages"] == msgs(("user", "q"), ("assistant", "a"))


def test_dataset_dict_folder_names_the_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="train") as e:
        read_records(tmp_path / "dd")
    assert str(tmp_path / "dd" / "train") in e.value.fix
    assert len(load_examples(tmp_path / "dd" / "train")) == 1


def test_missing_file_unsupported_extension_and_plain_folder(tmp_path):
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "nope.jsonl")
    assert e.value.reason == "missing_file" and e.value.file.endswith("nope.jsonl")
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError) as e:
        read_records(csv)
    assert e.value.reason == "unsupported_format"
    for ext in (".jsonl", ".json", ".jsonl.gz", ".parquet", "save_to_disk"):
        assert ext in e.value.fix
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        read_records(tmp_path / "folder")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert e.value.reason == "empty_file"


# --- auto-detection, overrides, kinds --------------------------------------------------------------

def test_explicit_override_matches_auto(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}] * 3)
    assert load_examples(path, format="alpaca") == load_examples(path)


def test_wrong_override_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}] * 3)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as e:
            load_examples(path, format="sharegpt", on_error=on_error, report=SkipReport())
        assert e.value.reason == "format_mismatch"
        assert "'sharegpt'" in e.value.problem and "conversations" in e.value.problem
        assert "alpaca" in e.value.fix


def test_unknown_format_lists_keys_and_formats(shared_data):
    with pytest.raises(DataError) as e:
        load_examples(shared_data / "mt_bench/question.jsonl")
    err = e.value
    assert err.reason == "unknown_format"
    assert "question_id" in err.problem and "turns" in err.problem
    for fmt in FORMATS:
        assert fmt in err.problem
    assert "data.format" in err.fix


def test_mixed_formats_in_one_file_are_ambiguous(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"instruction": "i", "output": "o"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    with pytest.raises(DataError) as e:
        detect_file_format(path)
    assert e.value.reason == "ambiguous_format"
    assert "alpaca" in e.value.problem and "sharegpt" in e.value.problem and "line 2" in e.value.problem
    assert "data.format" in e.value.fix


def test_kind_mismatch_points_at_the_right_method(shared_data, tmp_path):
    with pytest.raises(DataError) as e:
        load_examples(shared_data / HH, kind="sft")
    assert e.value.reason == "wrong_kind" and "dpo" in e.value.fix
    with pytest.raises(DataError) as e:
        load_examples(shared_data / SHAREGPT, kind="preference")
    assert e.value.reason == "wrong_kind" and "method: sft" in e.value.fix
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(DataError) as e:
        load_examples(kto, kind="sft")
    assert "method: kto" in e.value.fix


def test_several_files_keep_order_and_formats(shared_data, tmp_path):
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    ex = load_examples([alp, str(shared_data / SHAREGPT)])
    assert len(ex) == 501 and ex[0]["_format"] == "alpaca" and ex[1]["_format"] == "sharegpt"
    assert re.search(r"dummy_conversation\.json$", ex[-1]["_file"])
