"""GRPO end to end through the CLI on the nano tiny model and a few skills prompts."""

import json
import subprocess
import sys

import pytest
import yaml

from instructkit.synth.skills import write_skills


@pytest.fixture(scope="module")
def skills(tmp_path_factory):
    return write_skills(tmp_path_factory.mktemp("skills"), seed=0, n_train=240, n_val=62, n_heldout_phrasing=31,
                        n_heldout_family=8, n_corpus=100)


def _config(tmp_path, model_dir, skills, **rl):
    val = tmp_path / "val.jsonl"
    val.write_text("".join((skills / "validation.jsonl").read_text().splitlines(keepends=True)[:4]))
    cfg = {"method": "grpo", "seed": 0, "output_dir": str(tmp_path / "run"),
           "model": {"name_or_path": str(model_dir)},
           "data": {"train": str(skills / "train.jsonl"), "eval": str(val), "max_length": 256},
           "train": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 2, "lr": 1e-3, "progress": False,
                     "save_every": 2},
           "rl": {"group_size": 4, "prompts_per_rollout": 2, "max_new_tokens": 8, "eval_prompts": 4, **rl}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grpo_cli_runs_logs_telemetry_and_saves(tmp_path, tiny_model_dir, skills):
    cfg = _config(tmp_path, tiny_model_dir, skills, alarm_truncated=0.01)
    proc = subprocess.run([sys.executable, "-m", "instructkit", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "grpo: 2 prompts x 4 completions per rollout" in err and "done: 2 steps" in err
    # A random model never stops within 8 tokens: the truncation alarm fires and is logged.
    assert "warning: rollout 0: fraction of completions that hit rl.max_new_tokens" in err
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2]
    for rec in steps:
        for key in ("reward_mean", "reward_std", "zero_std_groups", "completion_len_mean", "completion_len_max",
                    "stop_fraction", "truncated_fraction", "kl_ref", "kl", "clip_fraction", "approx_kl", "entropy",
                    "reward_length_corr", "alarm_truncated", "alarm_kl", "alarm_length_growth"):
            assert key in rec, key
        assert 0 <= rec["reward_mean"] <= 1 and 0 <= rec["zero_std_groups"] <= 1
        assert rec["completion_len_max"] <= 8 and rec["entropy"] > 0
        assert rec["alarm_truncated"] == 1.0
    # Step 1 is the first pass over fresh rollouts: ratio 1, nothing clipped, reference = policy.
    assert steps[0]["clip_fraction"] == 0 and abs(steps[0]["kl_ref"]) < 1e-6
    assert "eval_reward" in lines[-1]
    assert (run / "final" / "model.safetensors").exists() and (run / "checkpoints").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 2


def test_grpo_rejects_non_skills_records_for_the_skills_verifier(tmp_path, tiny_model_dir, skills):
    bad = tmp_path / "plain.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    from instructkit.config import load_config
    from instructkit.data.errors import DataError
    from instructkit.methods import grpo

    cfg = load_config(_config(tmp_path, tiny_model_dir, skills), [f"data.train={bad}"])
    with pytest.raises(DataError, match=r"plain.jsonl:1.*rl.reward: skills needs a known 'family'"):
        grpo.main(cfg)


def length_reward(record: dict, completion: str) -> float:
    """A planted reward with variance on a random model: shorter completions score higher."""
    return -len(completion) / 10.0


@pytest.mark.slow
def test_grpo_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, skills):
    from conftest import train_cli

    def run(name, steps, *extra):
        cfg = yaml.safe_load(_config(tmp_path, tiny_model_dir, skills, reward="test_grpo:length_reward").read_text())
        cfg["output_dir"] = str(tmp_path / name)
        cfg["data"].pop("eval")
        cfg["train"].update(max_steps=steps, save_every=1, schedule="constant")
        return train_cli(cfg, tmp_path / f"{name}.yaml", *extra)

    run("a", 2)
    resumed = run("a", 3, "--resume")
    straight = run("b", 3)
    for key in ("loss", "reward_mean", "kl_ref", "grad_norm"):
        assert [x[key] for x in resumed] == [x[key] for x in straight], key
    assert straight[2]["kl_ref"] > 0  # the policy moved, so the comparison is not trivially equal
