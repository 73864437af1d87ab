"""PPO end to end through the CLI on the nano tiny model, with a module:function reward."""

import json
import subprocess
import sys

import yaml
from safetensors.torch import load_file

from instructkit.synth.skills import write_skills


def length_reward(record: dict, completion: str) -> float:
    """A planted reward for the test: shorter completions score higher."""
    return -len(completion) / 10.0


def test_ppo_cli_runs_logs_telemetry_and_saves_value_head(tmp_path, tiny_model_dir):
    skills = write_skills(tmp_path / "skills", seed=0, n_train=240, n_val=62, n_heldout_phrasing=31,
                          n_heldout_family=8, n_corpus=100)
    cfg = {"method": "ppo", "seed": 0, "output_dir": str(tmp_path / "run"),
           "model": {"name_or_path": str(tiny_model_dir)},
           "data": {"train": str(skills / "train.jsonl"), "max_length": 256},
           "train": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 2, "lr": 1e-3, "progress": False},
           "rl": {"reward": "test_ppo:length_reward", "prompts_per_rollout": 8, "max_new_tokens": 8,
                  "rollout_epochs": 2, "kl_target": 0.1, "missing_stop_penalty": 1.0, "train_probe_prompts": 2,
                  "train_probe_samples": 0}}
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env_path = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-m", "instructkit", "train", str(path)], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ppo: 8 completions per rollout x 2 epochs, 2 optimizer steps per rollout" in proc.stderr
    assert "done: 2 steps" in proc.stderr
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [s["step"] for s in steps] == [1, 2]
    # No eval data, but a probe of training prompts: the run still evaluates it at the end.
    assert "before training: train-probe reward " in proc.stderr and "training prompts (greedy)" in proc.stderr
    assert "train_reward" in lines[-1]
    assert "train_reward_start" in json.loads((run / "summary.json").read_text())
    for s in steps:
        for key in ("score_mean", "reward_mean", "pg_loss", "value_loss", "clip_fraction", "vf_clip_fraction",
                    "approx_kl", "entropy", "kl", "kl_ref", "kl_coef", "explained_variance", "stop_fraction",
                    "completion_len_mean", "reward_length_corr", "alarm_truncated"):
            assert key in s, key
        # A random model never stops within 8 tokens: every completion pays the missing-stop penalty.
        assert abs(s["reward_mean"] - (s["score_mean"] - 1.0)) < 1e-5
        # Shorter is better and lengths barely vary: score and length are perfectly anti-correlated or constant.
        assert s["reward_length_corr"] <= 0
    # One rollout, two passes (one optimizer step each): step 1 is on-policy, step 2 is not.
    assert steps[0]["clip_fraction"] == 0 and steps[0]["approx_kl"] < 1e-6 and steps[1]["approx_kl"] > 0
    head = load_file(str(run / "final" / "value_head.safetensors"))
    assert head["weight"].shape[0] == 1 and head["weight"].abs().sum() > 0  # trained from zero
    assert (run / "final" / "model.safetensors").exists()


def test_reward_model_folder_as_reward(tmp_path, tiny_model_dir):
    """rl.reward as a folder scores prompt + completion with the reward model, as `score_responses` does."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    from instructkit.evaluate.reward import load_reward_model, score_responses
    from instructkit.rollout import load_reward

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=0).save_pretrained(rm_dir)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, rm_dir / f.name)
    fn, check = load_reward(str(rm_dir), max_length=128)
    assert check is None
    msgs = [[{"role": "user", "content": "Add 2 and 3."}]] * 2
    got = fn([{}, {}], msgs, ["5", "The answer is 7, clearly."])
    rm, tok = load_reward_model(rm_dir)
    want = score_responses(rm, tok, msgs, ["5", "The answer is 7, clearly."], max_length=128)
    assert got == want and got[0] != got[1]


def test_bad_reward_spec_is_a_config_error():
    import pytest

    from instructkit.config import ConfigError
    from instructkit.rollout import load_reward

    with pytest.raises(ConfigError, match="use 'skills', a reward-model folder"):
        load_reward("no_such_thing")
    with pytest.raises(ConfigError, match="cannot import nope from json"):
        load_reward("json:nope")


def test_ppo_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    """Stop after the first rollout (2 passes = 2 steps), resume with --resume, compare with a straight run.

    The adaptive KL controller (short horizon, so it visibly moves) is part of the checkpoint: the
    second rollout's KL penalty must use the coefficient updated by the first, as without the stop."""
    from conftest import train_cli

    skills = write_skills(tmp_path / "skills", seed=0, n_train=240, n_val=62, n_heldout_phrasing=31,
                          n_heldout_family=8, n_corpus=100)

    def run(name, steps, *extra):
        cfg = {"method": "ppo", "seed": 0, "output_dir": str(tmp_path / name),
               "model": {"name_or_path": str(tiny_model_dir)},
               "data": {"train": str(skills / "train.jsonl"), "max_length": 256},
               "train": {"max_steps": steps, "micro_batch_size": 4, "grad_accum": 2, "lr": 1e-3, "progress": False,
                         "save_every": 1, "schedule": "constant"},
               "rl": {"reward": "test_ppo:length_reward", "prompts_per_rollout": 8, "max_new_tokens": 8,
                      "rollout_epochs": 2, "kl_coef": 0.1, "kl_target": 0.01, "kl_horizon": 10.0}}
        return train_cli(cfg, tmp_path / f"{name}.yaml", *extra)

    run("a", 2)  # one rollout, two passes: the checkpoint at step 2 is on the rollout boundary
    resumed = run("a", 6, "--resume")
    straight = run("b", 6)
    assert [x["step"] for x in resumed] == [x["step"] for x in straight] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward_mean", "kl_ref", "kl_coef", "kl_penalty_mean", "value_loss", "grad_norm",
                "alarm_length_growth"):
        assert [x[key] for x in resumed] == [x[key] for x in straight], key
    assert straight[2]["kl_coef"] != straight[0]["kl_coef"]  # the controller moved, so the check is not trivial
    assert straight[2]["kl_ref"] > 0


