"""Multi-process training under torchrun on CPU (gloo): DDP and FSDP2 give the single-process
losses for the same global batch, write Hugging Face-loadable weights, survive a killed rank and
resume (with the same or another number of ranks), and stop every rank when one fails."""

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

from instructkit import cli
from instructkit.distributed import shard_step

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
TOL = 1e-5


# ---------------------------------------------------------------------------------------------- helpers


def torchrun(*args, nproc=2, script=None, timeout=240):
    entry = [str(script)] if script else ["-m", "instructkit"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *entry, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def assert_same_losses(ref: Path, got: Path, tol=TOL):
    a, b = losses(ref), losses(got)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= tol, (worst, a, b)
    ea = [r["eval_loss"] for r in records(ref) if "eval_loss" in r]
    eb = [r["eval_loss"] for r in records(got) if "eval_loss" in r]
    assert len(ea) == len(eb) and all(abs(x - y) <= tol for x, y in zip(ea, eb)), (ea, eb)


def run_in_process(cfg: Path, *overrides) -> None:
    """A 1-process reference run; one thread, like each torchrun worker (two threads on a busy
    2-core machine can be 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", str(cfg), *map(str, overrides)]) == 0
    finally:
        torch.set_num_threads(threads)


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children (Linux /proc)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(d)
    return None


def kill_rank_mid_run(run: Path, cfg: Path, *overrides, rank=1, after_steps=5):
    """Start a 2-process run, SIGKILL one rank once ``after_steps`` steps are logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "instructkit", "train", str(cfg), *map(str, overrides)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps:
            break
        time.sleep(0.005)
    pid = rank_pid(proc.pid, rank)
    assert pid is not None and proc.poll() is None, "the run finished before a rank could be killed"
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out, time.time() - t0


def write_cfg(path: Path, **sections) -> Path:
    cfg = {}
    for k, v in sections.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------- fast


def test_shard_step_covers_the_global_step_exactly_once():
    group = [{"id": i} for i in range(5)]  # a short last step: 5 micro-batches over 2 ranks
    r0, r1 = shard_step(group, 0, 2), shard_step(group, 1, 2)
    assert [b["id"] for b, real in r0 if real] == [0, 2, 4]
    assert [b["id"] for b, real in r1 if real] == [1, 3]
    assert len(r0) == len(r1) == 3 and r1[-1][1] is False  # padded with a zero-weight pass
    assert shard_step(group, 0, 1) == [(b, True) for b in group]
    lone = shard_step(group[:1], 1, 4)  # a rank with nothing to do still runs one pass
    assert len(lone) == 1 and lone[0][1] is False


def test_distributed_config_errors():
    from instructkit.config import ConfigError, load_config

    base = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError, match="quantize_4bit cannot be sharded"):
        load_config(raw=base, overrides=["distributed.strategy=fsdp2", "lora.enabled=true",
                                         "lora.quantize_4bit=true"])
    with pytest.raises(ConfigError, match="merge it afterwards"):
        load_config(raw=base, overrides=["distributed.strategy=fsdp2", "lora.enabled=true",
                                         "lora.merge_on_save=true"])
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_config(raw=base, overrides=["distributed.strategy=zero3"])
    with pytest.raises(ConfigError, match="Did you mean 'distributed.nproc'"):
        load_config(raw=base, overrides=["distributed.nprocs=2"])


def test_resume_with_another_global_batch_says_how_to_fix():
    from instructkit.config import TrainConfig
    from instructkit.loop import TrainingError, _check_same_global_batch

    saved = {"micro_batches_per_step": 4, "world_size": 2}
    _check_same_global_batch(saved, TrainConfig(grad_accum=4), 1, Path("ck"))  # 1 x 4 == 2 x 2
    with pytest.raises(TrainingError, match=r"Set train.grad_accum=4 to keep the global batch"):
        _check_same_global_batch(saved, TrainConfig(grad_accum=2), 1, Path("ck"))
    with pytest.raises(TrainingError, match="divides 4"):
        _check_same_global_batch(saved, TrainConfig(grad_accum=1), 3, Path("ck"))


# ---------------------------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model_dir):
    """An SFT config (padded batches: 21 micro-batches per epoch, so the last step of each epoch is
    short and one rank runs a zero-weight pass) and the 1-process reference run with grad_accum 2."""
    from instructkit.synth.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("dist_sft")
    toy = write_toy_dataset(root / "toy", n_train=42, n_eval=8, seed=3)
    cfg = write_cfg(root / "sft.yaml", method="sft", seed=0, output_dir=str(root / "ref"),
                    model={"name_or_path": str(tiny_model_dir)},
                    data={"train": str(toy / "train.jsonl"), "eval": str(toy / "eval.jsonl"),
                          "max_length": 512, "packing": False},
                    train={"epochs": 2, "micro_batch_size": 2, "grad_accum": 2, "lr": 2e-3,
                           "eval_every": 5, "save_every": 2, "keep_last": 3, "progress": False,
                           "bf16": False})
    run_in_process(cfg)
    return cfg, root


