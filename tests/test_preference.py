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


def test_reward_head_same_in_shared_and_padded_layouts(skills, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from instructkit.models import unit_rewards

    tmpl = resolve_template(tiny_tokenizer, "auto")
    data = load_pair_data(data_cfg(skills / "preference_validation.jsonl", max_length=128), tiny_tokenizer, tmpl,
                          seed=0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                               pad_token_id=tiny_tokenizer.pad_token_id).eval()
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
    from transformers import AutoModelForSequenceClassification

    from instructkit.config import ModelConfig
    from instructkit.models import output_head_weight, set_logprob_term, unit_rewards

    model_dir = tiny_model_dir if tied else _untied_copy(tiny_model_dir, tmp_path / "untied")
    tmpl = resolve_template(tiny_tokenizer, "auto")
    data = load_pair_data(data_cfg(skills / "preference_validation.jsonl", max_length=128), tiny_tokenizer, tmpl,
                          seed=0)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1,
                                                            pad_token_id=tiny_tokenizer.pad_token_id).eval()
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


def test_dpo_loss_matches_trl(skills, tiny_model_dir, tiny_tokenizer, tmp_path):
    """Same model, same batch (TRL's own collated batch): instructkit's log-probs + DPO loss = TRL's."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    policy = _model(tiny_model_dir)
    ref = copy.deepcopy(policy)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    recs = [json.loads(x) for x in (skills / "preference.jsonl").read_text().splitlines()[:6]]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in recs])
    tok = copy.deepcopy(tiny_tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=6,
                         report_to="none", use_cpu=True, max_length=128, precompute_ref_log_probs=False)
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
