"""Curation: planted duplicates and contamination (recall, clean records kept), skewed mixtures,
IFD against a direct computation, selection, the data report, the CLI and bad input."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from instructkit.curate.decontam import EvalIndex, build_index, decontaminate_file, string_leaves
from instructkit.curate.dedup import DedupConfig, Deduplicator, dedup_file, dedup_records
from instructkit.curate.minhash import MinHasher, SortedMultimap, shingle_hashes, shingles
from instructkit.curate.mix import MixConfig, load_mix_config, mix, mixture_rates
from instructkit.curate.text import leading_word, normalize_text, words
from instructkit.data.errors import DataError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def vocab(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return sorted(out)


def clean_alpaca(n: int, seed: int = 0, n_instr: int = 12, n_out: int = 30) -> list[dict]:
    rng, v = random.Random(seed), vocab(seed=seed)
    return [{"instruction": " ".join(rng.choice(v) for _ in range(n_instr)).capitalize() + ".",
             "output": " ".join(rng.choice(v) for _ in range(n_out)) + "."} for _ in range(n)]


# --- MinHash / LSH building blocks ------------------------------------------------------------------

def test_signatures_equal_datasketch_minhash():
    import xxhash
    from datasketch import MinHash

    texts = ["Write a poem about the sea, please!", "hi", "the quick brown fox " * 5, "word " * 40000]
    hasher = MinHasher(num_perm=64, seed=3)
    sigs = hasher.signatures([shingle_hashes(normalize_text(t), 3) for t in texts])
    for t, sig in zip(texts, sigs):
        m = MinHash(num_perm=64, seed=3, hashfunc=xxhash.xxh32_intdigest)
        m.update_batch([s.encode() for s in shingles(normalize_text(t), 3)])
        assert np.array_equal(m.hashvalues, sig)


def test_sorted_multimap_matches_a_dict():
    rng = np.random.default_rng(0)
    table, ref, next_id = SortedMultimap(), {}, 0
    for _ in range(40):
        n = int(rng.integers(1, 120))
        keys = rng.integers(0, 200, n).astype(np.uint64)
        ids = np.arange(next_id, next_id + n)
        next_id += n
        table.add(keys, ids)
        for k, i in zip(keys.tolist(), ids.tolist()):
            ref.setdefault(k, []).append(i)
    q = np.arange(260, dtype=np.uint64)
    first = table.first(q)
    assert [int(x) for x in first] == [ref[k][0] if k in ref else -1 for k in range(260)]
    qi, vals = table.pairs(q, limit=10**9)
    got: dict[int, list[int]] = {}
    for a, b in zip(qi.tolist(), vals.tolist()):
        got.setdefault(a, []).append(b)
    assert {k: sorted(v) for k, v in got.items()} == ref


def test_colliding_pairs_match_brute_force():
    from instructkit.curate.minhash import colliding_pairs

    keys = np.random.default_rng(1).integers(0, 12, size=(60, 4)) + 100 * np.arange(4)  # keys differ per band
    keys = keys.astype(np.uint64)
    later, earlier = colliding_pairs(keys, limit=10**9)
    got = set(zip(later.tolist(), earlier.tolist()))
    want = {(j, i) for j in range(60) for i in range(j) if (keys[i] == keys[j]).any()}
    assert got == want
    later, earlier = colliding_pairs(keys, limit=2)  # at most the 2 oldest rows of each bucket
    assert got >= set(zip(later.tolist(), earlier.tolist())) and len(later) < len(got)


def test_normalisation_and_leading_words():
    assert normalize_text("  Hello,   WORLD!! Ｆｕｌｌ-width ") == "hello world full width"
    assert words("It's 3:15 p.m.") == ["it", "s", "3", "15", "p", "m"]
    assert leading_word("Please, can you write a haiku?") == "write"
    assert leading_word("I want you to act as a tutor") == "act"
    assert leading_word("   ") is None


# --- Dedup -------------------------------------------------------------------------------------------

def plant_duplicates(seed: int = 1):
    """2000 clean records + 150 exact (case/punctuation/spacing) and 150 near (one word changed)."""
    rng = random.Random(seed)
    rows = clean_alpaca(2000, seed=seed)
    truth = [None] * len(rows)
    originals = [rows[j] for j in rng.sample(range(2000), 300)]
    for k, src in enumerate(originals):
        if k < 150:
            dup = {"instruction": "  " + src["instruction"].upper().replace(".", "!"),
                   "output": src["output"].replace(" ", "  ", 3).rstrip(".") + " ..."}
            kind = "exact"
        else:
            out = src["output"].split()
            out[rng.randrange(5, 25)] = "zzzchanged"
            dup = {"instruction": src["instruction"], "output": " ".join(out)}
            kind = "near"
        here = next(i for i, r in enumerate(rows) if r is src)
        pos = rng.randint(here + 1, len(rows))  # always after its original
        rows.insert(pos, dup)
        truth.insert(pos, (kind, id(src)))
    lines = {id(r): i + 1 for i, r in enumerate(rows)}
    return rows, [None if t is None else (t[0], lines[t[1]]) for t in truth]


def test_dedup_file_planted_recall_and_clean_records_kept(tmp_path):
    rows, truth = plant_duplicates()
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    res = dedup_file(src, tmp_path / "out.jsonl", report_path=tmp_path / "removed.jsonl")
    removed = {r["line"]: r for r in read_jsonl(tmp_path / "removed.jsonl")}
    exact = [(i + 1, t[1]) for i, t in enumerate(truth) if t and t[0] == "exact"]
    near = [(i + 1, t[1]) for i, t in enumerate(truth) if t and t[0] == "near"]
    # Exact duplicates (case, punctuation, spacing): all found, each pointing at its original.
    assert all(removed[line]["rule"] == "exact" and removed[line]["matched_line"] == orig
               and removed[line]["jaccard"] == 1.0 for line, orig in exact)
    # Near duplicates (1 of 42 words changed, true Jaccard ~0.86): recall >= 90%, matched correctly.
    found = [line for line, orig in near if line in removed and removed[line]["matched_line"] == orig]
    assert len(found) / len(near) >= 0.9, len(found)
    assert all(removed[line]["rule"] == "near" and 0.8 <= removed[line]["jaccard"] < 1 for line in found)
    # Precision: no clean record is removed, and kept records are written unchanged, in order.
    clean_lines = [i + 1 for i, t in enumerate(truth) if t is None]
    assert not set(clean_lines) & set(removed)
    kept = read_jsonl(tmp_path / "out.jsonl")
    assert kept[: len(clean_lines)][:5] == [rows[i - 1] for i in clean_lines[:5]]
    assert res.kept == len(kept) == len(rows) - len(removed)
    assert res.exact == len(exact) and res.near == len(removed) - len(exact)


def test_dedup_is_exact_only_when_near_is_off_and_handles_pairs():
    pairs = [{"prompt": [{"role": "user", "content": "Name a colour."}],
              "chosen": [{"role": "assistant", "content": "Blue."}],
              "rejected": [{"role": "assistant", "content": "Seven."}]}] * 2
    kept, removed = dedup_records(pairs, DedupConfig(near=False))
    assert len(kept) == 1 and removed[0][1].rule == "exact"
    # Two texts of Jaccard ~0.6 are not near duplicates at 0.8 but are at 0.5.
    a = "one two three four five six seven eight nine ten eleven twelve"
    b = "one two three four five six seven eight nine ten ZZ twelve"
    with Deduplicator(DedupConfig(threshold=0.8)) as d:
        assert d.process([a, b]) == [None, None]
    with Deduplicator(DedupConfig(threshold=0.5)) as d:
        out = d.process([a, b])
        assert out[0] is None and out[1].rule == "near" and out[1].kept == 0


# --- Decontamination ----------------------------------------------------------------------------------

def eval_files(shared_data: Path) -> list[Path]:
    return [shared_data / "ifeval/input_data.jsonl", shared_data / "mt_bench/question.jsonl",
            shared_data / "mt_bench/reference_answer_gpt4.jsonl",
            shared_data / "self_instruct/user_oriented_instructions.jsonl"]


def paraphrase(text: str, rng: random.Random, n_changes: int) -> str:
    """A light paraphrase: a few words replaced, different case, punctuation changed."""
    w = text.split()
    for j in rng.sample(range(len(w)), n_changes):
        w[j] = rng.choice(["certain", "various", "really", "quite", "several"])
    out = " ".join(w).replace(",", " ;").replace(".", "")
    return out.upper() if rng.random() < 0.5 else out.lower()


def test_decontaminate_finds_planted_copies_and_paraphrases(shared_data, tmp_path):
    rng = random.Random(0)
    ifeval = read_jsonl(shared_data / "ifeval/input_data.jsonl")
    mt = read_jsonl(shared_data / "mt_bench/question.jsonl")
    ref = read_jsonl(shared_data / "mt_bench/reference_answer_gpt4.jsonl")
    si = read_jsonl(shared_data / "self_instruct/user_oriented_instructions.jsonl")
    # Clean: real human-written Self-Instruct *seed* tasks (same style, different items) + random text.
    seed_tasks = read_jsonl(shared_data / "self_instruct/seed_tasks.jsonl")
    clean = [{"instruction": t["instruction"], "input": t["instances"][0]["input"],
              "output": t["instances"][0]["output"]} for t in seed_tasks] + clean_alpaca(300, seed=5)
    planted = []  # (record, kind, eval file name, eval line)
    for i in rng.sample(range(len(ifeval)), 20):
        planted.append(({"instruction": ifeval[i]["prompt"], "output": "Sure."}, "copy", "input_data.jsonl", i + 1))
    for i in rng.sample(range(len(mt)), 10):
        planted.append(({"instruction": mt[i]["turns"][0], "output": "Okay."}, "copy", "question.jsonl", i + 1))
    for i in rng.sample(range(len(si)), 10):
        planted.append(({"instruction": si[i]["instruction"], "input": si[i]["instances"][0]["input"],
                         "output": "Done."}, "copy", "user_oriented_instructions.jsonl", i + 1))
    for i in rng.sample(range(len(ref)), 5):  # a long reference answer leaked into a response
        planted.append(({"instruction": "Answer this.", "output": ref[i]["choices"][0]["turns"][0]},
                        "copy", "reference_answer_gpt4.jsonl", i + 1))
    long_ifeval = [i for i, r in enumerate(ifeval) if len(r["prompt"].split()) >= 20]
    for i in rng.sample(long_ifeval, 20):
        planted.append(({"instruction": paraphrase(ifeval[i]["prompt"], rng, 2), "output": "Sure."},
                        "paraphrase", "input_data.jsonl", i + 1))
    long_si = [i for i, r in enumerate(si) if len(r["instruction"].split()) >= 20]
    for i in rng.sample(long_si, 10):
        planted.append(({"instruction": paraphrase(si[i]["instruction"], rng, 1), "output": "Done."},
                        "paraphrase", "user_oriented_instructions.jsonl", i + 1))
    rows = clean + [p[0] for p in planted]
    rng.shuffle(rows)
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    res = decontaminate_file(src, eval_files(shared_data), tmp_path / "clean.jsonl",
                             report_path=tmp_path / "report.jsonl")
    report = {r["line"]: r for r in read_jsonl(tmp_path / "report.jsonl")}
    line_of = {json.dumps(r, sort_keys=True): i + 1 for i, r in enumerate(rows)}
    hits = {"copy": [], "paraphrase": []}
    for rec, kind, efile, eline in planted:
        r = report.get(line_of[json.dumps(rec, sort_keys=True)])
        hits[kind].append(bool(r and r["removed"] and Path(r["eval"]["file"]).name == efile
                               and r["eval"]["line"] == eline))
    assert all(hits["copy"]), hits["copy"]                          # every exact copy, right eval item
    assert sum(hits["paraphrase"]) / len(hits["paraphrase"]) >= 0.9  # light paraphrases
    # Every clean record is kept, and the output holds exactly the unflagged records.
    kept = read_jsonl(tmp_path / "clean.jsonl")
    assert all(c in kept for c in clean)
    assert res.removed == len(rows) - len(kept) and res.removed <= len(planted)
    # The evidence: the overlapping n-gram really is in the evaluation item and in the record.
    for r in report.values():
        if r["removed"]:
            item = read_jsonl(Path(r["eval"]["file"]))[r["eval"]["line"] - 1]
            assert r["ngram"] in normalize_text(dict(string_leaves(item))[r["eval"]["field"]])
            assert r["ngram"] in normalize_text(" ".join(rows[r["line"] - 1].values()))


def test_eval_index_ngram_sizes_fields_and_ids(shared_data):
    idx = build_index(eval_files(shared_data))
    by_file = {}
    for t in idx.texts:
        by_file.setdefault(Path(t.file).name, []).append(t)
    assert {t.n for t in by_file["reference_answer_gpt4.jsonl"] if t.n_words >= 64} == {13}
    assert {t.n for t in by_file["input_data.jsonl"] if 8 <= t.n_words < 64} == {8}
    assert all(t.field == "prompt" for t in by_file["input_data.jsonl"])  # not the checker kwargs
    assert {t.item_id for t in by_file["question.jsonl"]} <= set(range(81, 161))
    only = EvalIndex()
    only.add_file(shared_data / "self_instruct/user_oriented_instructions.jsonl", fields=["instruction"])
    assert {t.field for t in only.texts} == {"instruction"}
    with pytest.raises(DataError, match="instances"):
        EvalIndex().add_file(shared_data / "self_instruct/user_oriented_instructions.jsonl", fields=["question"])


# --- Mixing ---------------------------------------------------------------------------------------------

@pytest.fixture()
def mix_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a {i}", "output": "x", "family": "fa"}
                                           for i in range(900)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b {i}", "output": "y",
                                            "family": "fb1" if i % 2 else "fb2"} for i in range(100)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"instruction": f"c {i}", "output": "z"} for i in range(300)])
    return a, b, c


def test_mix_proportional_caps_and_family_shares(tmp_path, mix_sources):
    a, b, c = mix_sources
    cfg = MixConfig(sources=[{"path": str(a)}, {"path": str(b)}, {"path": str(c)}], seed=1)
    res = mix(cfg, tmp_path / "m1.jsonl")
    assert [s["count"] for s in res.sources] == [900, 100, 300]  # T=1: examples-proportional
    out = read_jsonl(tmp_path / "m1.jsonl")
    assert len(out) == 1300 and len({r["instruction"] for r in out}) == 1300  # no repeats
    assert res.families["fa"]["count"] == 900 and res.families["fb1"]["count"] == 50
    assert sum(v["share"] for v in res.families.values()) == pytest.approx(1000 / 1300, abs=1e-5)
    # A cap limits both the rate and the count: A contributes 200 distinct records.
    cfg = MixConfig(sources=[{"path": str(a), "cap": 200}, {"path": str(b)}, {"path": str(c)}], seed=1)
    res = mix(cfg, tmp_path / "m2.jsonl")
    out = read_jsonl(tmp_path / "m2.jsonl")
    from_a = [r for r in out if r["source"] == "a"]
    assert [s["count"] for s in res.sources] == [200, 100, 300]
    assert len(from_a) == len({r["instruction"] for r in from_a}) == 200
    # With a larger total the cap still holds; the rest is split between the others by rate.
    cfg = MixConfig(sources=[{"path": str(a), "cap": 200}, {"path": str(b)}, {"path": str(c)}],
                    total=1000, seed=1)
    counts = [s["count"] for s in mix(cfg, tmp_path / "m3.jsonl").sources]
    assert counts[0] == 200 and sum(counts) == 1000 and counts[2] == pytest.approx(3 * counts[1], abs=1)


def test_mix_temperature_by_hand_and_determinism(tmp_path, mix_sources):
    a, b, _ = mix_sources
    # Hand check: sizes 900 and 100, T = 2: rates sqrt(900) : sqrt(100) = 30 : 10 = 0.75 : 0.25.
    assert mixture_rates([900, 100], [1, 1], [None, None], 2.0) == pytest.approx([0.75, 0.25])
    cfg = MixConfig(sources=[{"path": str(a)}, {"path": str(b)}], temperature=2.0, total=1000, seed=3)
    res = mix(cfg, tmp_path / "t.jsonl")
    assert [s["count"] for s in res.sources] == [750, 250]
    assert res.sources[1]["unique"] == 100 and res.sources[1]["max_repeats"] == 3  # 2.5x upsampled
    out = read_jsonl(tmp_path / "t.jsonl")
    assert sum(r["source"] == "b" for r in out) == 250
    # T -> large flattens toward equal shares; weights multiply the rate.
    p = mixture_rates([900, 100], [1, 1], [None, None], 100.0)
    assert p[0] == pytest.approx(900 ** 0.01 / (900 ** 0.01 + 100 ** 0.01)) and abs(p[0] - 0.5) < 0.01
    assert mixture_rates([100, 100], [3, 1], [None, None], 1.0) == pytest.approx([0.75, 0.25])
    # Same seed, same bytes; another seed, another order.
    mix(cfg, tmp_path / "t2.jsonl")
    assert (tmp_path / "t.jsonl").read_bytes() == (tmp_path / "t2.jsonl").read_bytes()
    mix(cfg.model_copy(update={"seed": 4}), tmp_path / "t3.jsonl")
    assert (tmp_path / "t.jsonl").read_bytes() != (tmp_path / "t3.jsonl").read_bytes()


def test_mix_config_errors_suggest_keys(tmp_path, mix_sources):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"sources:\n  - path: {mix_sources[0]}\n    wieght: 2\ntemprature: 2\n")
    with pytest.raises(DataError) as e:
        load_mix_config(bad)
    msg = str(e.value)
    assert "sources[0].wieght" in msg and "Did you mean 'weight'" in msg and "'temperature'" in msg
    bad.write_text("sources: []\n")
    with pytest.raises(DataError, match="sources"):
        load_mix_config(bad)
    with pytest.raises(DataError, match="not found"):
        mix(MixConfig(sources=[{"path": str(tmp_path / "missing.jsonl")}]), tmp_path / "o.jsonl")


# --- Scoring and selection ------------------------------------------------------------------------------

SCORE_RECS = [
    {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 3, 1, 2."},
                  {"role": "assistant", "content": "1, 2, 3"}, {"role": "user", "content": "Reverse it."},
                  {"role": "assistant", "content": "3, 2, 1"}]},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Seven."}]},
]


def direct_mean_nll(model, ids: list[int], labels: list[int]) -> float:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    pos = [t for t in range(1, len(ids)) if labels[t] != -100]
    return float(-sum(logp[t - 1, ids[t]] for t in pos) / len(pos))


def test_ifd_equals_the_ratio_computed_directly(tiny_model_dir):
    from instructkit.curate.score import score_examples
    from instructkit.curate.text import prompt_and_reply
    from instructkit.data.encode import encode_messages
    from instructkit.models import load_for_inference

    model, tok = load_for_inference(tiny_model_dir)
    rows = score_examples(model, tok, SCORE_RECS, batch_size=2)
    rows1 = score_examples(model, tok, SCORE_RECS, batch_size=1)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for rec, row, row1 in zip(SCORE_RECS, rows, rows1):
        prompt, reply = prompt_and_reply(rec)
        enc = encode_messages(tok, prompt + [reply], template=tok.chat_template, train_on="last_assistant")
        targets = [t for t in enc.labels if t != -100]
        assert tok.decode(targets).startswith(reply["content"])  # the reply tokens (+ end of turn)
        cond = direct_mean_nll(model, enc.input_ids, enc.labels)
        alone = direct_mean_nll(model, [start] + targets, [-100] + targets)
        assert row["loss_given_instruction"] == pytest.approx(cond, abs=1e-4)
        assert row["loss_response_alone"] == pytest.approx(alone, abs=1e-4)
        assert row["ifd"] == pytest.approx(cond / alone, rel=1e-4)
        assert row["ppl"] == pytest.approx(math.exp(cond), rel=1e-4)
        assert row["response_tokens"] == len(targets)
        assert row == pytest.approx(row1, rel=1e-5)  # padding in a batch changes nothing


def test_select_top_fraction_with_diversity_filter(tmp_path):
    rng = random.Random(0)
    v = vocab(seed=2)
    rows = [{"instruction": f"task {i}", "output": " ".join(rng.choice(v) for _ in range(5 + i % 40))}
            for i in range(100)]
    longest = " ".join(rng.choice(v) for _ in range(80))
    for k in range(4):  # near copies of the longest answer: only one may be selected
        rows.insert(10 + 20 * k, {"instruction": "task long", "output": longest + f" extra{k}"})
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    from instructkit.curate.score import select_file

    res = select_file(src, tmp_path / "sel.jsonl", by="response_length", top=0.1,
                      report_path=tmp_path / "sel.report.jsonl")
    sel = read_jsonl(tmp_path / "sel.jsonl")
    assert res.target == 10 and res.selected == len(sel) == 10
    assert sum(r["instruction"] == "task long" for r in sel) == 1 and res.skipped_for_diversity == 3
    lens = sorted((len(r["output"].split()) for r in rows if r["instruction"] != "task long"), reverse=True)
    assert sorted(len(r["output"].split()) for r in sel if r["instruction"] != "task long") == \
        sorted(lens[:9])
    assert [rows.index(r) for r in sel] == sorted(rows.index(r) for r in sel)  # file order
    skipped = [r for r in read_jsonl(tmp_path / "sel.report.jsonl") if not r["selected"]]
    assert all(r["similar_to_line"] == 11 and r["jaccard"] >= 0.7 for r in skipped)
    # Selection by a precomputed signal; IFD >= 1 is excluded (the instruction does not help).
    scores = write_jsonl(tmp_path / "scores.jsonl", [{"file": str(src), "line": i + 1, "ifd": x}
                                                      for i, x in enumerate(np.linspace(0.2, 1.2, len(rows)))])
    res = select_file(src, tmp_path / "sel2.jsonl", by="ifd", top=0.05, scores=scores, diversity=None)
    assert res.excluded["ifd_at_least_1"] == sum(x >= 1 for x in np.linspace(0.2, 1.2, len(rows)))
    top = read_jsonl(tmp_path / "sel2.jsonl")
    assert len(top) == 5 and all(x < 1 for x in [0.2 + rows.index(r) / (len(rows) - 1) for r in top])


# --- Report ------------------------------------------------------------------------------------------------

def test_report_files_counts_and_png(tmp_path, shared_data):
    import matplotlib.image as mpimg

    from instructkit.curate.report import write_report

    ifeval = read_jsonl(shared_data / "ifeval/input_data.jsonl")
    rows = [{"instruction": f"Write {w} about item {i}.", "output": "word " * (3 + i % 20), "family": f"f{i % 3}"}
            for i, w in enumerate(["a poem", "a story", "a list"] * 20)]
    rows.append(dict(rows[0]))                                                    # 1 exact duplicate
    rows.append({"instruction": ifeval[0]["prompt"], "output": "Done.", "family": "f0"})  # contaminated
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(src, "a") as fh:
        fh.write('{"instruction": "no output"}\n')                                # 1 invalid record
    stats = write_report([src], tmp_path / "rep", against=[shared_data / "ifeval/input_data.jsonl"])
    for name in ("report.md", "report.html", "report.json", "lengths.png", "leading_words.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    img = mpimg.imread(tmp_path / "rep" / "lengths.png")
    assert img.shape[0] > 200 and img.shape[1] > 500 and float(img[..., :3].std()) > 0.05  # not blank
    assert stats["valid"] == 62 and stats["skipped"] == 1 and stats["families"]["f0"] == 22
    assert stats["duplicates"]["exact"] == 1 and stats["contamination"]["contaminated"] == 1
    assert stats["leading_words"]["write"] == 62 and stats["formats"] == {"alpaca": 62}
    assert "missing" in stats["skipped_examples"][0]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![lengths](lengths.png)" in md and "input_data.jsonl:1 (id 1000)" in md
    assert "<table>" in (tmp_path / "rep" / "report.html").read_text()


# --- Training config block -----------------------------------------------------------------------------

def test_data_curate_config_block_removes_and_reports(tmp_path, shared_data, tiny_tokenizer):
    from instructkit.config import ConfigError, load_config
    from instructkit.data.pipeline import load_sft_data

    ifeval = read_jsonl(shared_data / "ifeval/input_data.jsonl")
    rows = clean_alpaca(40, seed=7)
    rows += [dict(rows[3]), {"instruction": ifeval[5]["prompt"], "output": "ok"}]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    raw = {"model": {"name_or_path": "x"}, "data": {"train": str(src), "template": "chatml", "curate": {
        "decontaminate_against": [str(shared_data / "ifeval/input_data.jsonl")]}}}
    cfg = load_config(raw=raw)
    assert cfg.data.curate.dedup and cfg.data.curate.near_dup_threshold == 0.8
    data = load_sft_data(cfg.data, tiny_tokenizer, "chatml", seed=0)
    assert len(data.train) == 40
    reasons = {r.reason: r for r in data.report.records}
    assert set(reasons) == {"exact_duplicate", "contaminated"}
    assert "t.jsonl:4" in reasons["exact_duplicate"].message and reasons["exact_duplicate"].line == 41
    assert "input_data.jsonl:6" in reasons["contaminated"].message
    with pytest.raises(ConfigError, match="data.curate.dedup"):
        load_config(raw={**raw, "data": {"train": str(src), "curate": {"dedupe": True}}})


def test_curation_used_by_data_never_imports_training_code():
    import ast

    pkg = Path(__file__).resolve().parents[1] / "instructkit" / "curate"
    for name in ("apply", "dedup", "decontam", "minhash", "mix", "text", "validate"):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        bad = [m for m in mods if m.startswith(("instructkit.loop", "instructkit.losses", "instructkit.methods",
                                                "instructkit.models", "torch"))]
        assert not bad, (name, bad)


# --- CLI end to end and bad input ----------------------------------------------------------------------

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instructkit", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_cli_every_command(tmp_path, tiny_model_dir, shared_data, capsys):
    from instructkit.cli import main

    rows, _ = plant_duplicates(seed=3)
    rows = rows[:400] + [{"instruction": read_jsonl(shared_data / "mt_bench/question.jsonl")[0]["turns"][0],
                          "output": "A blog post."}]
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    # dedup through a real subprocess, as a user runs it
    p = run_cli("data", "dedup", src, "--out", tmp_path / "dd.jsonl")
    assert p.returncode == 0, p.stderr
    assert "removed" in p.stdout and str(tmp_path / "dd.removed.jsonl") in p.stdout
    n_dd = len(read_jsonl(tmp_path / "dd.jsonl"))
    assert n_dd < len(rows)

    def cli(*args) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().out

    code, out = cli("data", "validate", src, "--json")
    assert code == 0 and json.loads(out)["valid"] == len(rows) and json.loads(out)["format"] == "alpaca"
    code, out = cli("data", "decontaminate", tmp_path / "dd.jsonl", "--against",
                    shared_data / "mt_bench/question.jsonl", "--out", tmp_path / "dc.jsonl", "--json")
    res = json.loads(out)
    assert code == 0 and res["removed"] == 1 and res["kept"] == n_dd - 1
    mixcfg = tmp_path / "mix.yaml"
    mixcfg.write_text(f"seed: 0\ntemperature: 2\nsources:\n  - path: {tmp_path / 'dc.jsonl'}\n"
                      f"  - path: {src}\n    cap: 50\n    name: raw\n")
    code, out = cli("data", "mix", mixcfg, "--out", tmp_path / "mix.jsonl")
    assert code == 0 and "raw" in out and len(read_jsonl(tmp_path / "mix.jsonl")) == n_dd - 1 + 50
    small = write_jsonl(tmp_path / "small.jsonl", read_jsonl(tmp_path / "dc.jsonl")[:12])
    code, out = cli("data", "score", small, "--model", tiny_model_dir, "--out", tmp_path / "sc.jsonl")
    scored = read_jsonl(tmp_path / "sc.jsonl")
    assert code == 0 and len(scored) == 12 and all(r["ifd"] > 0 for r in scored)
    code, out = cli("data", "select", small, "--by", "ifd", "--top", "0.5", "--scores", tmp_path / "sc.jsonl",
                    "--keep-ifd-above-1", "--out", tmp_path / "sel.jsonl")
    assert code == 0 and len(read_jsonl(tmp_path / "sel.jsonl")) == 6, out
    code, out = cli("data", "report", src, "--out", tmp_path / "rep", "--model", tiny_model_dir,
                    "--against", shared_data / "mt_bench/question.jsonl")
    assert code == 0 and "contamination: 1" in out
    assert "tokens" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_bad_input_is_clear(tmp_path, capsys):
    from instructkit.cli import main

    src = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"},
                                              {"instruction": "c", "outptu": "d"}])
    assert main(["data", "dedup", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    assert main(["data", "dedup", str(src), "--out", str(src)]) == 2
    assert "the output is the input file" in capsys.readouterr().err
    assert main(["data", "decontaminate", str(src), "--against", str(tmp_path / "eval.jsonl"),
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "eval.jsonl: file not found" in capsys.readouterr().err
    assert main(["data", "validate", str(src)]) == 1
    out = capsys.readouterr().out
    assert "t.jsonl:2 field 'output' [missing_field]" in out and "Fix:" in out
    bad = tmp_path / "m.yaml"
    bad.write_text(f"sources:\n  - path: {src}\n    wieght: 1\n")
    assert main(["data", "mix", str(bad), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "Did you mean 'weight'" in capsys.readouterr().err
    assert main(["data", "select", str(src), "--by", "beauty", "--top", "0.5", "--out",
                 str(tmp_path / "s.jsonl")]) == 2
    assert "unknown signal 'beauty'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "select", str(src), "--by", "ifd", "--top", "0", "--out", str(tmp_path / "s.jsonl")])
    assert e.value.code == 2 and "expected a number in (0, 1]" in capsys.readouterr().err
    assert main(["data", "select", str(src), "--by", "ifd", "--top", "0.5", "--out",
                 str(tmp_path / "s.jsonl")]) == 2
    assert "needs a model" in capsys.readouterr().err
