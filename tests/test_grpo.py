"""GRPO end to end through the CLI on the nano tiny model and a few skills prompts."""

import json
import subprocess
import sys

import pytest
import torch
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
    cfg = _config(tmp_path, tiny_model_dir, skills, alarm_truncated=0.01, train_probe_prompts=3)
    proc = subprocess.run([sys.executable, "-m", "instructkit", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "grpo: 2 prompts x 4 completions per rollout, 1 optimizer step per rollout" in err and "done: 2 steps" in err
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
    # The fixed probe of training prompts: scored before training (summary) and at the final evaluation.
    assert "before training: eval reward " in err and "on 4 eval prompts (greedy)" in err
    assert "before training: train-probe reward " in err and ("on 3 of the run's training prompts (4 samples each "
                                                               "at temperature 1.0)") in err
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["eval_reward_start"] <= 1 and 0 <= summary["train_reward_start"] <= 1
    assert f", eval reward {summary['eval_reward_start']:.3f} -> {lines[-1]['eval_reward']:.3f}" in err
    assert f", train-probe reward {summary['train_reward_start']:.3f} -> {lines[-1]['train_reward']:.3f}" in err
    assert 0 <= lines[-1]["train_reward"] <= 1 and "train_completion_len" in lines[-1]
    assert (run / "final" / "model.safetensors").exists() and (run / "checkpoints").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 2 and 0 <= summary["train_reward_start"] <= 1


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


def test_dynamic_sampling_keeps_groups_with_reward_variance(monkeypatch, tmp_path, tiny_model_dir, skills):
    """rl.sampling_rounds > 1 (DAPO dynamic sampling): groups whose rewards are all equal are set aside, fresh
    prompts are sampled until the rollout is full of groups with variance, and set-aside groups fill any rest.
    A stub sampler and reward make it exact: only even-numbered prompts get reward variance."""
    from instructkit import rollout as ro
    from instructkit.config import load_config
    from instructkit.generate import Generation
    from instructkit.methods.grpo import Rollouts

    P = ro.Prompts(records=[{"n": i} for i in range(40)], messages=[[] for _ in range(40)],
                   ids=[[i] for i in range(40)])

    def fake_sample(model, tokenizer, prompt_ids, cfg, rollout, batch_size):
        return [Generation([7], f"{p[0]}:{k % 4}", [0.0], "stop") for k, p in enumerate(prompt_ids)]

    def reward(records, messages, texts):  # variance inside a group only for even prompts
        return [float(t.endswith(":0")) if int(t.split(":")[0]) % 2 == 0 else 0.0 for t in texts]

    monkeypatch.setattr(ro, "sample", fake_sample)
    cfg = load_config(_config(tmp_path, tiny_model_dir, skills), ["rl.prompts_per_rollout=4", "rl.sampling_rounds=3"])
    groups, sampled, gens, rounds = Rollouts(cfg, None, None, P, reward, None, None)._sample_groups(epoch=1)
    prompt_of = [g[0][0][0] for g in groups]
    stream = [i for r in range(3) for i in ro.prompt_indices(40, 4, 1 * 3 + r, 0)]
    assert rounds == next(r + 1 for r in range(3) if sum(i % 2 == 0 for i in stream[:4 * (r + 1)]) >= 4)
    assert prompt_of == [i for i in stream[:4 * rounds] if i % 2 == 0][:4]
    assert len(sampled) == len(gens) == 4 * 4 * rounds
    assert all(float(g[2].abs().sum()) > 0 for g in groups)  # every kept group carries a learning signal

    # Rounds run out: odd prompts only have no variance, so set-aside groups fill the rollout in sampled order.
    odd = ro.Prompts(records=P.records, messages=P.messages, ids=[[2 * i + 1] for i in range(40)])
    groups, sampled, gens, rounds = Rollouts(cfg, None, None, odd, reward, None, None)._sample_groups(epoch=1)
    assert rounds == 3 and len(groups) == 4 and all(float(g[2].abs().sum()) == 0 for g in groups)
    assert [g[0][0][0] for g in groups] == [2 * i + 1 for i in stream[:4]]

    # sampling_rounds = 1 is plain GRPO: the rollout's own prompts, in order, whatever their rewards.
    plain = load_config(_config(tmp_path, tiny_model_dir, skills), ["rl.prompts_per_rollout=4"])
    groups, _, _, rounds = Rollouts(plain, None, None, P, reward, None, None)._sample_groups(epoch=1)
    assert rounds == 1 and [g[0][0][0] for g in groups] == ro.prompt_indices(40, 4, 1, 0)
    with pytest.raises(Exception, match="sampling_rounds"):
        load_config(_config(tmp_path, tiny_model_dir, skills), ["method=ppo", "rl.sampling_rounds=2"])

    # rl.negative_weight scales the negative advantages of every group; positive ones are untouched.
    groups, _, _, _ = Rollouts(cfg, None, None, P, reward, None, None)._sample_groups(epoch=1)
    down = load_config(_config(tmp_path, tiny_model_dir, skills),
                       ["rl.prompts_per_rollout=4", "rl.sampling_rounds=3", "rl.negative_weight=0.25"])
    weighted, _, _, _ = Rollouts(down, None, None, P, reward, None, None)._sample_groups(epoch=1)
    assert [g[0] for g in weighted] == [g[0] for g in groups]
    for g, w in zip(groups, weighted):
        assert torch.allclose(w[2], torch.where(g[2] < 0, 0.25 * g[2], g[2]))
    assert any(float(g[2].min()) < 0 for g in groups)  # the check above is not vacuous


def test_train_probe_holds_prompts_the_run_trains_on(monkeypatch, tmp_path, tiny_model_dir, skills):
    """The probe is drawn from the first sampling round of the run's own rollouts (so every probe prompt is
    trained on), spread from the first rollout to the last; the sampled probe repeats exactly on the same
    policy (one fixed seed) and averages rl.train_probe_samples completions per prompt."""
    from instructkit import rollout as ro
    from instructkit.config import load_config

    cfg = load_config(_config(tmp_path, tiny_model_dir, skills),
                      ["rl.prompts_per_rollout=4", "rl.sampling_rounds=3", "train.max_steps=10"])
    rounds_0 = [ro.prompt_indices(240, 4, e * 3, 0) for e in range(10)]
    probe = ro.probe_indices(240, cfg, n_rollouts=10, size=8)
    assert len(probe) == len(set(probe)) == 8
    assert set(probe) <= {i for r in rounds_0 for i in r}
    assert probe[0] in rounds_0[0] and probe[-1] in rounds_0[9] and not set(probe) <= set(rounds_0[0] + rounds_0[1])
    # Later rounds of a rollout run only when earlier ones lack reward variance, so they are not in the probe.
    assert not set(probe) & ({i for e in range(10) for i in ro.prompt_indices(240, 4, e * 3 + 1, 0)}
                             - {i for r in rounds_0 for i in r})
    # A probe as large as everything drawn is everything drawn, once each; a run longer than the data stops early.
    assert sorted(ro.probe_indices(240, cfg, 10, 1000)) == sorted({i for r in rounds_0 for i in r})
    assert sorted(ro.probe_indices(240, cfg, 500, 1000)) == list(range(240))

    P = ro.Prompts(records=[{"n": i} for i in range(3)], messages=[[] for _ in range(3)], ids=[[i] for i in range(3)])
    calls = []

    def fake_generate(model, tokenizer, ids, sampling, batch_size):
        calls.append((ids, sampling))
        from instructkit.generate import Generation
        return [Generation([7], f"{k % 2}", [0.0], "stop") for k in range(len(ids))]

    monkeypatch.setattr(ro, "generate", fake_generate)
    reward = lambda recs, msgs, texts: [float(t) for t in texts]  # noqa: E731
    out = ro.score_prompts(None, None, P, reward, cfg, samples=4)
    again = ro.score_prompts(None, None, P, reward, cfg, samples=4)
    greedy = ro.score_prompts(None, None, P, reward, cfg, samples=0)
    assert calls[0][0] == [[0]] * 4 + [[1]] * 4 + [[2]] * 4 and out == again and out[0] == [0.5, 0.5, 0.5]
    assert calls[0][1].seed == calls[1][1].seed and calls[0][1].temperature == cfg.rl.temperature
    assert calls[2][0] == [[0], [1], [2]] and calls[2][1].temperature == 0 and greedy[0] == [0.0, 1.0, 0.0]
    # The paired standard error of a change: per-prompt differences 0.1, 0.2, 0.3 -> sd 0.1, se 0.1 / sqrt(3).
    assert abs(ro.paired_se([0.0, 0.0, 0.0], [0.1, 0.2, 0.3]) - 0.1 / 3 ** 0.5) < 1e-12
    assert ro.paired_se([0.5], [1.0]) == 0.0


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_log_probs_are_taken_at_the_sampling_temperature(tmp_path, tiny_model_dir, skills, method):
    """At rl.temperature T the rollout samples from softmax(logits / T), so its old-policy and reference
    log-probs are log softmax(logits / T) of each completion token (checked against a hand computation), and
    the loss, on the untouched policy, sees a ratio of exactly 1 (approx_kl 0): the same T on both sides."""
    from instructkit import rollout as ro
    from instructkit.config import load_config
    from instructkit.data.pipeline import prepare_template
    from instructkit.methods import grpo, ppo
    from instructkit.models import load_model, load_tokenizer

    cfg = load_config(_config(tmp_path, tiny_model_dir, skills),
                      [f"method={method}", "rl.temperature=0.5", "rl.kl_coef=0.1", "rl.prompts_per_rollout=2"])
    tok = load_tokenizer(cfg.model)
    template, _ = prepare_template(tok, cfg.data)
    _, prompts, _ = ro.load_rl_data(cfg, tok, template)
    torch.manual_seed(0)
    model = load_model(cfg.model, cfg.lora, torch.device("cpu"))
    mod = grpo if method == "grpo" else ppo
    if method == "ppo":
        ppo.attach_value_head(model)
    reference = ro.make_reference(model, cfg)
    reward = lambda recs, msgs, texts: [float(len(t) % 2) for t in texts]  # noqa: E731 (reward variance)
    micro = mod.Rollouts(cfg, model, tok, prompts, reward, reference, torch.device("cpu"))(0)
    loss_fn, _ = mod.make_loss_fn(cfg)
    model.eval()
    for b in micro:
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        by_hand = torch.log_softmax(logits / 0.5, -1).gather(-1, b["labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
        by_hand = by_hand[b["labels"][:, 1:] != -100]
        mask = b["completion_mask"].bool()
        assert torch.allclose(b["old_logp"][mask], by_hand, atol=1e-4)
        assert torch.allclose(b["ref_logp"][mask], by_hand, atol=1e-4)  # the reference is the start policy
        untempered = torch.log_softmax(logits, -1).gather(-1, b["labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
        assert not torch.allclose(b["old_logp"][mask], untempered[b["labels"][:, 1:] != -100], atol=1e-2)
        with torch.no_grad():
            out = loss_fn(model, b)
        assert out.metrics["approx_kl"] < 1e-6 and out.metrics["clip_fraction"] == 0.0
