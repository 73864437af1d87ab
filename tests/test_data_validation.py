"""Validation: each kind of bad record or bad line is reported with its file, line, field, reason and fix."""

from __future__ import annotations

import gzip
import json

import pytest

from instructkit.data.errors import DataError, SkipReport
from instructkit.data.formats import load_examples, normalize
from instructkit.data.readers import read_records

GOOD = {
    "alpaca": {"instruction": "Say hi.", "output": "Hi!"},
    "dolly": {"instruction": "Say hi.", "context": "", "response": "Hi!"},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "preference": {"prompt": "q", "chosen": "good", "rejected": "bad"},
    "hh_rlhf": {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
    "kto": {"prompt": "q", "completion": "a", "label": True},
}
KIND = {"preference": "preference", "hh_rlhf": "preference", "kto": "kto"}


def H(*turns):
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


def sg(*turns):
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


def ms(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# (format of the file, bad record, expected field, expected reason, words the problem must contain)
CASES = [
    ("alpaca", {"instruction": "x"}, "output", "missing_field", "missing"),
    ("alpaca", {"instruction": "x", "output": None}, "output", "missing_field", "null"),
    ("alpaca", {"instruction": "x", "output": 42}, "output", "wrong_type", "number"),
    ("alpaca", {"instruction": "x", "output": "   "}, "output", "empty_content", "assistant turn"),
    ("alpaca", {"instruction": " ", "input": "ctx", "output": "y"}, "instruction", "empty_content", "instruction"),
    ("alpaca", {"instruction": "x", "output": "y", "system": ""}, "system", "empty_content", "system prompt"),
    ("dolly", {"instruction": "x", "context": ""}, "response", "missing_field", "missing"),
    ("sharegpt", sg(("human", "q"), ("narrator", "a")), "conversations[1].from", "unknown_role", "narrator"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
     "conversations[1].value", "missing_field", "no text"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"value": "a"}]},
     "conversations[1].from", "missing_field", "speaker"),
    ("sharegpt", {"conversations": "q"}, "conversations", "wrong_type", "list of messages"),
    ("sharegpt", {"conversations": ["q"]}, "conversations[0]", "wrong_type", "message object"),
    ("sharegpt", sg(("human", "q"), ("gpt", "a"), ("human", "q2")), "conversations[2].from",
     "not_ending_with_assistant", "ends with a user turn"),
    ("sharegpt", sg(("gpt", "a"), ("human", "q"), ("gpt", "a")), "conversations[0].from", "bad_order",
     "starts with an assistant"),
    ("sharegpt", sg(("human", "q"), ("human", "q2"), ("gpt", "a")), "conversations[1].from", "bad_order",
     "both user turns"),
    ("sharegpt", sg(("human", "q"), ("gpt", "")), "conversations[1].value", "empty_content", "empty"),
    ("messages", ms(("user", "q"), ("assistant", " \n")), "messages[1].content", "empty_content", "empty"),
    ("messages", ms(("user", "q"), ("assistant", None)), "messages[1].content", "missing_field", "no text"),
    ("messages", ms(("user", "q"), ("tool", "{}")), "messages[1].role", "unknown_role", "tool"),
    ("messages", ms(("user", "q"), ("system", "s"), ("assistant", "a")), "messages[1].role", "bad_order",
     "system turn may only come first"),
    ("messages", ms(("system", "  "), ("user", "q"), ("assistant", "a")), "messages[0].content",
     "empty_content", "system prompt"),
    ("messages", {"messages": []}, "messages", "empty_content", "no messages"),
    ("messages", {"messages": [{"role": "user", "content": {"x": 1}}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "wrong_type", "object"),
    ("preference", {"prompt": "q", "chosen": "same", "rejected": "same "}, "rejected", "identical_pair",
     "same reply"),
    ("preference", {"prompt": "q", "chosen": "", "rejected": "bad"}, "chosen", "empty_content", "empty"),
    ("preference", {"prompt": "q", "chosen": [], "rejected": "b"}, "chosen", "empty_content", "no messages"),
    ("preference", {"prompt": "q", "chosen": "good"}, "rejected", "missing_field", "missing"),
    ("preference", {"chosen": [{"role": "assistant", "content": "g"}],
                    "rejected": [{"role": "assistant", "content": "b"}]}, "prompt", "missing_field", "no prompt"),
    ("preference", {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "chosen": "g", "rejected": "b"}, "prompt[1].role", "bad_order", "ends with an assistant"),
    ("preference", {"prompt": "q", "chosen": [{"role": "user", "content": "other"},
                                             {"role": "assistant", "content": "g"}], "rejected": "b"},
     "chosen", "mismatched_prompt", "does not repeat"),
    ("preference", {"prompt": "q", "chosen": [{"role": "assistant", "content": "g"},
                                             {"role": "user", "content": "more?"}], "rejected": "b"},
     "chosen[1].role", "not_ending_with_assistant", "not the assistant reply"),
    ("hh_rlhf", {"chosen": "Hi\n\nHuman: q\n\nAssistant: g", "rejected": H(("Human", "q"), ("Assistant", "b"))},
     "chosen", "bad_transcript", "does not start"),
    ("hh_rlhf", {"chosen": H(("Human", "q"), ("Assistant", "g")),
                 "rejected": H(("Human", "other"), ("Assistant", "b"))}, "rejected", "mismatched_prompt",
     "share no prompt"),
    ("hh_rlhf", {"chosen": H(("Human", "q"), ("Assistant", "same")),
                 "rejected": H(("Human", "q"), ("Assistant", "same"))}, "rejected", "identical_pair", "same"),
    ("hh_rlhf", {"chosen": H(("Human", "q"), ("Human", "q2"), ("Assistant", "g")),
                 "rejected": H(("Human", "q"), ("Human", "q2"), ("Assistant", "b"))}, "chosen", "bad_order",
     "turns 1 and 2"),
    ("hh_rlhf", {"chosen": ["x"], "rejected": H(("Human", "q"), ("Assistant", "b"))}, "chosen", "wrong_type",
     "transcript"),
    ("kto", {"prompt": "q", "completion": "a", "label": "yes"}, "label", "wrong_type", "true or false"),
    ("kto", {"prompt": "q", "completion": "  ", "label": True}, "completion", "empty_content", "empty"),
]


def write_with_bad_at_line_3(path, fmt, bad):
    good = GOOD[fmt]
    lines = [json.dumps(good), json.dumps(good), json.dumps(bad), json.dumps(good)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt,bad,field,reason,words", CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_bad_record_raises_with_file_line_field_reason_fix(tmp_path, fmt, bad, field, reason, words):
    path = write_with_bad_at_line_3(tmp_path / "data.jsonl", fmt, bad)
    with pytest.raises(DataError) as e:
        load_examples(path, kind=KIND.get(fmt, "sft"))
    err = e.value
    assert (err.file, err.line, err.field, err.reason) == (str(path), 3, field, reason), err
    assert words in err.problem, err
    assert err.fix and f". Fix: {err.fix}" in str(err)
    assert str(err).startswith(f"{path}:3: field '{field}'")


@pytest.mark.parametrize("fmt,bad,field,reason,words", CASES[:8])
def test_same_errors_under_skip_keep_the_good_records(tmp_path, fmt, bad, field, reason, words):
    path = write_with_bad_at_line_3(tmp_path / "data.jsonl", fmt, bad)
    report = SkipReport()
    ex = load_examples(path, kind=KIND.get(fmt, "sft"), on_error="skip", report=report)
    assert [e["_line"] for e in ex] == [1, 2, 4]
    assert report.total_seen == 4 and len(report) == 1
    assert (report.records[0].line, report.records[0].reason, report.records[0].field) == (3, reason, field)


# --- reading errors -------------------------------------------------------------------------------

def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n'
                    '{"prompt": "a", "completion": "b",}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_records(path))
    err = e.value
    assert (err.line, err.reason, err.file) == (3, "invalid_json", str(path))
    assert "column 35" in err.problem and "Expecting property name" in err.problem
    assert err.fix and str(err).startswith(f"{path}:3:")
    with pytest.raises(DataError, match=r":3: invalid JSON"):
        load_examples(path)


def test_non_utf8_bytes_name_line_and_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n"
    path.write_bytes(first + '{"prompt": "café", "completion": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        list(read_records(path))
    err = e.value
    assert (err.line, err.reason) == (2, "invalid_utf8")
    assert "0xe9" in err.problem and f"byte offset {len(first) + 15}" in err.problem
    assert "UTF-8" in err.fix and "iconv" in err.fix


def test_non_utf8_in_json_document(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "café", "completion": "b"}\n]'
                     .encode("latin-1"))
    with pytest.raises(DataError) as e:
        list(read_records(path))
    assert (e.value.line, e.value.reason) == (3, "invalid_utf8")


def test_valid_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "arr.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n["a", "b"]\n"text"\n', encoding="utf-8")
    report = SkipReport()
    rows = list(read_records(path, on_error="skip", report=report))
    assert [line for line, _ in rows] == [1]
    assert [(r.line, r.reason) for r in report.records] == [(2, "not_object"), (3, "not_object")]
    assert "array" in report.records[0].message and "string" in report.records[1].message
    assert report.total_seen == 2  # read_records counts the lines it skips; consumers count the rest


def test_json_array_element_not_object_and_syntax_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, 5]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_records(path))
    assert (e.value.line, e.value.reason) == (2, "not_object")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "a"},\n {"prompt": "a" "completion": "b"}\n]', encoding="utf-8")
    with pytest.raises(DataError) as e:  # a whole-document error raises even under skip
        list(read_records(broken, on_error="skip", report=SkipReport()))
    assert (e.value.line, e.value.reason) == (3, "invalid_json") and "column 17" in e.value.problem


