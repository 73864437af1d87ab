"""Preference training end to end: pair encoding and batching, sequence log-probs (packed = padded),
reference precompute = live, agreement with TRL's DPO loss, every method through the CLI, reward
models, scoring and best-of-n."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from instructkit.config import DataConfig, load_config
from instructkit.data.encode import IGNORE_INDEX
from instructkit.data.errors import DataError
from instructkit.data.pairs import load_pair_data, plan_pair_batches
from instructkit.data.templates import resolve_template
from instructkit.losses import dpo_loss
from instructkit.models import unit_logps

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "instructkit", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def skills(tmp_path_factory):
    from instructkit.synth.skills import write_skills

    return write_skills(tmp_path_factory.mktemp("skills"), seed=0, n_train=240, n_val=62, n_heldout_phrasing=31,
                        n_heldout_family=8, n_corpus=100)


def pairs_file(tmp_path, rows) -> Path:
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def data_cfg(train, **kw) -> DataConfig:
    return DataConfig(train=str(train), **kw)


def test_pair_encoding_shares_prompt_and_targets_only_responses(tmp_path, tiny_tokenizer):
    f = pairs_file(tmp_path, [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "five"},
                              {"prompt": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Say hi"}],
                               "chosen": "hi", "rejected": "hello there"}])
    tmpl = resolve_template(tiny_tokenizer, "auto")
    data = load_pair_data(data_cfg(f), tiny_tokenizer, tmpl, seed=0)
    assert data.n_train == 2 and data.n_eval == 0 and data.n_truncated == 0
    for (c, r), (want_c, want_r) in zip(data.units, [("4", "five"), ("hi", "hello there")]):
        n = next(i for i, t in enumerate(c.labels) if t != IGNORE_INDEX)
        assert c.input_ids[:n] == r.input_ids[:n]  # one shared prompt rendering
        trained = tiny_tokenizer.decode([t for t in c.labels if t != IGNORE_INDEX])
        assert trained.startswith(want_c) and "What is" not in trained and "Say hi" not in trained
        assert tiny_tokenizer.decode([t for t in r.labels if t != IGNORE_INDEX]).startswith(want_r)


def test_truncation_keeps_prompt_end_and_is_counted(tmp_path, tiny_tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(200)) + " QUESTION?"
    f = pairs_file(tmp_path, [{"prompt": long_prompt, "chosen": "yes", "rejected": "no"},
                              {"prompt": "short", "chosen": "a", "rejected": "b"}])
    tmpl = resolve_template(tiny_tokenizer, "auto")
    data = load_pair_data(data_cfg(f, max_length=64), tiny_tokenizer, tmpl, seed=0)
    assert data.n_truncated == 1
    c, r = data.units[0]
    assert len(c.input_ids) <= 64 and "QUESTION?" in tiny_tokenizer.decode(c.input_ids)
    assert "word0 " not in tiny_tokenizer.decode(c.input_ids)
    with pytest.raises(DataError, match="max_length"):
        load_pair_data(data_cfg(f, max_length=64), tiny_tokenizer, tmpl, seed=0, truncation="error")


def test_bad_pairs_reported_with_lines(tmp_path, tiny_tokenizer):
    f = pairs_file(tmp_path, [{"prompt": "q", "chosen": "same", "rejected": "same"},
                              {"prompt": "q", "chosen": "", "rejected": "b"},
                              {"prompt": "q", "chosen": "good", "rejected": "bad"}])
    tmpl = resolve_template(tiny_tokenizer, "auto")
    with pytest.raises(DataError) as e:
        load_pair_data(data_cfg(f), tiny_tokenizer, tmpl, seed=0)
    assert ":1" in str(e.value) and "rejected" in str(e.value)
    data = load_pair_data(data_cfg(f, on_error="skip"), tiny_tokenizer, tmpl, seed=0)
    assert data.n_train == 1
    assert sorted((r.line, r.reason) for r in data.report.records) == [(1, "identical_pair"), (2, "empty_content")]


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_packed_and_padded_logps_agree_with_direct_computation(skills, tiny_model_dir, tiny_tokenizer):
    tmpl = resolve_template(tiny_tokenizer, "auto")
    data = load_pair_data(data_cfg(skills / "preference.jsonl", max_length=128), tiny_tokenizer, tmpl, seed=0)
    model = _model(tiny_model_dir)
    got = {}
    for packing in (True, False):
        plan = plan_pair_batches(data, split="train", packing=packing, micro_batch_size=4, max_length=128,
                                 pad_id=tiny_tokenizer.pad_token_id, seed=0, shuffle=True)
        table = torch.zeros(2 * data.n_train)
        with torch.no_grad():
            for b in plan.source(0):
                sums, counts = unit_logps(model, b)
                u = b["units"]
                table[2 * u], table[2 * u + 1] = sums[:, 0], sums[:, 1]
                for k, unit in enumerate(u.tolist()):
                    assert counts[k, 0] == data.units[unit][0].n_targets
        got[packing] = table
    # Packed rows use the shared-prompt layout (prompt once, two branches): same log-probs as
    # separate padded sequences, with fewer tokens.
    assert torch.allclose(got[True], got[False], atol=1e-4)
    from instructkit.data.pairs import shared_prompt_layout
    laid = [shared_prompt_layout(*u) for u in data.units]
    assert all(len(sh) > 0 for sh, _, _ in laid)
    assert sum(len(sh) + len(a) + len(b) for sh, (a, _), (b, _) in laid) < 0.8 * sum(len(s) for s in data.sequences)
    # Direct: one sequence alone through the plain HF forward with a full log-softmax.
    for s in (0, 1, 7):
        ex = data.sequences[s]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
        labels = torch.tensor(ex.labels[1:])
        keep = labels != IGNORE_INDEX
        direct = torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep][:, None]).sum()
        assert float(got[True][s]) == pytest.approx(float(direct), abs=1e-3)


def _validation_pairs_and_reward_model(skills, model_dir, tokenizer):
    """The skills validation pairs (max_length 128) and a fresh seeded reward model on ``model_dir``."""
    from transformers import AutoModelForSequenceClassification

    tmpl = resolve_template(tokenizer, "auto")
    data = load_pair_data(data_cfg(skills / "preference_validation.jsonl", max_length=128), tokenizer, tmpl,
                          seed=0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id).eval()
    return data, model


def test_reward_head_same_in_shared_and_padded_layouts(skills, tiny_model_dir, tiny_tokenizer):
    from instructkit.models import unit_rewards

    data, model = _validation_pairs_and_reward_model(skills, tiny_model_dir, tiny_tokenizer)
    got = {}
    for packing in (True, False):
        table = torch.zeros(2 * data.n_train)
        for b in plan_pair_batches(data, split="train", packing=packing, micro_batch_size=4, max_length=128,
                                   pad_id=tiny_tokenizer.pad_token_id, seed=0, shuffle=False).source(0):
            with torch.no_grad():
                r = unit_rewards(model, b)
            table[2 * b["units"]], table[2 * b["units"] + 1] = r[:, 0], r[:, 1]
        got[packing] = table
    assert torch.allclose(got[True], got[False], atol=1e-4)


def _untied_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model with a separate (perturbed) LM head, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, tie_word_embeddings=False)
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.clone()
                                                  + 0.05 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_reward_logprob_term_adds_the_replys_logprob(tied, skills, tiny_model_dir, tiny_tokenizer, tmp_path):
    """score = head(last hidden) + coef * summed reply log-prob of the causal LM, in both layouts."""
    from instructkit.config import ModelConfig
    from instructkit.models import output_head_weight, set_logprob_term, unit_rewards

    model_dir = tiny_model_dir if tied else _untied_copy(tiny_model_dir, tmp_path / "untied")
    data, rm = _validation_pairs_and_reward_model(skills, model_dir, tiny_tokenizer)
    causal = _model(model_dir)
    weight = output_head_weight(rm, ModelConfig(name_or_path=str(model_dir)), torch.device("cpu"))
    assert (weight is rm.get_input_embeddings().weight) == tied
    if not tied:  # the causal head, not the embeddings
        assert torch.equal(weight, causal.lm_head.weight) and not torch.equal(weight, rm.get_input_embeddings().weight)
    for packing in (True, False):
        for b in plan_pair_batches(data, split="train", packing=packing, micro_batch_size=4, max_length=128,
                                   pad_id=tiny_tokenizer.pad_token_id, seed=0, shuffle=False).source(0):
            with torch.no_grad():
                set_logprob_term(rm, 0.0, weight)
                plain = unit_rewards(rm, b)
                set_logprob_term(rm, 0.5, weight)
                with_term = unit_rewards(rm, b)
                logps, _ = unit_logps(causal, b)
            assert torch.allclose(with_term - plain, 0.5 * logps, atol=1e-4)


def test_reward_logprob_term_through_cli_and_score(tmp_path, tiny_model_dir, skills):
    """Training with the term records it; `instructkit score` applies it (untied head saved beside)."""
    model_dir = _untied_copy(tiny_model_dir, tmp_path / "untied")
    cfg = write_cfg(tmp_path, model_dir, skills, "reward", train={"max_steps": 4},
                    preference={"reward_logprob_coef": 0.5})
    p = cli("train", cfg)
    assert "+ 0.5 x reply log-probability" in p.stderr
    final = tmp_path / "run-reward" / "final"
    assert json.loads((final / "instructkit.json").read_text())["reward_logprob_coef"] == 0.5
    assert (final / "lm_head.safetensors").exists()
    eval_acc = read_metrics(tmp_path / "run-reward")[-1]["eval_accuracy"]
    out = tmp_path / "scores.jsonl"
    cli("score", "--reward", final, "--data", skills / "preference_validation.jsonl", "--out", out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / len(rows) == pytest.approx(eval_acc, abs=1e-6)
    # Without the term the scores differ by exactly coef x the reply's log-probability.
    plain_dir = tmp_path / "plain"
    import shutil
    shutil.copytree(final, plain_dir)
    (plain_dir / "instructkit.json").write_text(json.dumps({"reward_logprob_coef": 0.0}))
    cli("score", "--reward", plain_dir, "--data", skills / "preference_validation.jsonl", "--out", tmp_path / "p.jsonl")
    plain = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(r["reward_chosen"] < q["reward_chosen"] for r, q in zip(rows, plain))  # log-probs are negative
    # A model trained with the term whose untied head went missing is refused with the fix.
    (final / "lm_head.safetensors").unlink()
    bad = cli("score", "--reward", final, "--data", skills / "preference_validation.jsonl", "--out", out, check=False)
    assert bad.returncode != 0 and "lm_head.safetensors" in bad.stderr and "is missing" in bad.stderr
    # Tied embeddings: the head is the embedding table, nothing extra is saved.
    (tmp_path / "t").mkdir()
    cfg = write_cfg(tmp_path / "t", tiny_model_dir, skills, "reward", train={"max_steps": 2},
                    preference={"reward_logprob_coef": 1.0})
    cli("train", cfg)
    assert not (tmp_path / "t" / "run-reward" / "final" / "lm_head.safetensors").exists()


def _reference_and_nudged_policy(model_dir):
    """The tiny model as a reference, and a copy with seeded noise (std 0.02) added to every weight."""
    ref = _model(model_dir)
    policy = copy.deepcopy(ref)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref, policy


def test_dpo_loss_matches_trl(skills, tiny_model_dir, tiny_tokenizer, tmp_path):
    """Same model, same batch (TRL's own collated batch): instructkit's log-probs + DPO loss = TRL's."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    ref, policy = _reference_and_nudged_policy(tiny_model_dir)
    recs = [json.loads(x) for x in (skills / "preference.jsonl").read_text().splitlines()[:6]]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in recs])
    tok = copy.deepcopy(tiny_tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=6,
                         report_to="none", use_cpu=True, max_length=128, precompute_ref_log_probs=False,
                         bf16=False)  # TRL defaults to bf16 autocast, even on CPU; compare in fp32
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(policy, batch))
    # The same rows as an instructkit pair batch: rows [chosen..., rejected...] -> sequences 2u, 2u+1.
    n = batch["input_ids"].shape[0] // 2
    rows = torch.arange(2 * n)
    seq_of_row = torch.where(rows < n, 2 * rows, 2 * (rows - n) + 1)
    mask = batch["attention_mask"].bool()
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX),
            "example_index": torch.where(mask, seq_of_row[:, None].expand_as(mask), -1),
            "units": torch.arange(n)}
    with torch.no_grad():
        pol, _ = unit_logps(policy, ours)
        rf, _ = unit_logps(ref, ours)
    mine = float(dpo_loss(pol[:, 0], pol[:, 1], rf[:, 0], rf[:, 1], beta=0.1).mean())
    assert abs(mine - trl_loss) < 1e-4, (mine, trl_loss)
    assert abs(trl_loss - 0.693147) > 1e-3  # the policy really differs from the reference


