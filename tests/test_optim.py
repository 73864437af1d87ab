"""train.optimizer: muon (Muon on hidden matrices + AdamW on the rest) as one optimizer of the shared loop."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructkit.config import TrainConfig, load_config
from instructkit.loop import lr_lambda, nll_step, train_loop
from instructkit.optim import MuonAdamW, make_optimizer, muon_matrices
from test_loop import _batches, _cfg, assert_sigterm_resume_matches_uninterrupted


def _muon_cfg(**kw):
    return TrainConfig(**{"optimizer": "muon", "lr": 1e-3, "muon_lr": 0.02, "weight_decay": 0.01, **kw})


def test_muon_takes_hidden_matrices_only(tiny_model_dir):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = muon_matrices(m)
    names = {n for n, p in m.named_parameters() if id(p) in ids}
    layers = m.config.num_hidden_layers
    assert len(names) == 7 * layers  # q, k, v, o, gate, up, down in every layer
    assert all(n.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
               for n in names)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    opt = make_optimizer(m, _muon_cfg())
    assert isinstance(opt, MuonAdamW)
    groups = opt.param_groups
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)
    assert groups[0]["lr"] == 1e-3 and groups[-1]["lr"] == 0.02  # AdamW's peak (logged as lr), Muon's
    assert groups[1]["weight_decay"] == 0.0  # 1-D tensors: no decay
    assert isinstance(make_optimizer(m, TrainConfig(lr=1e-3)), torch.optim.AdamW)


def test_muon_step_is_an_orthogonalised_momentum_update():
    """One step from zero momentum on a lone matrix: Nesterov momentum of g is (1 + mu) g, and the update
    is -lr * scale * NS(.), whose singular values Newton-Schulz pushes towards 1 -- all
    directions move about equally, unlike the raw gradient's spread of singular values."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(64, 32, bias=False))
    w0 = lin[0].weight.detach().clone()
    g = torch.randn(64, 32) @ torch.diag(torch.logspace(0, 1.5, 32))  # condition number ~30
    lin[0].weight.grad = g.clone()
    lin[1].weight.grad = torch.zeros(32, 64)
    opt = MuonAdamW([{"params": [lin[0].weight]}], [{"params": [lin[1].weight]}],
                    dict(lr=0.1, weight_decay=0.0), dict(lr=1e-3))
    opt.step()
    delta = (lin[0].weight.detach() - w0) / -0.1
    s = torch.linalg.svdvals(delta)
    scale = max(1.0, 64 / 32) ** 0.5  # torch's "original" shape adjustment
    sg = torch.linalg.svdvals(g)
    assert sg.max() / sg.min() > 20
    assert s.max() / s.min() < 3  # nearly orthogonal: every direction moves about equally
    assert 0.6 < s.mean() / scale < 1.3
    # The update points along the gradient: a descent direction.
    assert (delta * g).sum() > 0


def test_scheduler_scales_both_peaks(tiny_model_dir):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = _muon_cfg(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    opt = make_optimizer(m, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 10))
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)


def test_muon_trains_every_parameter_and_checkpoints_both_states(tiny_model_dir, tmp_path):
    micro = _batches(n=4) * 3  # 12 micro-batches, 6 steps of 2
    cfg = dict(grad_accum=2, schedule="cosine", warmup_steps=2, optimizer="muon", muon_lr=0.02, lr=1e-3,
               save_every=3)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    train_loop(model=m, batches=lambda e: micro, micro_per_epoch=12, loss_fn=nll_step,
               cfg=_cfg(**cfg), out_dir=tmp_path)
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[1]["lr"] == pytest.approx(1e-3) and lines[1]["muon_lr"] == pytest.approx(0.02)  # end of warmup
    saved = torch.load(tmp_path / "checkpoints/step-00000006/optimizer.pt", weights_only=True)
    st = saved["optimizer"]["state"]
    n_params = sum(1 for _ in m.parameters())
    assert sorted(st) == list(range(n_params))  # the standard layout: one index per parameter
    assert sum("momentum_buffer" in s for s in st.values()) == len(muon_matrices(m))
    assert sum("exp_avg" in s for s in st.values()) == n_params - len(muon_matrices(m))


def test_resume_mid_run_matches_uninterrupted(tiny_model_dir, tmp_path):
    """Muon's momentum and AdamW's moments both come back from the checkpoint: bit-exact resume."""
    assert_sigterm_resume_matches_uninterrupted(
        tiny_model_dir, tmp_path, dict(grad_accum=2, save_every=100, schedule="cosine", warmup_steps=2,
                                       optimizer="muon", muon_lr=0.02, lr=1e-3, weight_decay=0.01))


@pytest.mark.parametrize("extra, match", [
    ({"lora": {"enabled": True}}, "muon updates the model's own weight matrices"),
    ({"distributed": {"strategy": "fsdp2"}}, "muon needs whole matrices"),
])
def test_muon_rejects_lora_and_fsdp2(extra, match):
    raw = {"method": "sft", "output_dir": "x", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
           "train": {"optimizer": "muon"}, **extra}
    with pytest.raises(ValueError, match=match):
        load_config(raw=raw)
