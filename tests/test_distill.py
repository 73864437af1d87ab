"""Distillation: KD losses against closed-form values, the distill method (live, cached top-k, on-policy),
vocabulary checks, and sequence-level distillation data (local teacher, endpoint, resume, filters)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_openai_server import FakeOpenAI

from instructkit.config import ConfigError, load_config
from instructkit.losses import kd_divergence, kd_loss, kd_loss_topk, topk_logprobs
from instructkit.synth.distill_data import DistillDataError, distill_data
from instructkit.synth.generators import EndpointGenerator, FunctionGenerator, GenResult, Sampling

T = torch.log(torch.tensor([[0.9, 0.1]]))
S = torch.log(torch.tensor([[0.5, 0.5]]))


# ---------------------------------------------------------------------------------------------- losses


def test_kl_directions_closed_form():
    # 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) and 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    assert float(kd_divergence(T, S, "forward_kl")) == pytest.approx(0.368064, abs=1e-6)
    assert float(kd_divergence(T, S, "reverse_kl")) == pytest.approx(0.510826, abs=1e-6)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert float(kd_divergence(T, T, kind)) == pytest.approx(0.0, abs=1e-7)


def test_jsd_limits_and_hand_value():
    assert float(kd_divergence(T, S, "jsd", beta=0.0)) == pytest.approx(0.368064, abs=1e-6)
    assert float(kd_divergence(T, S, "jsd", beta=1.0)) == pytest.approx(0.510826, abs=1e-6)
    # beta = 0.5: M = (0.7, 0.3); 0.5 KL(T||M) + 0.5 KL(S||M)
    kl_tm = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    kl_sm = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert float(kd_divergence(T, S, "jsd", beta=0.5)) == pytest.approx(0.5 * kl_tm + 0.5 * kl_sm, abs=1e-6)
    # JSD/beta -> forward KL and JSD/(1 - beta) -> reverse KL: the documented limits
    assert float(kd_divergence(T, S, "jsd", beta=1e-4)) / 1e-4 == pytest.approx(0.368064, rel=1e-3)
    assert float(kd_divergence(T, S, "jsd", beta=1 - 1e-4)) / 1e-4 == pytest.approx(0.510826, rel=1e-3)
    with pytest.raises(ValueError):
        kd_divergence(T, S, "jsd", beta=1.5)


def test_kd_loss_temperature_scaling_sum_and_gradients():
    torch.manual_seed(0)
    s = torch.randn(7, 11, requires_grad=True)
    t = torch.randn(7, 11, requires_grad=True)
    for temp in (1.0, 2.0, 0.5):
        want = sum(float(kd_divergence(torch.log_softmax(t[i].detach() / temp, -1), torch.log_softmax(s[i].detach() / temp, -1)))
                   for i in range(7)) * temp ** 2
        assert float(kd_loss(s, t, temp).detach()) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(s, t, 2.0, chunk_size=3)) == pytest.approx(float(kd_loss(s, t, 2.0)), rel=1e-6)
    kd_loss(s, t, 2.0, "jsd", 0.3).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None  # the teacher is never trained
    assert float(kd_loss(s[:0], t[:0])) == 0.0
    with pytest.raises(ValueError, match="share the vocabulary"):
        kd_loss(s, t[:, :10])


def test_topk_kd_is_exact_at_full_k_and_a_lower_bound_below():
    torch.manual_seed(1)
    s, t = torch.randn(5, 40), torch.randn(5, 40)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        ids, lp, rest = topk_logprobs(t, 40, 2.0)
        assert torch.isinf(rest).all()
        assert float(kd_loss_topk(s, ids, lp, rest, 2.0, kind)) == pytest.approx(float(kd_loss(s, t, 2.0, kind)), rel=1e-5)
        ids, lp, rest = topk_logprobs(t, 4, 2.0)
        assert torch.allclose(torch.logsumexp(torch.cat([lp, rest[:, None]], -1), -1), torch.zeros(5), atol=1e-6)
        assert 0 < float(kd_loss_topk(s, ids, lp, rest, 2.0, kind)) <= float(kd_loss(s, t, 2.0, kind)) + 1e-6
        ids, lp, rest = topk_logprobs(s, 4, 2.0)  # the student agrees with the teacher: zero
        assert float(kd_loss_topk(s, ids, lp, rest, 2.0, kind)) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- the method


@pytest.fixture(scope="module")
def kd_setup(tmp_path_factory, tiny_model_dir):
    """Student: the nano tiny model; teacher: other weights (seed 1) with the same tokenizer; toy data."""
    from instructkit.synth.toy import write_toy_dataset
    from instructkit.tiny_model import build_tiny_model, default_corpus

    root = tmp_path_factory.mktemp("kd")
    teacher = build_tiny_model(root / "teacher", preset="nano", seed=1, corpus=default_corpus(0))
    data = write_toy_dataset(root / "toy", n_train=64, n_eval=16, seed=0)
    return {"root": root, "student": tiny_model_dir, "teacher": teacher, "data": Path(data)}


def _cfg(kd_setup, name, **distill):
    return {"method": "distill", "seed": 0, "output_dir": str(kd_setup["root"] / name),
            "model": {"name_or_path": str(kd_setup["student"])},
            "data": {"train": str(kd_setup["data"] / "train.jsonl"), "eval": str(kd_setup["data"] / "eval.jsonl"),
                     "max_length": 512},
            "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 3e-3, "progress": False, "eval_every": 4},
            "distill": {"teacher": str(kd_setup["teacher"]), **distill}}


def test_config_requires_teacher_and_topk_for_cache(kd_setup):
    raw = _cfg(kd_setup, "x")
    raw["distill"].pop("teacher")
    with pytest.raises(ConfigError, match="distill.teacher"):
        load_config(raw=raw)
    with pytest.raises(ConfigError, match="top_k"):
        load_config(raw=_cfg(kd_setup, "x", teacher_logits="cache"))
    with pytest.raises(ConfigError, match="kind"):
        load_config(raw=_cfg(kd_setup, "x", kind="kl"))


def test_distill_lowers_kl_to_the_teacher(kd_setup):
    from instructkit.data.pipeline import load_sft_data, plan_batches, prepare_template
    from instructkit.methods import distill
    from instructkit.models import load_for_inference
    from instructkit.teacher import kl_to_teacher

    cfg = load_config(raw=_cfg(kd_setup, "live", alpha=1.0, kind="forward_kl", temperature=1.0))
    cfg.train.max_steps = 10
    result = distill.main(cfg)
    assert result.status == "completed" and result.final_metrics["eval_kd"] > 0
    student0, tok = load_for_inference(kd_setup["student"])
    student1, _ = load_for_inference(kd_setup["root"] / "live" / "final")
    teacher, _ = load_for_inference(kd_setup["teacher"])
    template, _ = prepare_template(tok, cfg.data)
    data = load_sft_data(cfg.data, tok, template, 0)
    batches = plan_batches(data.eval, packing=True, micro_batch_size=2, max_length=512, pad_id=tok.pad_token_id,
                           seed=0, shuffle=False).source(0)
    before, after = kl_to_teacher(student0, teacher, batches), kl_to_teacher(student1, teacher, batches)
    assert after["kl_teacher_student"] < 0.8 * before["kl_teacher_student"]
    summary = json.loads((kd_setup["root"] / "live" / "summary.json").read_text())
    assert summary["method"] == "distill" and summary["teacher"] == str(kd_setup["teacher"])


def test_cached_topk_matches_live_topk_and_is_reused(kd_setup, capfd):
    from instructkit.methods import distill

    cache = str(kd_setup["root"] / "cache")
    live = distill.main(load_config(raw=_cfg(kd_setup, "tk-live", top_k=8, temperature=2.0, kind="jsd", beta=0.3)))
    first = distill.main(load_config(raw=_cfg(kd_setup, "tk-c1", top_k=8, temperature=2.0, kind="jsd", beta=0.3,
                                              teacher_logits="cache", cache_dir=cache)))
    assert "computed for" in capfd.readouterr().err
    again = distill.main(load_config(raw=_cfg(kd_setup, "tk-c2", top_k=8, temperature=2.0, kind="jsd", beta=0.3,
                                              teacher_logits="cache", cache_dir=cache)))
    assert "loaded" in capfd.readouterr().err
    assert len(list(Path(cache).glob("teacher-*.safetensors"))) == 1
    # fp16 storage of the cached log-probs is the only difference from the live teacher
    assert first.final_metrics["loss"] == pytest.approx(live.final_metrics["loss"], rel=2e-3)
    assert again.final_metrics["loss"] == first.final_metrics["loss"]


@pytest.mark.slow
def test_on_policy_batches_and_cli(kd_setup, tmp_path):
    cfg_path = tmp_path / "kd.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(_cfg(kd_setup, "onpolicy", on_policy_fraction=1.0, on_policy_max_new_tokens=8)))
    proc = subprocess.run([sys.executable, "-m", "instructkit", "train", str(cfg_path), "train.max_steps=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "on-policy 100%" in proc.stderr
    metrics = [json.loads(x) for x in (kd_setup["root"] / "onpolicy" / "metrics.jsonl").read_text().splitlines()]
    assert [m["on_policy"] for m in metrics if "on_policy" in m] == [1.0, 1.0]


def test_vocabulary_mismatch_is_a_clear_error(kd_setup, tmp_path):
    from instructkit.methods import distill
    from instructkit.models import ModelError
    from instructkit.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", preset="nano", seed=0, corpus=["completely different words"] * 50)
    raw = _cfg(kd_setup, "mismatch")
    raw["distill"]["teacher"] = str(other)
    with pytest.raises(ModelError, match="vocabulary") as e:
        distill.main(load_config(raw=raw))
    assert "distill-data" in str(e.value)


# ---------------------------------------------------------------------------------------------- sequence level


def _prompts(tmp_path) -> Path:
    p = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "old"}],
             "family": "f"} for i in range(6)] + [{"prompt": "echo me"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _teacher_fn(request, sampling):
    q = request[-1]["content"]
    if q == "echo me":
        return GenResult("echo me", "stop")
    n = int(q.split()[-1])
    if n == 1:
        return GenResult("", "stop")
    if n == 2:
        return GenResult("a reply that never ends", "length")
    return GenResult(f"answer {n}", "stop")


def test_distill_data_filters_provenance_and_resume(tmp_path):
    prompts = _prompts(tmp_path)
    out = tmp_path / "seq.jsonl"
    calls = []

    def interrupted(request, sampling):
        calls.append(request)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return _teacher_fn(request, sampling)

    s = Sampling(max_tokens=16, temperature=0.0)
    with pytest.raises(KeyboardInterrupt):
        distill_data(FunctionGenerator(interrupted, name="t"), prompts, out, sampling=s, chunk=2, log=lambda m: None)
    assert len(out.read_text().splitlines()) == 1  # prompt 0 answered; prompt 1 (empty) rejected
    summary = distill_data(FunctionGenerator(_teacher_fn, name="t"), prompts, out, sampling=s, chunk=2,
                           log=lambda m: None)
    assert summary["already_done"] == 2 and summary["answered_now"] == 5
    assert summary["rejected"] == {"empty": 0, "truncated": 1, "echo": 1, "verifier": 0}
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in recs] == ["answer 0", "answer 3", "answer 4", "answer 5"]
    assert all(r["messages"][-2] == {"role": "user", "content": r["messages"][-2]["content"]} for r in recs)
    assert recs[0]["family"] == "f" and recs[0]["provenance"]["source_line"] == 1
    assert recs[0]["provenance"]["teacher"]["name"] == "t" and recs[0]["provenance"]["finish_reason"] == "stop"
    assert summary["rejected_total_in_file"] == 3
    again = distill_data(FunctionGenerator(_teacher_fn, name="t"), prompts, out, sampling=s, log=lambda m: None)
    assert again["answered_now"] == 0 and again["records_total"] == 4
    with pytest.raises(DistillDataError, match="sampling"):
        distill_data(FunctionGenerator(_teacher_fn, name="t"), prompts, out, sampling=Sampling(max_tokens=99),
                     log=lambda m: None)
    # a verifier keeps only the replies it accepts
    v = distill_data(FunctionGenerator(_teacher_fn, name="t"), prompts, tmp_path / "v.jsonl", sampling=s,
                     scorer=lambda recs, texts: [1.0 if t.endswith("3") else 0.0 for t in texts], scorer_name="odd",
                     log=lambda m: None)
    assert v["rejected"]["verifier"] == 3 and v["records_total"] == 1


def test_distill_data_through_an_endpoint_keeps_the_key_secret(tmp_path, monkeypatch):
    secret = "sk-distill-SECRET-777"
    monkeypatch.setenv("TEACHER_KEY", secret)
    with FakeOpenAI(lambda call: f"teacher says {call.body['messages'][-1]['content']}") as server:
        gen = EndpointGenerator(server.url, "fake", api_key_env="TEACHER_KEY", concurrency=3)
        s = distill_data(gen, _prompts(tmp_path), tmp_path / "e.jsonl", sampling=Sampling(max_tokens=8, temperature=0.0),
                         log=lambda m: None)
    assert s["records_total"] == 7 and server.max_in_flight <= 3
    assert all(c.headers["authorization"] == f"Bearer {secret}" for c in server.calls)
    for f in tmp_path.iterdir():
        assert secret not in f.read_text()


@pytest.mark.slow
def test_distill_data_cli_with_a_local_teacher_then_sft(kd_setup, tmp_path):
    out = tmp_path / "seq.jsonl"
    proc = subprocess.run([sys.executable, "-m", "instructkit", "synth", "distill-data", "--teacher",
                           str(kd_setup["teacher"]), "--prompts", str(kd_setup["data"] / "eval.jsonl"), "--out", str(out),
                           "--max-new-tokens", "8", "--keep-truncated", "--limit", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SFT records" in proc.stdout and "data.train" in proc.stdout
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs and all(r["messages"][-1]["role"] == "assistant" for r in recs)
    assert all(r["provenance"]["teacher"]["kind"] == "local" for r in recs)
    # the file trains as is
    cfg = load_config(raw={"model": {"name_or_path": str(kd_setup["student"])}, "output_dir": str(tmp_path / "sft"),
                           "data": {"train": str(out), "max_length": 512},
                           "train": {"max_steps": 1, "micro_batch_size": 2, "progress": False}})
    from instructkit.methods import sft

    assert sft.main(cfg).status == "completed"


def test_closeness_to_teacher_is_zero_for_the_teacher_itself(kd_setup, tmp_path):
    """The demo's closeness measures: a student identical to the teacher has zero KL on both reply sets and
    agrees on every greedy reply; another model has positive KL and agrees less."""
    import shutil

    from instructkit.demo import closeness_to_teacher

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(kd_setup["data"] / "eval.jsonl", data / "validation.jsonl")
    res = closeness_to_teacher(kd_setup["teacher"], {"same": kd_setup["teacher"], "other": kd_setup["student"]},
                               data, tmp_path / "out", seed=0, limit=6)
    same, other = res["same"], res["other"]
    assert same["kl_teacher_student"] == pytest.approx(0, abs=1e-5)
    assert same["kl_on_teacher_replies"] == pytest.approx(0, abs=1e-5)
    assert same["greedy_agreement"] == 1.0
    assert other["kl_teacher_student"] > 0.01 and other["kl_on_teacher_replies"] > 0.01
    assert 0 <= other["greedy_agreement"] < 1.0
    replies = [json.loads(x) for x in (tmp_path / "out" / "teacher_replies.jsonl").read_text().splitlines()]
    assert len(replies) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in replies)


@pytest.mark.slow
def test_demo_distill_stage_at_miniature_scale(kd_setup, tmp_path):
    """The `demo --with distill` stage: a nano student pretrained with the teacher's tokenizer, then SFT,
    token-level KD and sequence-level KD of it, each evaluated and compared with the teacher."""
    from instructkit.demo import distill_demo, run_demo
    from instructkit.synth.skills import write_skills

    with pytest.raises(ValueError, match="distill"):  # the stage is offered (and checked before any work)
        run_demo(out=tmp_path / "x", with_stages=("bogus",))
    data = write_skills(tmp_path / "data", n_train=120, n_val=20, n_heldout_phrasing=8, n_heldout_family=8,
                        n_corpus=300)
    corpus = (data / "corpus.txt").read_text().splitlines()
    (data / "corpus_pretrain.txt").write_text("\n".join(corpus[:-30]) + "\n")
    (data / "corpus_heldout.txt").write_text("\n".join(corpus[-30:]) + "\n")
    teacher = kd_setup["teacher"]  # shares the toy tokenizer; a random teacher rambles: seq-KD keeps cut replies
    results, agree = distill_demo(teacher, teacher, data, tmp_path / "out", tmp_path / "cache", seed=0, quick=True,
                                  epochs=0.3, limit=4, probe=corpus[-30:], student_pretrain_epochs=0.1)
    seq = agree["seq_kd_data"]
    assert sum(seq["rejected"].values()) + seq["records_total"] == 120
    names = ["student-sft", "student-kd"] + (["student-seqkd"] if seq["records_total"] else [])
    assert set(results) == set(names)
    for name in names:
        m = agree[name]
        assert m["kl_teacher_student"] > 0 and m["kl_student_teacher"] > 0 and m["tokens"] > 0
        assert m["kl_on_teacher_replies"] > 0 and 0 <= m["greedy_agreement"] <= 1
        assert (tmp_path / "out" / name / "final" / "config.json").exists()
    kd_cfg = (tmp_path / "out" / "student-kd" / "config.yaml").read_text()
    assert "method: distill" in kd_cfg and "teacher_logits: cache" in kd_cfg
