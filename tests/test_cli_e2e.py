"""The CLI end to end, as a user runs it: train (full, LoRA), resume after a hard kill, SIGINT,
validate, data preview/stats, tiny-model, and clear errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "instructkit", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from instructkit.synth.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=160, n_eval=24, seed=1)


def write_cfg(path: Path, model_dir, toy, out, **sections) -> Path:
    cfg = {"method": "sft", "seed": 0, "output_dir": str(out),
           "model": {"name_or_path": str(model_dir)},
           "data": {"train": str(toy / "train.jsonl"), "eval": str(toy / "eval.jsonl"), "max_length": 512},
           "train": {"epochs": 1, "micro_batch_size": 2, "lr": 1e-3, "progress": False}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_full_sft_end_to_end(tmp_path, tiny_model_dir, toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run",
                    train={"eval_every": 5, "save_every": 5})
    p = cli("train", cfg, "train.max_steps=10")
    run = tmp_path / "run"
    assert "done: 10 steps" in p.stderr and "data: 160 train / 24 eval examples" in p.stderr
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert "eval_loss" in recs[4] and "eval_loss" in recs[9]
    assert {"loss", "lr", "grad_norm", "target_tokens_per_s", "tokens_seen"} <= set(recs[0])
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 10
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert tok.chat_template and "generation" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    assert changed
    assert json.loads((run / "skipped.json").read_text())["skipped"] == 0


def test_lora_adapter_and_merged_model(tmp_path, tiny_model_dir, toy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run",
                    lora={"enabled": True, "r": 4, "alpha": 8, "merge_on_save": True},
                    train={"lr": 1e-2})
    p = cli("train", cfg, "train.max_steps=6")
    assert "(LoRA)" in p.stderr
    final = tmp_path / "run/final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    ids = torch.tensor([[5, 17, 33, 60, 99, 140]])
    with torch.no_grad():
        a = peft_model(ids).logits
        b = merged(ids).logits
        c = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapter changed something


def test_resume_after_hard_kill_matches_uninterrupted(tmp_path, tiny_model_dir, toy):
    """SIGKILL mid-run (no chance to save), then --resume: the same losses as a clean run."""
    common = dict(lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},  # dropout uses the RNG
                  train={"save_every": 3, "keep_last": 2, "max_steps": 40, "lr": 5e-3})
    ref_cfg = write_cfg(tmp_path / "ref.yaml", tiny_model_dir, toy, tmp_path / "ref", **common)
    cli("train", ref_cfg)
    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run", **common)
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "train", str(cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "run/checkpoints/step-00000006"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(losses(tmp_path / "run"))
    assert killed_at < 40
    p = cli("train", cfg, "--resume")
    assert "resuming from" in p.stderr
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(got) == sorted(ref) == list(range(1, 41))
    for step in ref:
        assert abs(ref[step] - got[step]) <= 1e-6, (step, ref[step], got[step])


def test_sigint_saves_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir, toy):
    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run",
                    train={"save_every": 1000, "max_steps": 400})
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "train", str(cfg)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "received SIGINT" in err and "--resume" in err
    ckpts = list((tmp_path / "run/checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").exists()


def test_validate_reports_ok_and_errors(tmp_path, tiny_model_dir, toy):
    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run")
    p = cli("validate", cfg)
    assert "config: ok" in p.stdout and "data: ok (160 train, 24 eval" in p.stdout
    bad = tmp_path / "bad.jsonl"
    good = (toy / "train.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join([good[0], '{"messages": [{"role": "user", "content": "hi"}]}', good[1],
                              '{"messages": [{"role": "robot", "content": "x"}, '
                              '{"role": "assistant", "content": "y"}]}']) + "\n")
    p = cli("validate", cfg, f"data.train={bad}", check=False)
    assert p.returncode == 2
    assert f"{bad}:2" in p.stderr and "assistant" in p.stderr and "Fix:" in p.stderr
    p = cli("validate", cfg, f"data.train={bad}", "data.on_error=skip", check=False)
    assert "2 of 28 records skipped" in p.stdout and "bad.jsonl:2" in p.stdout and "bad.jsonl:4" in p.stdout


def test_train_with_skip_writes_skipped_json(tmp_path, tiny_model_dir, toy):
    bad = tmp_path / "mixed.jsonl"
    lines = (toy / "train.jsonl").read_text().splitlines()[:20]
    lines.insert(5, "{not json")
    bad.write_text("\n".join(lines) + "\n")
    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run",
                    data={"train": str(bad), "on_error": "skip"})
    p = cli("train", cfg, "train.max_steps=2")
    assert "1 of 45 records skipped" in p.stderr  # 21 train lines + 24 eval records
    rep = json.loads((tmp_path / "run/skipped.json").read_text())
    assert rep["skipped"] == 1 and rep["records"][0]["line"] == 6 and rep["by_reason"] == {"invalid_json": 1}


def test_config_errors_are_clear(tmp_path, tiny_model_dir, toy):
    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run")
    p = cli("train", cfg, "train.learning_rate=1", check=False)
    assert p.returncode == 2 and "Did you mean 'train.lr'" in p.stderr and "Traceback" not in p.stderr
    p = cli("train", cfg, "model.name_or_path=/nonexistent/model", check=False)
    assert p.returncode == 2 and "/nonexistent/model" in p.stderr and "Traceback" not in p.stderr
    p = cli("train", cfg, "lora.enabled=true", "lora.quantize_4bit=true", check=False)
    if not torch.cuda.is_available():
        assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr


def test_data_preview_and_stats(tmp_path, tiny_model_dir, toy):
    p = cli("data", "preview", toy / "train.jsonl", "--model", tiny_model_dir, "-n", "2")
    assert p.stdout.count("===") == 4 and "[[" in p.stdout and "<|im_end|>]]" in p.stdout
    assert "[[<|im_start|>" not in p.stdout  # headers are context, not trained
    p = cli("data", "stats", toy / "train.jsonl", "--model", tiny_model_dir, "--json")
    st = json.loads(p.stdout)
    assert st["usable"] == 160 and st["skipped"] == 0 and st["tokens"]["p50"] > 0
    assert 0 < st["target_tokens"]["fraction_of_tokens"] < 1


def test_data_stats_on_real_sharegpt(shared_data):
    p = cli("data", "stats", shared_data / "sharegpt/dummy_conversation.json")
    assert "500 usable of 500 records" in p.stdout


def test_tiny_model_cli_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    cli("tiny-model", "--out", tmp_path / "a", "--seed", "3")
    p = cli("tiny-model", "--out", tmp_path / "b", "--seed", "3")
    assert "nano model" in p.stdout
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()


def test_lora_with_gradient_checkpointing_trains(tmp_path, tiny_model_dir, toy):
    cfg = write_cfg(tmp_path / "c.yaml", tiny_model_dir, toy, tmp_path / "run",
                    model={"gradient_checkpointing": True}, lora={"enabled": True, "r": 4},
                    data={"packing": False})
    cli("train", cfg, "train.max_steps=3")
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3] and all(v > 0 for v in got.values())
