"""Skills evaluation harness, its bad-input errors, the pretrain method, and the demo report."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from instructkit.evaluate.skills import evaluate_skills, load_split
from instructkit.synth.skills import SPLITS

ENV_CMD = [sys.executable, "-m", "instructkit"]


@pytest.fixture(scope="module")
def skills_dir(tmp_path_factory):
    from instructkit.synth.skills import write_skills

    d = tmp_path_factory.mktemp("skills")
    write_skills(d, seed=0, n_train=120, n_val=27, n_heldout_phrasing=27, n_heldout_family=8, n_corpus=400)
    return d


def run(*args):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(ENV_CMD + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)


def test_evaluate_skills_metrics_and_samples(tiny_model_dir, tiny_tokenizer, skills_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    corpus = (skills_dir / "corpus.txt").read_text().splitlines()[:100]
    metrics, samples = evaluate_skills(model, tiny_tokenizer, skills_dir, limit=4, max_new_tokens=8,
                                       corpus_lines=corpus, progress=False)
    assert set(metrics["splits"]) == set(SPLITS)
    for split, m in metrics["splits"].items():
        assert m["n"] == 4
        for key in ("accuracy", "exact_match", "stop_rate"):
            assert 0.0 <= m[key] <= 1.0
        assert m["heldout_loss"] > 0 and m["mean_generated_tokens"] <= 8
    assert metrics["corpus_nll"] > 0
    assert len(samples) == 16
    assert {"split", "family", "prompt", "output", "expected", "correct", "stopped"} <= set(samples[0])
    # A random model is (almost) never right; the harness must not call it correct.
    assert sum(s["correct"] for s in samples) <= 1


def test_verifier_scoring_of_reference_answers(skills_dir):
    """The harness's scoring path accepts the reference answers themselves."""
    from instructkit.synth.skills import verify_response

    for split in SPLITS:
        for rec in load_split(skills_dir, split):
            assert verify_response(rec, rec["messages"][-1]["content"]), rec


def test_eval_cli_bad_inputs(tmp_path, tiny_model_dir, skills_dir):
    # 1. a data folder with a missing split
    partial = tmp_path / "partial"
    shutil.copytree(skills_dir, partial)
    (partial / "heldout_family.jsonl").unlink()
    p = run("eval", "--model", tiny_model_dir, "--data", partial, "--out", tmp_path / "o")
    assert p.returncode == 2 and "heldout_family" in p.stderr and "instructkit synth skills" in p.stderr
    # 2. a corrupt JSONL line
    corrupt = tmp_path / "corrupt"
    shutil.copytree(skills_dir, corrupt)
    lines = (corrupt / "validation.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]
    (corrupt / "validation.jsonl").write_text("\n".join(lines) + "\n")
    p = run("eval", "--model", tiny_model_dir, "--data", corrupt, "--out", tmp_path / "o",
            "--splits", "validation", "--limit", "2")
    assert p.returncode == 2 and "validation.jsonl:3" in p.stderr and "Traceback" not in p.stderr
    # 3. a model without a chat template
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    p = run("eval", "--model", bare, "--data", skills_dir, "--out", tmp_path / "o", "--limit", "2")
    assert p.returncode == 2 and "no chat template" in p.stderr and "--template chatml" in p.stderr


def test_eval_cli_writes_files(tmp_path, tiny_model_dir, skills_dir):
    p = run("eval", "--model", tiny_model_dir, "--data", skills_dir, "--out", tmp_path / "o",
            "--limit", "2", "--max-new-tokens", "4", "--splits", "validation,heldout_family")
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "o/eval.json").read_text())
    assert set(m["splits"]) == {"validation", "heldout_family"}
    assert len((tmp_path / "o/samples.jsonl").read_text().splitlines()) == 4
    assert "validation" in p.stdout and "accuracy" in p.stdout