def test_pretty_printed_json_named_jsonl_gets_a_hint(tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}], indent=2), encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_records(path))
    assert e.value.line == 1 and ".json" in e.value.fix


def test_truncated_gzip_is_reported(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"prompt": f"q{i}", "completion": "a"}).encode() + b"\n"
                                  for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        list(read_records(path))
    assert e.value.reason == "corrupt_file" and "gzip" in e.value.fix


def test_skip_needs_a_report():
    with pytest.raises(ValueError, match="report"):
        read_records("whatever.jsonl", on_error="skip")


def test_load_without_report_warns_about_skips(tmp_path):
    path = write_with_bad_at_line_3(tmp_path / "d.jsonl", "alpaca", {"instruction": "x"})
    with pytest.warns(UserWarning, match="1 of 4 records skipped"):
        assert len(load_examples(path, on_error="skip")) == 3


# --- skip mode: nothing is dropped silently -------------------------------------------------------

def test_skip_report_counts_reasons_and_lines(tmp_path):
    good = GOOD["sharegpt"]
    lines = [
        json.dumps(good),                                               # 1 kept
        json.dumps(sg(("human", "q"), ("robot", "a"))),                 # 2 unknown_role
        "",                                                             # 3 blank: not a record
        '{"conversations": [',                                          # 4 invalid_json
        json.dumps(sg(("human", "q"), ("gpt", "a"), ("human", "q2"))),  # 5 not_ending_with_assistant
        json.dumps({**good, "id": "keep-me"}),                          # 6 kept
        json.dumps(sg(("human", "q"), ("gpt", " "))),                   # 7 empty_content
        json.dumps(sg(("human", "q"), ("bard", "a"))),                  # 8 kept
        json.dumps(sg(("human", "q"), ("robot", "a"))),                 # 9 unknown_role
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = SkipReport()
    ex = load_examples(path, on_error="skip", report=report)
    assert [e["_line"] for e in ex] == [1, 6, 8]
    assert report.total_seen == 8 and len(report) == 5
    d = report.to_dict()
    assert d["total_seen"] == 8 and d["skipped"] == 5
    assert d["by_reason"] == {"unknown_role": 2, "invalid_json": 1, "not_ending_with_assistant": 1,
                              "empty_content": 1}
    assert [(r["line"], r["reason"]) for r in d["records"]] == [
        (2, "unknown_role"), (4, "invalid_json"), (5, "not_ending_with_assistant"), (7, "empty_content"),
        (9, "unknown_role")]
    assert all(r["file"] == str(path) and "Fix:" in r["message"] for r in d["records"])
    summary = report.summary()
    assert summary.startswith("5 of 8 records skipped")
    assert "unknown_role: 2 [mixed.jsonl:2, mixed.jsonl:9]" in summary
    assert "invalid_json: 1 [mixed.jsonl:4]" in summary
    # The same file under raise stops at the first problem, line 2.
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert e.value.line == 2 and e.value.field == "conversations[1].from"


def test_skip_report_accumulates_across_files(tmp_path):
    a = write_with_bad_at_line_3(tmp_path / "a.jsonl", "alpaca", {"instruction": "x"})
    b = write_with_bad_at_line_3(tmp_path / "b.jsonl", "kto", {"prompt": "q", "completion": "a", "label": 1})
    report = SkipReport()
    ex = load_examples([a], on_error="skip", report=report)
    ex += load_examples([b], on_error="skip", kind="kto", report=report)
    assert len(ex) == 6 and report.total_seen == 8
    assert [(r.file, r.line) for r in report.records] == [(str(a), 3), (str(b), 3)]


def test_normalize_direct_errors_carry_the_location():
    with pytest.raises(DataError) as e:
        normalize({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", "x.json", 12)
    assert (e.value.file, e.value.line, e.value.reason) == ("x.json", 12, "not_ending_with_assistant")
    with pytest.raises(DataError) as e:
        normalize({"foo": 1}, "auto", "x.json", 5)
    assert e.value.reason == "unknown_format" and "foo" in e.value.problem