@pytest.mark.slow
def test_sft_ddp_and_fsdp2_match_one_process(sft):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, root = sft
    assert sorted(losses(root / "ref")) == list(range(1, 23))  # 2 epochs of 11 steps
    # DDP through the convenience relaunch: instructkit starts torchrun itself.
    p = subprocess.run([sys.executable, "-m", "instructkit", "train", str(cfg), f"output_dir={root / 'ddp'}",
                        "train.grad_accum=1", "distributed.nproc=2"],
                       capture_output=True, text=True, env=ENV, timeout=240)
    ok(p)
    assert "launching 2 processes" in p.stderr
    assert p.stderr.count("done: 22 steps") == 1  # only rank 0 reports
    # FSDP2 through torchrun directly, with activation checkpointing.
    ok(torchrun("train", cfg, f"output_dir={root / 'fsdp2'}", "train.grad_accum=1",
                "distributed.strategy=fsdp2", "model.gradient_checkpointing=true"))

    ref_w = load_file(str(root / "ref/final/model.safetensors"))
    for name in ("ddp", "fsdp2"):
        run = root / name
        assert_same_losses(root / "ref", run)
        assert len(records(run)) == len(records(root / "ref"))  # one metrics line per step, no duplicates
        state = json.loads((run / "checkpoints/step-00000022/trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["micro_batches_per_step"] == 2
        model = AutoModelForCausalLM.from_pretrained(run / "final")  # Hugging Face-loadable
        w = load_file(str(run / "final/model.safetensors"))
        assert sorted(w) == sorted(ref_w)
        # Adam's near-sign updates amplify float32 summation-order noise in tiny gradients.
        worst = max(float((w[k] - ref_w[k]).abs().max()) for k in w)
        assert worst < 1e-4, (name, worst)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.slow
def test_sft_killed_rank_stops_the_run_and_resume_matches(sft):
    cfg, root = sft
    run = root / "killed"
    code, out, stop_s = kill_rank_mid_run(run, cfg, f"output_dir={run}", "train.grad_accum=1")
    assert code != 0 and stop_s < 60, (code, stop_s)
    assert "rank      : 1" in out and "SIGKILL" in out, out[-3000:]  # torchrun names the rank
    killed_at = max(losses(run))
    assert killed_at < 22
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts, "no checkpoint before the kill"
    # Resume with the same number of ranks...
    p = ok(torchrun("train", cfg, f"output_dir={run}", "train.grad_accum=1", "train.resume=true"))
    assert f"resuming from {run / 'checkpoints' / ckpts[-1]}" in p.stderr
    assert_same_losses(root / "ref", run)


# ---------------------------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, tiny_model_dir):
    """A DPO config with LoRA on the skills preference pairs, and its 1-process reference run."""
    from instructkit.synth.skills import write_skills

    root = tmp_path_factory.mktemp("dist_dpo")
    skills = write_skills(root / "skills", seed=0, n_train=240, n_val=62, n_heldout_phrasing=31,
                          n_heldout_family=8, n_corpus=100)
    cfg = write_cfg(root / "dpo.yaml", method="dpo", seed=0, output_dir=str(root / "ref"),
                    model={"name_or_path": str(tiny_model_dir)},
                    lora={"enabled": True, "r": 4, "alpha": 8},
                    data={"train": str(skills / "preference.jsonl"),
                          "eval": str(skills / "preference_validation.jsonl"), "max_length": 256},
                    train={"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "lr": 5e-3,
                           "eval_every": 6, "save_every": 2, "keep_last": 3, "progress": False,
                           "bf16": False},
                    preference={"beta": 0.1, "reference_cache": str(root / "refcache")})
    run_in_process(cfg)
    return cfg, root


@pytest.mark.slow
def test_dpo_lora_fsdp2_matches_one_process(dpo):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, root = dpo
    run = root / "fsdp2"
    ok(torchrun("train", cfg, f"output_dir={run}", "train.grad_accum=1", "distributed.strategy=fsdp2"))
    assert_same_losses(root / "ref", run)
    a = load_file(str(root / "ref/final/adapter_model.safetensors"))
    b = load_file(str(run / "final/adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    cfg_d = yaml.safe_load(cfg.read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg_d["model"]["name_or_path"])
    PeftModel.from_pretrained(base, run / "final")  # the adapter loads as a peft adapter


@pytest.mark.slow
def test_dpo_killed_rank_then_resume_on_one_process(dpo):
    """Kill a DDP rank; resume with 1 process and grad_accum 2 (the same global batch)."""
    cfg, root = dpo
    run = root / "killed"
    code, out, stop_s = kill_rank_mid_run(run, cfg, f"output_dir={run}", "train.grad_accum=1", after_steps=3)
    assert code != 0 and stop_s < 60 and "SIGKILL" in out, (code, stop_s, out[-3000:])
    assert max(losses(run)) < 12
    run_in_process(cfg, f"output_dir={run}", "train.resume=true")
    assert_same_losses(root / "ref", run)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_with_its_message(sft, tmp_path):
    cfg, root = sft
    script = tmp_path / "failing_rank.py"
    script.write_text(
        "import os, sys\n"
        "import instructkit.methods.sft as sft\n"
        "from instructkit import cli\n"
        "if os.environ['RANK'] == '1':\n"
        "    calls = {'n': 0}\n"
        "    real = sft.nll_step\n"
        "    def failing(model, batch):\n"
        "        calls['n'] += 1\n"
        "        if calls['n'] == 4:\n"
        "            raise RuntimeError('planted failure on rank 1')\n"
        "        return real(model, batch)\n"
        "    sft.nll_step = failing\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    t0 = time.time()
    p = torchrun("train", cfg, f"output_dir={tmp_path / 'run'}", "train.grad_accum=1", script=script)
    assert p.returncode != 0 and time.time() - t0 < 120
    assert "planted failure on rank 1" in p.stderr and "rank      : 1" in p.stderr, p.stderr[-4000:]
    assert "done:" not in p.stderr
    assert max(losses(tmp_path / "run")) < 4
