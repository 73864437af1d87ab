"""The shared loop: token-normalised accumulation, schedules, NaN stop, checkpoint hygiene."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructkit.config import TrainConfig
from instructkit.loop import (StepOutput, TrainingError, count_targets, list_checkpoints, lr_lambda,
                              nll_step as _step, train_loop)


def _batches(seed=0, n=4, length=24, vocab=500):
    """n single-row batches of equal length with very different numbers of target tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(10, vocab, (1, length), generator=g)
        labels = ids.clone()
        labels[:, : length - 2 - 5 * i] = -100  # 2, 7, 12, 17 targets
        out.append({"input_ids": ids, "labels": labels,
                    "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(length)[None]})
    return out


def _cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _cfg(**kw):
    base = dict(lr=1e-2, max_grad_norm=None, schedule="constant", progress=False, epochs=1)
    base.update(kw)
    return TrainConfig(**base)


def test_grad_accum_4x1_equals_batch_of_4(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    micro = _batches()
    m1 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in m1.named_parameters()}
    # With eps=1, Adam's first update is lr*g/(|g|+1), nearly linear in g: the comparison then
    # measures the gradient itself instead of Adam's sign-like step, which amplifies float noise
    # in near-zero gradients.
    r1 = train_loop(model=m1, batches=lambda e: micro, micro_per_epoch=4, loss_fn=_step,
                    cfg=_cfg(grad_accum=4, max_steps=1, eps=1.0, lr=1.0), out_dir=tmp_path / "a")
    full = [_cat(micro)]
    r2 = train_loop(model=m2, batches=lambda e: full, micro_per_epoch=1, loss_fn=_step,
                    cfg=_cfg(grad_accum=1, max_steps=1, eps=1.0, lr=1.0), out_dir=tmp_path / "b")
    assert r1.global_step == r2.global_step == 1
    l1 = json.loads((tmp_path / "a/metrics.jsonl").read_text().splitlines()[0])["loss"]
    l2 = json.loads((tmp_path / "b/metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert l1 == pytest.approx(l2, rel=1e-6)  # float32 summation order differs
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        u1, u2 = p1 - before[n], p2 - before[n]
        assert u2.abs().max() > 0, n
        # Tolerance: relative to the update, plus a few float32 ULPs of the weight itself
        # (p_new - p_old cannot be more exact than that).
        ulps = 4 * torch.finfo(torch.float32).eps * before[n].abs().max()
        assert (u1 - u2).abs().max() <= 1e-5 * u2.abs().max() + ulps, n


def test_accumulated_gradient_equals_full_batch_gradient(tiny_model_dir):
    micro = _batches()
    m1 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = sum(count_targets(b) for b in micro)
    for b in micro:
        (_step(m1, b).loss_sum / total).backward()
    out = _step(m2, _cat(micro))
    (out.loss_sum / out.n_targets).backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert (p1.grad - p2.grad).abs().max() <= 1e-5 * p2.grad.abs().max(), n


def test_naive_mean_of_means_would_differ(tiny_model_dir):
    """Guard for the test above: averaging per-micro-batch means is NOT the same objective."""
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    micro = _batches()
    with torch.no_grad():
        outs = [_step(m, b) for b in micro]
    token_mean = sum(float(o.loss_sum) for o in outs) / sum(o.n_targets for o in outs)
    mean_of_means = sum(float(o.loss_sum) / o.n_targets for o in outs) / len(outs)
    assert abs(token_mean - mean_of_means) > 1e-4


def test_count_targets_uses_shifted_labels():
    b = {"labels": torch.tensor([[5, -100, 7, 8]])}
    assert count_targets(b) == 2  # the first position is never a target


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_shapes(schedule):
    cfg = _cfg(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(cfg, 110)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    if schedule == "constant":
        assert f(110) == 1.0
    else:
        assert f(10) == pytest.approx(1.0)
        assert f(110) == pytest.approx(0.1)
        mid = f(60)
        assert mid == pytest.approx(0.55 if schedule == "linear" else 0.1 + 0.9 * 0.5)


def test_nan_loss_stops_with_step_and_checkpoint(tiny_model_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    micro = _batches()
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = _step(model, batch)
        if calls["n"] == 4:
            out = StepOutput(out.loss_sum * float("nan"), out.n_targets)
        return out

    with pytest.raises(TrainingError, match=r"loss is nan at step 4.*last checkpoint: .*step-00000002"):
        train_loop(model=m, batches=lambda e: micro, micro_per_epoch=4, loss_fn=poisoned,
                   cfg=_cfg(save_every=2), out_dir=tmp_path)


def test_keep_last_and_atomic_names(tiny_model_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    micro = _batches(n=4) * 2
    train_loop(model=m, batches=lambda e: micro, micro_per_epoch=8, loss_fn=_step,
               cfg=_cfg(save_every=1, keep_last=3), out_dir=tmp_path)
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000006", "step-00000007", "step-00000008"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "target_tokens_per_s", "tokens_seen"):
        assert all(math.isfinite(r[key]) for r in lines), key
    assert lines[-1]["tokens_seen"] == 2 * (2 + 7 + 12 + 17)


def assert_sigterm_resume_matches_uninterrupted(model_dir, tmp_path, cfg: dict) -> None:
    """A run killed by SIGTERM during step 4 of 6 checkpoints; resumed in a fresh model, it ends with the
    uninterrupted run's losses, learning rates and weights exactly."""
    import os
    import signal

    micro = _batches(n=4) * 3  # 12 micro-batches, 6 steps of 2
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    train_loop(model=ref, batches=lambda e: micro, micro_per_epoch=12, loss_fn=_step,
               cfg=_cfg(**cfg), out_dir=tmp_path / "ref")

    calls = {"n": 0}

    def killing_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # during step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return _step(model, batch)

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    r = train_loop(model=m, batches=lambda e: micro, micro_per_epoch=12, loss_fn=killing_step,
                   cfg=_cfg(**cfg), out_dir=tmp_path / "run")
    assert r.status == "interrupted" and r.global_step == 4
    assert r.last_checkpoint.name == "step-00000004"

    m2 = AutoModelForCausalLM.from_pretrained(model_dir)  # fresh process state
    r2 = train_loop(model=m2, batches=lambda e: micro, micro_per_epoch=12, loss_fn=_step,
                    cfg=_cfg(resume=True, **cfg), out_dir=tmp_path / "run")
    assert r2.status == "completed" and r2.global_step == 6
    a = [json.loads(x) for x in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in b] == [x["step"] for x in a] == list(range(1, 7))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 and x["lr"] == y["lr"]
    for (n, p1), (_, p2) in zip(ref.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    assert_sigterm_resume_matches_uninterrupted(
        tiny_model_dir, tmp_path, dict(grad_accum=2, save_every=100, schedule="cosine", warmup_steps=2, lr=1e-3))


def test_bf16_autocast_on_cpu_keeps_fp32_master_weights_and_tracks_fp32_loss(tiny_model_dir, tmp_path):
    """train.bf16: true on CPU runs the forward under bf16 autocast; parameters, gradients and the
    optimizer state stay fp32, and the loss is the fp32 loss up to bf16 rounding."""
    micro = _batches()
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        train_loop(model=m, batches=lambda e: micro, micro_per_epoch=4, loss_fn=_step,
                   cfg=_cfg(grad_accum=1, max_steps=2, bf16=bf16), out_dir=tmp_path / str(bf16))
        assert {p.dtype for p in m.parameters()} == {torch.float32}
        losses[bf16] = [json.loads(x)["loss"] for x in (tmp_path / str(bf16) / "metrics.jsonl").read_text().splitlines()]
    assert losses[True] != losses[False]  # autocast really ran in bf16
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_amx_note_only_when_bf16_would_pay(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import instructkit.loop as loop_mod

    micro = _batches(n=1)
    for pays, bf16, expect in ((True, "auto", True), (False, "auto", False), (True, False, False)):
        monkeypatch.setattr(loop_mod, "_bf16_would_pay", lambda model: pays)
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        train_loop(model=m, batches=lambda e: micro, micro_per_epoch=1, loss_fn=_step,
                   cfg=_cfg(max_steps=1, bf16=bf16), out_dir=tmp_path / f"{pays}{bf16}")
        assert ("train.bf16: true" in capsys.readouterr().err) is expect


@pytest.mark.parametrize("amx,avx512_bf16,expect", [(True, False, True), (False, True, True), (False, False, False)])
def test_cpu_has_fast_bf16_with_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expect):
    """Either native bf16 instruction set counts; a probe that raises or is missing counts as absent."""
    from instructkit.models import cpu_has_fast_bf16

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_has_fast_bf16() is expect

    def broken():
        raise RuntimeError("no cpuinfo")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert cpu_has_fast_bf16() is avx512_bf16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert cpu_has_fast_bf16() is False


def test_bf16_would_pay_needs_a_large_model_and_amx(tiny_model_dir, monkeypatch):
    import instructkit.models as models
    from instructkit.loop import _bf16_would_pay

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert not _bf16_would_pay(m)  # a tiny model gains nothing
    assert _bf16_would_pay(m, min_params=1)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert not _bf16_would_pay(m, min_params=1)