def write_cfg(tmp_path, model_dir, skills, method, **sections) -> Path:
    cfg = {"method": method, "seed": 0, "output_dir": str(tmp_path / f"run-{method}"),
           "model": {"name_or_path": str(model_dir)},
           "data": {"train": str(skills / "preference.jsonl"), "eval": str(skills / "preference_validation.jsonl"),
                    "max_length": 128},
           "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "progress": False, "eval_every": 4},
           "preference": {"reference_cache": str(tmp_path / "refcache")}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo", "kto"])
def test_methods_train_through_cli(method, tmp_path, tiny_model_dir, skills):
    cfg = write_cfg(tmp_path, tiny_model_dir, skills, method)
    p = cli("train", cfg)
    run = tmp_path / f"run-{method}"
    metrics = read_metrics(run)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 4 and all(m["loss"] == m["loss"] for m in steps)
    assert "eval_loss" in metrics[-1] and "eval_accuracy" in metrics[-1]
    assert "accuracy" in steps[0]
    if method in ("dpo", "simpo", "orpo"):
        assert {"reward_chosen", "reward_rejected", "reward_margin", "logp_chosen", "logp_rejected"} <= set(steps[0])
        assert "pairs_per_s" in steps[0]
    if method == "dpo":
        # Step 1 starts at the reference: the loss is exactly ln 2.
        assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
        assert "reference log-probs: computed" in p.stderr
    if method == "kto":
        assert "kl" in steps[0]
    assert (run / "final" / "config.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["truncated"] == 0


def test_dpo_reference_cache_and_live_lora_agree(tmp_path, tiny_model_dir, skills):
    cfg = write_cfg(tmp_path, tiny_model_dir, skills, "dpo")
    first = cli("train", cfg)
    again = cli("train", cfg)
    assert "reference log-probs: computed" in first.stderr and "reference log-probs: loaded" in again.stderr
    assert [m["loss"] for m in read_metrics(tmp_path / "run-dpo") if "loss" in m]
    # LoRA: precomputed (adapters off) and live (adapter-disabled base) give the same trajectory.
    lora = {"enabled": True, "r": 4, "alpha": 8}
    pre = cli("train", cfg, "output_dir=" + str(tmp_path / "pre"), "lora.enabled=true", "lora.r=4")
    live = cli("train", cfg, "output_dir=" + str(tmp_path / "live"), "lora.enabled=true", "lora.r=4",
               "preference.reference=live")
    assert lora and pre.returncode == live.returncode == 0
    a = [m["loss"] for m in read_metrics(tmp_path / "pre") if "loss" in m]
    b = [m["loss"] for m in read_metrics(tmp_path / "live") if "loss" in m]
    assert a == pytest.approx(b, abs=1e-5)
    assert (tmp_path / "live" / "final" / "adapter_config.json").exists()


def test_reward_model_score_and_best_of_n(tmp_path, tiny_model_dir, skills):
    from transformers import AutoModelForSequenceClassification

    cfg = write_cfg(tmp_path, tiny_model_dir, skills, "reward", train={"max_steps": 6})
    p = cli("train", cfg)
    assert "eval pairwise accuracy" in p.stderr
    final = tmp_path / "run-reward" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    eval_acc = read_metrics(tmp_path / "run-reward")[-1]["eval_accuracy"]
    out = tmp_path / "scores.jsonl"
    s = cli("score", "--reward", final, "--data", skills / "preference_validation.jsonl", "--out", out)
    assert "pairwise_accuracy" in s.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    acc = sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / len(rows)
    assert acc == pytest.approx(eval_acc, abs=1e-6)  # scoring = training-time evaluation
    # Best-of-n with the reward model and with the skills verifier.
    bon = tmp_path / "bon"
    cli("best-of-n", "--model", tiny_model_dir, "--prompts", skills / "validation.jsonl", "--n", "3", "--reward",
        final, "--out", bon, "--limit", "4", "--max-new-tokens", "8")
    best = [json.loads(x) for x in (bon / "best.jsonl").read_text().splitlines()]
    assert len(best) == 4 and all(b["best_score"] == max(b["scores"]) for b in best)
    assert all(b["messages"][-1]["role"] == "assistant" and b["source_line"] for b in best)
    pairs = [json.loads(x) for x in (bon / "pairs.jsonl").read_text().splitlines()]
    assert all(q["score_chosen"] > q["score_rejected"] for q in pairs)
    summary = json.loads((bon / "summary.json").read_text())
    assert summary["pairs_written"] + summary["no_pair_all_scores_equal"] == 4
    v = cli("best-of-n", "--model", tiny_model_dir, "--prompts", skills / "validation.jsonl", "--n", "2",
            "--verifier", "skills", "--out", tmp_path / "bon-v", "--limit", "3", "--max-new-tokens", "8")
    assert "3 prompts x 2 samples" in v.stdout
    bad = cli("best-of-n", "--model", tiny_model_dir, "--prompts", skills / "validation.jsonl", "--out",
              tmp_path / "x", check=False)
    assert bad.returncode == 2 and "exactly one scorer" in bad.stderr


def test_preference_config_errors():
    raw = {"method": "dpo", "model": {"name_or_path": "m"}, "data": {"train": "t"}}
    cfg = load_config(raw=raw, overrides=["preference.loss_type=ipo", "preference.beta=0.5"])
    assert cfg.preference.loss_type == "ipo" and cfg.preference.beta == 0.5
    with pytest.raises(Exception, match="preference.orpo_lambda"):
        load_config(raw=raw, overrides=["preference.lambda=0.2"])
    with pytest.raises(Exception, match="loss_type"):
        load_config(raw=raw, overrides=["preference.loss_type=sigmod"])


# --- reference cache key, live frozen reference, native KTO, right truncation, DPO loss variants ---


def _copy_model(model_dir: Path, out: Path) -> Path:
    import shutil

    shutil.copytree(model_dir, out)
    return out


def test_reference_cache_key_tracks_model_data_template_and_truncation(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The cache key changes with the model's files, the pairs, the template and the truncation, and
    only with them: identical inputs (re-encoded from scratch) give the identical key."""
    from instructkit.reference import cache_key

    model = _copy_model(tiny_model_dir, tmp_path / "model")
    long_prompt = " ".join(f"word{i}" for i in range(15)) + " QUESTION?"  # ~45 tokens with the template
    rows = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "five"},
            {"prompt": long_prompt, "chosen": " ".join(f"step {i}." for i in range(10)), "rejected": "no"}]
    f = pairs_file(tmp_path, rows)
    auto = resolve_template(tiny_tokenizer, "auto")

    def seqs(path=f, template=auto, max_length=64, truncation="keep_end"):
        return load_pair_data(data_cfg(path, max_length=max_length), tiny_tokenizer, template, seed=0,
                              truncation=truncation).sequences

    def key(path=model, sequences=None, extra=None):
        return cache_key(str(path), None, seqs() if sequences is None else sequences,
                         {"dtype": "float32", "n_added": 0} if extra is None else extra)

    base = key()
    assert len(base) == 24 and all(c in "0123456789abcdef" for c in base)
    assert key() == base == key(sequences=seqs())  # identical inputs, encoded again: same key
    # Model: another weights file (same size, new content and mtime), a changed config, another folder.
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert weights.stat().st_size == st.st_size
    k_weights = key()
    assert k_weights != base
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (model / "config.json").write_text(json.dumps(cfg))
    k_config = key()
    assert k_config not in (base, k_weights)
    assert key() == k_config  # stable once the files stop changing
    assert key(path=tiny_model_dir) != k_config
    # Data: one different pair (another rejected reply).
    g = tmp_path / "other" / "pairs.jsonl"
    g.parent.mkdir()
    g.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], {**rows[1], "rejected": "nope"}]))
    k_data = key(sequences=seqs(g))
    # Template (alpaca renders differently from the tokenizer's ChatML) and truncation mode / length.
    k_template = key(sequences=seqs(template=resolve_template(tiny_tokenizer, "alpaca")))
    k_right = key(sequences=seqs(truncation="right"))
    k_len = key(sequences=seqs(max_length=80))
    k_dtype = key(extra={"dtype": "bfloat16", "n_added": 0})
    keys = [k_config, k_data, k_template, k_right, k_len, k_dtype]
    assert len(set(keys)) == len(keys), keys
    # Hub ids: the revision is part of the identity.
    s = seqs()
    assert cache_key("org/model", "main", s) != cache_key("org/model", "abc123", s)
    assert cache_key("org/model", "main", s) == cache_key("org/model", "main", s)


def test_reference_cache_key_follows_the_commit_a_hub_branch_resolves_to(tmp_path, monkeypatch):
    """A hub id's branch moves when the repo is updated: the key follows the commit that the branch resolves to
    in the local Hugging Face cache, so reference log-probs of the old weights are not reused."""
    import huggingface_hub.constants as hub_constants

    from instructkit.data.encode import EncodedExample
    from instructkit.reference import cache_key, hub_commit

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--model"
    old, new = "a" * 40, "b" * 40
    for commit in (old, new):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    seqs = [EncodedExample([1, 2, 3], [-100, 2, 3])]

    assert hub_commit("org/other", None) is None  # not cached: the name and revision are all the key has
    (repo / "refs" / "main").write_text(old)
    assert hub_commit("org/model", None) == hub_commit("org/model", "main") == old
    assert hub_commit("org/model", new) == new  # a pinned commit
    k_old = cache_key("org/model", "main", seqs)
    assert cache_key("org/model", "main", seqs) == k_old
    (repo / "refs" / "main").write_text(new)  # the repo was updated and downloaded again
    assert cache_key("org/model", "main", seqs) != k_old


def _pair_batch(tmp_path, tiny_tokenizer, n=4):
    """One padded pair batch of ``n`` short pairs (prompts and responses of different lengths)."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
             "rejected": "I do not know the answer to that one, sorry." + " really" * i} for i in range(n)]
    f = pairs_file(tmp_path, rows)
    data = load_pair_data(data_cfg(f, max_length=128), tiny_tokenizer, resolve_template(tiny_tokenizer, "auto"),
                          seed=0)
    plan = plan_pair_batches(data, split="train", packing=False, micro_batch_size=n, max_length=128,
                             pad_id=tiny_tokenizer.pad_token_id, seed=0, shuffle=False)
    (batch,) = list(plan.source(0))
    return data, batch


def _direct_logps(model, data, units) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 2) summed response log-probs and token counts, each sequence alone through the plain HF forward."""
    sums, counts = torch.zeros(len(units), 2), torch.zeros(len(units), 2)
    for k, u in enumerate(units):
        for side in (0, 1):
            ex = data.units[u][side]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            keep = labels != IGNORE_INDEX
            sums[k, side] = torch.log_softmax(logits.float(), -1)[keep].gather(-1, labels[keep][:, None]).sum()
            counts[k, side] = int(keep.sum())
    return sums, counts


def test_live_reference_for_full_finetuning_is_a_frozen_copy(tmp_path, tiny_model_dir, tiny_tokenizer):
    from instructkit.config import PreferenceConfig
    from instructkit.methods.preference import make_loss_fn
    from instructkit.reference import Reference

    data, batch = _pair_batch(tmp_path, tiny_tokenizer)
    policy = _model(tiny_model_dir).train()
    reference = Reference(model=policy, frozen_copy=True)  # what `reference: live` builds without LoRA
    frozen = reference.frozen
    assert frozen is not None and frozen is not policy and reference.table is None
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in policy.parameters())  # the policy itself is untouched
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in frozen.parameters()}  # no shared storage
    with torch.no_grad():
        start, _ = unit_logps(policy.eval(), batch)
    policy.train()
    ref0 = reference.logps(batch)
    assert not ref0.requires_grad
    assert torch.allclose(ref0, start, atol=1e-5)
    direct, _ = _direct_logps(policy, data, batch["units"].tolist())
    assert torch.allclose(ref0, direct, atol=1e-3)
    # One DPO step on the policy: its log-probs move, the reference's do not.
    loss_fn = make_loss_fn("dpo", PreferenceConfig(reference="live"), reference)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    out = loss_fn(policy, batch)
    assert float(out.loss_sum.detach()) / out.n_targets == pytest.approx(0.693147, abs=1e-4)  # policy = reference
    out.loss_sum.backward()
    assert all(p.grad is None for p in frozen.parameters())
    opt.step()
    with torch.no_grad():
        moved, _ = unit_logps(policy.eval(), batch)
    assert (moved - start).abs().max() > 1e-3
    assert torch.equal(reference.logps(batch), ref0)


def _kto_rows():
    return [{"prompt": "Name a colour.", "completion": "Blue.", "label": True},
            {"prompt": "What is 3+3?", "completion": "Six, of course.", "label": True},
            {"prompt": "Say hello.", "completion": "Goodbye forever!", "label": False},
            {"prompt": "Capital of France?", "completion": "Paris is the capital.", "label": True},
            {"prompt": "Count to three.", "completion": "one two four", "label": False},
            {"prompt": "Spell cat.", "completion": "c a t", "label": True}]


def test_kto_native_file_units_pair_each_prompt_with_another_completion(tmp_path, tiny_tokenizer):
    from instructkit.data.pairs import collate_units

    rows = _kto_rows()
    f = pairs_file(tmp_path, rows)
    tmpl = resolve_template(tiny_tokenizer, "auto")
    data = load_pair_data(data_cfg(f, max_length=128), tiny_tokenizer, tmpl, seed=0, kind="kto")
    assert data.n_train == len(rows) and data.n_eval == 0
    assert data.desirable == [r["label"] for r in rows]

    def target_text(ex):
        return tiny_tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=True).strip()

    completions = [r["completion"] for r in rows]
    partners = []
    for (own, other), row in zip(data.units, rows):
        n = next(i for i, t in enumerate(own.labels) if t != IGNORE_INDEX)
        assert own.input_ids[:n] == other.input_ids[:n]  # same prompt rendering
        assert row["prompt"] in tiny_tokenizer.decode(own.input_ids[:n])
        assert target_text(own) == row["completion"]
        mismatched = target_text(other)
        assert mismatched in completions and mismatched != row["completion"]
        partners.append(completions.index(mismatched))
    assert sorted(partners) == list(range(len(rows)))  # every completion is used once as a mismatch
    batch = collate_units(data, [0, 2, 3], None, pad_id=tiny_tokenizer.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True]
    # Same seed, same pairing (the cached reference log-probs stay valid); any seed is mismatched.
    again = load_pair_data(data_cfg(f, max_length=128), tiny_tokenizer, tmpl, seed=0, kind="kto")
    assert [b.input_ids for _, b in again.units] == [b.input_ids for _, b in data.units]
    other = load_pair_data(data_cfg(f, max_length=128), tiny_tokenizer, tmpl, seed=1, kind="kto")
    assert all(target_text(b) != r["completion"] for (_, b), r in zip(other.units, rows))


def test_kto_trains_from_native_unpaired_file_through_cli(tmp_path, tiny_model_dir):
    rows = _kto_rows()
    f = pairs_file(tmp_path, rows)
    # All six examples in one padded micro-batch, so step 1 sees every label. At step 1 the policy is
    # the reference: r = 0, z0 = 0, and each example's loss is weight * (1 - sigmoid(0)) = weight / 2.
    cfg = write_cfg(tmp_path, tiny_model_dir, tmp_path, "kto", data={"train": str(f), "eval": None, "packing": False},
                    train={"max_steps": 2, "micro_batch_size": 6},
                    preference={"kto_desirable_weight": 2.0, "kto_undesirable_weight": 1.0})
    p = cli("train", cfg)
    assert "6 train / 0 eval examples" in p.stderr and "reference log-probs: computed" in p.stderr
    steps = [m for m in read_metrics(tmp_path / "run-kto") if "loss" in m]
    assert len(steps) == 2
    assert {"kl", "reward_signed", "accuracy", "logp"} <= set(steps[0])
    assert not {"reward_chosen", "reward_margin"} & set(steps[0])  # no pair metrics for KTO
    n_good = sum(r["label"] for r in rows)
    assert steps[0]["loss"] == pytest.approx((2.0 * 0.5 * n_good + 1.0 * 0.5 * (len(rows) - n_good)) / len(rows),
                                             abs=1e-4)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert steps[0]["reward_signed"] == pytest.approx(0.0, abs=1e-4)
    assert steps[1]["loss"] != pytest.approx(steps[0]["loss"], abs=1e-6)  # the first step changed the policy
    summary = json.loads((tmp_path / "run-kto" / "summary.json").read_text())
    assert summary["method"] == "kto" and summary["train_examples"] == len(rows) and summary["truncated"] == 0


def test_right_truncation_cuts_the_end_and_is_counted(tmp_path, tiny_tokenizer):
    """`right` keeps the sequence's start (the whole prompt) and cuts the long response's end;
    `keep_end` instead drops the prompt's start and keeps each response's start."""
    prompt = " ".join(f"word{i}" for i in range(15)) + " QUESTION?"  # ~45 tokens with the template
    long_reply = " ".join(f"step {i}." for i in range(40))  # ~240 tokens
    f = pairs_file(tmp_path, [{"prompt": prompt, "chosen": long_reply, "rejected": "no"},
                              {"prompt": "short", "chosen": "a", "rejected": "b"}])
    tmpl = resolve_template(tiny_tokenizer, "auto")
    full = load_pair_data(data_cfg(f, max_length=1024), tiny_tokenizer, tmpl, seed=0)
    assert full.n_truncated == 0
    fc, fr = full.units[0]
    n_prompt = next(i for i, t in enumerate(fc.labels) if t != IGNORE_INDEX)
    assert 32 < n_prompt < 64 < len(fc) and len(fr) < 64

    right = load_pair_data(data_cfg(f, max_length=64), tiny_tokenizer, tmpl, seed=0, truncation="right")
    assert right.n_truncated == 1
    c, r = right.units[0]
    assert c.truncated and not r.truncated
    assert c.input_ids == fc.input_ids[:64] and c.labels == fc.labels[:64]  # prompt start kept, end cut
    assert r.input_ids == fr.input_ids and r.labels == fr.labels  # the short side is untouched
    assert "word0 " in tiny_tokenizer.decode(c.input_ids) and "QUESTION?" in tiny_tokenizer.decode(c.input_ids)
    assert c.n_targets == 64 - n_prompt and tiny_tokenizer.decode(
        [t for t in c.labels if t != IGNORE_INDEX]).startswith("step 0.")
    assert right.units[1] == full.units[1]

    keep = load_pair_data(data_cfg(f, max_length=64), tiny_tokenizer, tmpl, seed=0)
    kc, kr = keep.units[0]
    cut = n_prompt - 32  # keep_end keeps max(64 - longest response, 64 // 2) prompt tokens
    assert keep.n_truncated == 1 and kc.truncated and kr.truncated
    assert kc.input_ids == fc.input_ids[cut:cut + 64] and kr.input_ids == fr.input_ids[cut:]
    assert "word0 " not in tiny_tokenizer.decode(kc.input_ids) and kc.input_ids != c.input_ids
    # Both train on the response's start; keep_end keeps more of it (32 prompt tokens, 32 response tokens).
    right_targets = [t for t in c.labels if t != IGNORE_INDEX]
    keep_targets = [t for t in kc.labels if t != IGNORE_INDEX]
    assert len(keep_targets) == 32 > len(right_targets) and keep_targets[:len(right_targets)] == right_targets


@pytest.mark.parametrize("loss_type,normalize", [("ipo", True), ("ipo", False), ("robust", True), ("hinge", True)])
def test_dpo_loss_types_in_training_path_match_pure_losses(loss_type, normalize, tmp_path, tiny_model_dir,
                                                           tiny_tokenizer):
    """The training loss (make_loss_fn -> pair_loss) for one pair batch = the pure loss of instructkit.losses
    on independently computed log-probs; IPO on per-token means (ipo_normalize) or on sums."""
    from instructkit import losses
    from instructkit.config import PreferenceConfig
    from instructkit.methods.preference import make_loss_fn
    from instructkit.reference import Reference

    data, batch = _pair_batch(tmp_path, tiny_tokenizer)
    ref_model, policy = _reference_and_nudged_policy(tiny_model_dir)
    units = batch["units"].tolist()
    pol, n = _direct_logps(policy, data, units)
    ref, n_ref = _direct_logps(ref_model, data, units)
    assert torch.equal(n, n_ref) and (n[:, 0] != n[:, 1]).any()  # chosen and rejected lengths differ
    table = torch.zeros(2 * len(data.units))
    table[2 * batch["units"]], table[2 * batch["units"] + 1] = ref[:, 0], ref[:, 1]

    kw = {"label_smoothing": 0.2} if loss_type == "robust" else {}
    p = PreferenceConfig(loss_type=loss_type, ipo_normalize=normalize, beta=0.5, **kw)
    out = make_loss_fn("dpo", p, Reference(table=table))(policy, batch)
    pc, pr, rc, rr = pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1]
    if loss_type == "ipo" and normalize:
        want = losses.ipo_loss(pc / n[:, 0], pr / n[:, 1], rc / n[:, 0], rr / n[:, 1], 0.5)
        other = losses.ipo_loss(pc, pr, rc, rr, 0.5)
    elif loss_type == "ipo":
        want = losses.ipo_loss(pc, pr, rc, rr, 0.5)
        other = losses.ipo_loss(pc / n[:, 0], pr / n[:, 1], rc / n[:, 0], rr / n[:, 1], 0.5)
    elif loss_type == "robust":
        want = losses.robust_dpo_loss(pc, pr, rc, rr, 0.5, 0.2)
        other = losses.dpo_loss(pc, pr, rc, rr, 0.5, 0.2)  # cDPO with the same eps differs
    else:
        want = losses.hinge_loss(pc, pr, rc, rr, 0.5)
        other = losses.dpo_loss(pc, pr, rc, rr, 0.5)
    assert out.n_targets == len(units)
    assert float(out.loss_sum.detach()) == pytest.approx(float(want.sum()), rel=1e-4, abs=1e-5)
    assert abs(float(want.sum()) - float(other.sum())) > 1e-3  # the variant really matters here
    assert out.loss_sum.requires_grad
    reward_c, reward_r = losses.dpo_rewards(pc, pr, rc, rr, 0.5)  # rewards always on summed log-ratios
    assert out.metrics["reward_margin"] == pytest.approx(float((reward_c - reward_r).mean()), abs=1e-4)
    assert out.metrics["logp_chosen"] == pytest.approx(float(pc.mean()), abs=1e-3)


def test_rpo_alpha_adds_chosen_mean_nll_in_the_training_loss(tmp_path, tiny_model_dir, tiny_tokenizer):
    """pair_loss with rpo_alpha = plain DPO per pair + alpha x the chosen reply's mean token NLL."""
    from instructkit.config import PreferenceConfig
    from instructkit.methods.preference import pair_loss

    sums, counts = torch.tensor([[-4.0, -9.0], [-6.0, -2.0]]), torch.tensor([[2.0, 3.0], [4.0, 1.0]])
    ref = torch.tensor([[-5.0, -8.0], [-6.0, -3.0]])
    plain, _ = pair_loss("dpo", PreferenceConfig(), sums, counts, ref, {})
    rpo, metrics = pair_loss("dpo", PreferenceConfig(rpo_alpha=0.5), sums, counts, ref, {})
    assert torch.allclose(rpo - plain, 0.5 * torch.tensor([2.0, 1.5]))  # NLL = -sum / count of the chosen side
    assert metrics["nll_chosen"] == pytest.approx(1.75)
    with pytest.raises(Exception, match="rpo_alpha"):
        load_config(raw={"method": "orpo", "model": {"name_or_path": str(tiny_model_dir)},
                         "data": {"train": "x.jsonl"}, "preference": {"rpo_alpha": 1.0}})