def test_pretrain_method_lowers_loss(tmp_path, tiny_model_dir, skills_dir):
    from transformers import AutoModelForCausalLM

    from instructkit.config import load_config
    from instructkit.methods import pretrain

    cfg = load_config(raw={"method": "pretrain", "output_dir": str(tmp_path / "pt"),
                           "model": {"name_or_path": str(tiny_model_dir)},
                           "data": {"train": str(skills_dir / "corpus.txt"), "max_length": 64,
                                    "eval_fraction": 0.1},
                           "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "progress": False}})
    pretrain.main(cfg)
    lines = [json.loads(x) for x in (tmp_path / "pt/metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < losses[0]
    assert "eval_loss" in lines[-1]
    AutoModelForCausalLM.from_pretrained(tmp_path / "pt/final")


def test_pretrain_separate_documents_loss_equals_each_document_alone(tmp_path, tiny_model_dir, tiny_tokenizer):
    """data.documents: separate packs whole documents with block-diagonal attention: the packed rows'
    summed NLL equals the sum over documents scored one at a time, and no token is lost or added."""
    import torch
    from transformers import AutoModelForCausalLM

    from instructkit.data.pipeline import plan_batches
    from instructkit.data.text import document_batches, document_examples, separator_id
    from instructkit.models import nll_sum

    docs = ["the first item of red, blue is red.", "7 plus 8 is 15.", "a b c d e f g h i j k l m n o p q r s t",
            "hello"]
    ex = document_examples(tiny_tokenizer, docs, max_length=12)
    sep = separator_id(tiny_tokenizer)
    ids = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [sep] for d in docs]
    assert sum(len(e.input_ids) for e in ex) == sum(map(len, ids))  # long documents are cut, not dropped
    assert document_batches(tiny_tokenizer, docs, 12, 2, 0, False)[1] == sum(map(len, ids))
    assert all(e.labels[0] == -100 and e.labels[1:] == e.input_ids[1:] for e in ex)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = plan_batches(ex, packing=True, micro_batch_size=2, max_length=24, pad_id=tiny_tokenizer.pad_token_id,
                        seed=0, shuffle=False)
    with torch.no_grad():
        packed = sum(float(nll_sum(model, b)[0]) for b in plan.source(0))
        alone = 0.0
        for e in ex:
            x = torch.tensor([e.input_ids])
            alone += float(nll_sum(model, {"input_ids": x, "labels": torch.tensor([e.labels])})[0])
    assert packed == pytest.approx(alone, rel=1e-4)


def test_pretrain_separate_documents_trains(tmp_path, tiny_model_dir, skills_dir):
    from instructkit.config import load_config
    from instructkit.methods import pretrain

    cfg = load_config(raw={"method": "pretrain", "output_dir": str(tmp_path / "pt"),
                           "model": {"name_or_path": str(tiny_model_dir)},
                           "data": {"train": str(skills_dir / "corpus.txt"), "max_length": 64,
                                    "eval_fraction": 0.1, "documents": "separate"},
                           "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "progress": False,
                                     "optimizer": "muon", "muon_lr": 0.02}})
    pretrain.main(cfg)
    lines = [json.loads(x) for x in (tmp_path / "pt/metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < losses[0] and "eval_loss" in lines[-1]


def test_report_renders_tables_and_plots(tmp_path):
    from instructkit.report import write_report

    def fake(acc):
        return {"splits": {s: {"n": 10, "accuracy": acc, "exact_match": acc, "stop_rate": 1.0,
                               "mean_generated_tokens": 5.0, "heldout_loss": 0.5} for s in SPLITS},
                "families": {s: {"add": acc} for s in SPLITS}, "corpus_nll": 1.0 + acc}

    for run_name in ("sft-full", "sft-lora"):
        (tmp_path / run_name).mkdir()
        (tmp_path / run_name / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"step": i, "loss": 2.0 / i}) for i in range(1, 6)) + "\n"
            + json.dumps({"step": 5, "eval_loss": 0.5}) + "\n")
    summary = {"results": {"base": fake(0.0), "sft-full": fake(0.9), "sft-lora": fake(0.7)},
               "times": {"total": 12.0}}
    md, html = write_report(tmp_path, summary, ["instructkit demo"])
    text = md.read_text()
    assert "| validation |" in text and "90.0%" in text and "(+0.900)" in text
    assert "instructkit demo" in text
    for png in ("accuracy.png", "loss_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html.read_text()
    assert "<table>" in page and "<img src='accuracy.png'" in page


@pytest.mark.slow
def test_demo_pipeline_end_to_end_at_miniature_scale(tmp_path):
    """Every stage of `instructkit demo` (curriculum, pretraining, eval, SFT full+LoRA, report)
    at a size that runs in well under a minute; a second run reuses the cached base."""
    from instructkit.demo import run_demo
    from instructkit.report import write_report

    kw = dict(cache=tmp_path / "cache", quick=True, preset="nano", limit=4, sft_epochs=0.3,
              n_train=150, n_corpus=600)
    summary = run_demo(out=tmp_path / "demo", **kw)
    assert set(summary["results"]) == {"base", "sft-full", "sft-lora"}
    for r in summary["results"].values():
        assert set(r["splits"]) == set(SPLITS) and r["corpus_nll"] > 0
    md, html = write_report(tmp_path / "demo", summary, ["instructkit demo"])
    assert "heldout_family" in md.read_text() and (tmp_path / "demo/accuracy.png").exists()
    assert (tmp_path / "demo/sft-full/final/config.json").exists()
    assert (tmp_path / "demo/sft-lora/final/adapter_config.json").exists()
    again = run_demo(out=tmp_path / "demo2", with_stages=("dpo", "reward"), **kw)
    assert again["base"] == summary["base"]  # cached
    assert again["times"]["base model"] < summary["times"]["base model"]
    # Optional preference stages: DPO is evaluated like the SFT models; the reward model reports pairs.
    assert set(again["results"]) == {"base", "sft-full", "sft-lora", "dpo"}
    assert set(again["preference"]) == {"dpo", "reward"}
    assert 0.0 <= again["preference"]["reward"]["eval_accuracy"] <= 1.0
    # The demo's reward model scores head + the backbone's reply log-probability, and says so on disk.
    assert "rpo_alpha: 1.0" in (tmp_path / "demo2/dpo/config.yaml").read_text()  # DPO + NLL of the chosen reply
    info = json.loads((tmp_path / "demo2/reward/final/instructkit.json").read_text())
    assert info["reward_logprob_coef"] == 0.5
    md2, _ = write_report(tmp_path / "demo2", again, ["instructkit demo --with dpo,reward"])
    assert "Preference stages" in md2.read_text()


def test_demo_rl_stages_at_miniature_scale(tmp_path):
    """`instructkit demo --with grpo,ppo` in miniature: both RL stages train a LoRA adapter on the full SFT
    model with one optimizer step per rollout, are evaluated like the other stages (adapter on its base),
    and the summary and report carry their rollout reward and KL."""
    from instructkit.demo import rl_line, run_demo
    from instructkit.report import write_report

    summary = run_demo(out=tmp_path / "demo", cache=tmp_path / "cache", quick=True, preset="nano", limit=4,
                       sft_epochs=0.3, n_train=150, n_corpus=600, with_stages=("grpo", "ppo"), rl_steps=2)
    assert set(summary["results"]) == {"base", "sft-full", "sft-lora", "grpo", "ppo"}
    assert set(summary["rl"]) == {"grpo", "ppo"}
    for method, m in summary["rl"].items():
        assert (tmp_path / "demo" / method / "final" / "adapter_config.json").exists()
        cfg = yaml.safe_load((tmp_path / "demo" / method / "config.yaml").read_text())
        assert cfg["model"]["name_or_path"].endswith("sft-full/final") and cfg["rl"]["reward"] == "skills"
        assert cfg["lora"]["enabled"] and cfg["train"]["lr"] == 1e-3
        assert m["steps"] == 2 and m["rollouts"] == 2  # one optimizer step per rollout
        assert len(m["reward_per_rollout"]) == m["rollouts"]
        assert 0.0 <= m["reward_first_third"] <= 1.0 and 0.0 <= m["reward_last_third"] <= 1.0
        assert m["kl_ref_last_third"] == m["kl_ref_last_third"]  # logged (not NaN)
        val = summary["results"][method]["splits"]["validation"]
        assert m["validation_accuracy_end"] == val["accuracy"] and m["validation_exact_match_end"] == val["exact_match"]
        assert m["validation_accuracy_start"] == summary["results"]["sft-full"]["splits"]["validation"]["accuracy"]
        # The run's own before/after scores: a sampled probe of the training prompts it drew, greedy validation.
        assert cfg["rl"]["train_probe_prompts"] == 64 and cfg["rl"]["train_probe_samples"] == 4
        # GRPO's two rollouts draw 64 prompts in their first rounds, two of them twice (150 prompts, 4 slots a
        # rollout); PPO's 256 per rollout draw all 150: the probe takes 64 of those, or all when fewer.
        assert m["train_probe_prompts"] == (62 if method == "grpo" else 64) and m["train_probe_samples"] == 4
        assert m["validation_prompts"] == min(64, len((tmp_path / "demo" / "data" / "validation.jsonl")
                                                      .read_text().splitlines()))
        for key in ("train_probe_start", "train_probe_end", "validation_reward_start", "validation_reward_end"):
            assert 0.0 <= m[key] <= 1.0, key
        assert m["train_probe_change_se"] >= 0 and m["validation_reward_change_se"] >= 0
        line = rl_line(method, m)
        assert line.startswith(f"{method}: training-prompt reward {m['train_probe_start']:.3f} -> ")
        assert f"on {m['train_probe_prompts']} of its training prompts x 4 samples" in line and "validation accuracy" in line
        assert f"+- {100 * m['validation_reward_change_se']:.1f} points) (all " in line
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["rl"]["ppo"]["reward_key"] == "score_mean" and saved["rl"]["grpo"]["reward_key"] == "reward_mean"
    md, _ = write_report(tmp_path / "demo", summary, ["instructkit demo --with grpo,ppo"])
    text = md.read_text()
    assert "Online RL stages" in text and "| grpo | 2 (2) |" in text and "| ppo | 2 (2) |" in text


def test_reproduce_commands_evaluate_every_stage_as_the_demo_did():
    """The report's reproduce list evaluates each model the demo evaluated, with the demo's settings: RL
    stages as adapters on the full SFT model, no eval for the reward model, and commands the CLI accepts."""
    import shlex

    from instructkit.cli import build_parser
    from instructkit.demo import ANSWER_TOKENS, reproduce_commands

    evaluated = ("base", "sft-full", "sft-lora", "dpo", "student-sft", "student-kd", "student-seqkd", "grpo", "ppo")
    summary = {"base": "cache/demo/base-abc/final", "limit": 40, "results": dict.fromkeys(evaluated, {})}
    cmds = reproduce_commands("runs/d", " --quick", 3, summary, ("dpo", "reward", "distill", "grpo", "ppo"))
    assert cmds[0].startswith("instructkit demo --out runs/d --quick --seed 3")
    evals = [c for c in cmds if c.startswith("instructkit eval ")]
    outs = [c.split("--out ")[1].split()[0] for c in evals]
    assert outs == [f"runs/d/eval-{m}" for m in evaluated]
    grpo = next(c for c in evals if "eval-grpo" in c)
    assert "--model runs/d/sft-full/final --adapter runs/d/grpo/final" in grpo
    parser = build_parser()
    for c in evals:
        args = parser.parse_args(shlex.split(c)[1:])
        assert args.limit == 40 and args.max_new_tokens == ANSWER_TOKENS and args.data == "runs/d/data"
    assert "instructkit train runs/d/reward/config.yaml" in cmds and "instructkit train runs/d/grpo/config.yaml" in cmds
    # A skipped student (sequence-level KD with no teacher replies) gets neither a train nor an eval command.
    del summary["results"]["student-seqkd"]
    cmds = reproduce_commands("runs/d", "", 3, summary, ("distill",))
    assert not [c for c in cmds if "student-seqkd" in c] and "instructkit train runs/d/student-kd/config.yaml" in cmds