def test_negative_weight_scales_the_whitened_advantages(tmp_path, tiny_model_dir):
    """rl.negative_weight multiplies PPO's negative per-token advantages after whitening: the same rollout
    (same seed, same policy) built with weight 0.5 equals the plain one with its negative entries halved."""
    import torch

    from instructkit import rollout as ro
    from instructkit.config import load_config
    from instructkit.data.pipeline import prepare_template
    from instructkit.methods.ppo import Rollouts, attach_value_head
    from instructkit.models import load_model, load_tokenizer

    skills = write_skills(tmp_path / "skills", seed=0, n_train=40, n_val=62, n_heldout_phrasing=31,
                          n_heldout_family=8, n_corpus=100)
    raw = {"method": "ppo", "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_model_dir)},
           "data": {"train": str(skills / "train.jsonl"), "max_length": 256},
           "train": {"micro_batch_size": 4}, "rl": {"prompts_per_rollout": 8, "max_new_tokens": 6, "kl_coef": 0.0}}

    def advantages(weight: float) -> torch.Tensor:
        cfg = load_config(raw={**raw, "rl": {**raw["rl"], "negative_weight": weight}})
        tok = load_tokenizer(cfg.model)
        template, _ = prepare_template(tok, cfg.data)
        reward_fn, prompts, _ = ro.load_rl_data(cfg, tok, template)
        torch.manual_seed(0)
        model = load_model(cfg.model, cfg.lora, torch.device("cpu"))
        attach_value_head(model)
        micro = Rollouts(cfg, model, tok, prompts, lambda recs, msgs, texts: [len(t) / 10 for t in texts], None,
                         torch.device("cpu"))(0)
        return torch.cat([b["advantages"][b["completion_mask"].bool()] for b in micro])

    plain, half = advantages(1.0), advantages(0.5)
    assert (plain < 0).any() and (plain > 0).any()
    assert torch.allclose(half, torch.where(plain < 0, 0.5 * plain, plain))


def test_value_warmup_trains_the_value_head_only(tmp_path, tiny_model_dir, monkeypatch):
    """rl.value_warmup_rollouts: during the first N rollouts the value head learns from the returns while
    every policy weight stays exactly as it was; afterwards the policy trains as usual."""
    import pytest
    import torch

    from instructkit.config import load_config
    from instructkit.methods import ppo

    skills = write_skills(tmp_path / "skills", seed=0, n_train=40, n_val=62, n_heldout_phrasing=31,
                          n_heldout_family=8, n_corpus=100)
    raw = {"method": "ppo", "seed": 0, "model": {"name_or_path": str(tiny_model_dir)},
           "data": {"train": str(skills / "train.jsonl"), "max_length": 256},
           "train": {"micro_batch_size": 4, "grad_accum": 2, "lr": 1e-2, "progress": False},
           "rl": {"reward": "test_ppo:length_reward", "prompts_per_rollout": 8, "max_new_tokens": 6,
                  "value_warmup_rollouts": 2}}
    start = load_file(str(tiny_model_dir / "model.safetensors"))

    def run(name: str, steps: int):
        cfg = load_config(raw={**raw, "output_dir": str(tmp_path / name), "train": {**raw["train"], "max_steps": steps}})
        ppo.main(cfg)
        out = tmp_path / name
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return (load_file(str(out / "final" / "model.safetensors")),
                load_file(str(out / "final" / "value_head.safetensors")), [m for m in metrics if "loss" in m])

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))  # test_ppo:length_reward
    policy, head, steps = run("warm", 2)
    assert [s["value_warmup"] for s in steps] == [1.0, 1.0]
    assert all(torch.equal(policy[k], start[k]) for k in start)  # not one policy weight moved
    assert head["weight"].abs().sum() > 0 and steps[1]["value_loss"] != steps[0]["value_loss"]
    policy, _, steps = run("after", 3)
    assert [s["value_warmup"] for s in steps] == [1.0, 1.0, 0.0]
    assert any(not torch.equal(policy[k], start[k]) for k in start)  # the third rollout trains the policy
    with pytest.raises(Exception, match="value_warmup_rollouts"):
        load_config(raw={**raw, "method": "grpo"})
