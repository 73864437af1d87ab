"""Sizing `instructkit demo` to a wall-clock budget: the planning arithmetic, the step timer, the demo."""

from __future__ import annotations

import json

import pytest

from instructkit.budget import StageCosts, floor_to, plan_epochs

COSTS = StageCosts(pretrain_epoch_s=100.0, pretrain_fixed_s=10.0, sft_epoch_s=60.0, sft_fixed_s=8.0, reserve_s=12.0)
KW = dict(budget_s=600.0, tune_budget_s=180.0, spent_s=30.0, tune_spent_s=20.0)


def test_floor_to_quanta():
    assert floor_to(2.333, 0.25) == 2.25 and floor_to(4.05, 0.5) == 4.0 and floor_to(0.75, 0.25) == 0.75
    assert floor_to(0.1, 0.25) == 0.0


def test_plan_sizes_tuning_for_the_cached_budget_then_pretraining_with_the_rest():
    plan = plan_epochs(COSTS, pretrain=True, **KW)
    # tuning: (180 - 20 - (8 + 12)) / 60 = 2.33 -> 2.25 epochs
    assert plan.sft_epochs == 2.25
    # pretraining: (600 - 30 - 10 - 20 - 2.25 * 60) / 100 = 4.05 -> 4.0 epochs
    assert plan.pretrain_epochs == 4.0
    assert plan.predicted_total_s == pytest.approx(30 + 10 + 400 + 20 + 135) and plan.fits
    assert plan.budget_s == 600.0


def test_plan_with_a_cached_base_fits_the_tuning_budget():
    plan = plan_epochs(COSTS, pretrain=False, **KW)
    assert plan.pretrain_epochs is None and plan.sft_epochs == 2.25
    assert plan.predicted_total_s == pytest.approx(20 + 20 + 135) and plan.budget_s == 180.0 and plan.fits


def test_plan_never_exceeds_the_recipe():
    fast = StageCosts(pretrain_epoch_s=10.0, pretrain_fixed_s=1.0, sft_epoch_s=5.0, sft_fixed_s=1.0, reserve_s=1.0)
    plan = plan_epochs(fast, pretrain=True, **KW)
    assert (plan.pretrain_epochs, plan.sft_epochs) == (5.0, 3.0)
    plan = plan_epochs(fast, pretrain=True, max_pretrain_epochs=1.0, max_sft_epochs=0.3, **KW)
    assert (plan.pretrain_epochs, plan.sft_epochs) == (1.0, 0.3)


def test_quick_from_cold_shares_one_budget_between_base_and_tuning():
    # (180 - 30 - 10 - 20) / (100 + 60) = 0.75 epochs of each
    plan = plan_epochs(COSTS, pretrain=True, joint=True, max_pretrain_epochs=1.0, max_sft_epochs=1.0,
                       **{**KW, "budget_s": 180.0})
    assert (plan.pretrain_epochs, plan.sft_epochs) == (0.75, 0.75)
    assert plan.predicted_total_s == pytest.approx(180.0) and plan.fits


def test_a_machine_too_slow_for_the_budget_gets_the_smallest_plan_and_is_told():
    slow = StageCosts(pretrain_epoch_s=1000.0, pretrain_fixed_s=10.0, sft_epoch_s=1000.0, sft_fixed_s=8.0,
                      reserve_s=12.0)
    plan = plan_epochs(slow, pretrain=True, **KW)
    assert (plan.pretrain_epochs, plan.sft_epochs) == (0.5, 0.25) and not plan.fits
    assert plan.predicted_total_s == pytest.approx(30 + 10 + 500 + 20 + 250)


def test_time_train_steps_times_real_steps(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from instructkit.budget import time_train_steps
    from instructkit.data.packing import collate_packed
    from instructkit.data.encode import EncodedExample

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    ex = [EncodedExample(input_ids=list(range(5, 25)), labels=[-100] + list(range(6, 25))) for _ in range(4)]
    batches = [collate_packed(ex, [[0, 1], [2, 3]], pad_id=0) for _ in range(3)]
    for optimizer in ("adamw", "muon"):
        sec = time_train_steps(model, batches, optimizer=optimizer, bf16=False)
        assert 0.0 < sec < 30.0
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)  # real optimizer steps ran
    with pytest.raises(ValueError, match="more than 1 batches"):
        time_train_steps(model, batches[:1], optimizer="adamw", bf16=False)


def test_demo_within_a_budget_at_miniature_scale(tmp_path, capsys):
    """A budget too small for anything: the demo plans the smallest epochs, says it is over budget, and
    still runs every stage; a rerun reuses that base and sizes only its tuning."""
    from instructkit.demo import run_demo

    kw = dict(cache=tmp_path / "cache", preset="nano", limit=2, n_train=150, n_corpus=600, budget=1.0)
    summary = run_demo(out=tmp_path / "demo", **kw)
    plan = summary["plan"]
    assert (plan["pretrain_epochs"], plan["sft_epochs"]) == (0.5, 0.25) and plan["fits"] is False
    assert summary["epochs"] == {"pretrain": 0.5, "sft": 0.25, "pretrain_recipe": 5.0, "sft_recipe": 3.0}
    m = plan["measured"]
    assert m["pretrain_step_s"] > 0 and m["sft_step_s"] > 0 and m["pretrain_steps_per_epoch"] >= 1
    assert "OVER budget" in capsys.readouterr().err
    recipe = json.loads((tmp_path / "cache/demo" / summary["base"].split("/")[-2] / "recipe.json").read_text())
    assert recipe["pretrain_epochs"] == 0.5
    assert "epochs: 0.25" in (tmp_path / "demo/sft-full/config.yaml").read_text()
    again = run_demo(out=tmp_path / "demo2", **kw)
    assert again["base"] == summary["base"] and again["plan"]["pretrain_epochs"] is None
    assert again["epochs"]["pretrain"] == 0.5
    with pytest.raises(ValueError, match="budget must be a positive"):
        run_demo(out=tmp_path / "x", budget=0)
    from instructkit.report import write_report

    md, _ = write_report(tmp_path / "demo2", again, ["instructkit demo --budget 1"])
    text = md.read_text()
    assert "## How this run was sized" in text and "| epochs trained (of the recipe's) | 0.5 (cached base) | 0.25 of 3 |" in text
    assert "too slow for it" in text and "| sizing to the budget |" in text


def test_demo_cli_rejects_a_negative_budget(tmp_path, capsys):
    from instructkit.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--budget", "-5"]) == 2
    assert "--budget takes seconds" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_plan_margin_sizes_for_a_share_of_the_budget_but_judges_fit_against_all_of_it():
    plan = plan_epochs(COSTS, pretrain=True, margin=0.9, **KW)
    # tuning: (0.9 * 180 - 20 - 20) / 60 = 2.03 -> 2.0; pretraining: (0.9 * 600 - 30 - 10 - 20 - 120) / 100 = 3.6 -> 3.5
    assert (plan.pretrain_epochs, plan.sft_epochs) == (3.5, 2.0)
    assert plan.predicted_total_s == pytest.approx(30 + 10 + 350 + 20 + 120) and plan.budget_s == 600.0 and plan.fits


def test_plan_with_given_tuning_epochs_only_predicts():
    plan = plan_epochs(COSTS, pretrain=False, sft_epochs=2.5, **KW)
    assert plan.sft_epochs == 2.5 and plan.predicted_total_s == pytest.approx(20 + 20 + 150) and not plan.fits
    assert plan_epochs(COSTS, pretrain=False, sft_epochs=9.0, **KW).sft_epochs == 3.0  # never over the recipe


def test_demo_plans_from_the_measured_costs_and_a_rerun_repeats_the_tuning_that_fits(tmp_path, monkeypatch):
    """The planning inside run_demo, with the timing replaced by fixed costs: the cold run's epochs, the
    plan stored beside the base, and a cached rerun on a 'slower' machine that repeats the cold run's
    tuning while it fits its budget and sizes its own when it does not."""
    import instructkit.demo as demo

    def costs(sft_epoch_s):
        c = StageCosts(pretrain_epoch_s=400.0, pretrain_fixed_s=0.0, sft_epoch_s=sft_epoch_s, sft_fixed_s=0.0,
                       reserve_s=0.0)
        return lambda *a, **k: (c, {"pretrain_step_s": 1.0, "pretrain_steps_per_epoch": 400, "sft_step_s": 1.0,
                                    "sft_steps_per_epoch": int(sft_epoch_s / 2)})

    kw = dict(cache=tmp_path / "cache", preset="nano", limit=2, n_train=150, n_corpus=600, budget=1000.0)
    monkeypatch.setattr(demo, "measure_costs", costs(200.0))
    cold = demo.run_demo(out=tmp_path / "a", **kw)
    # tuning: (0.95 * 300 - spent) / 200 -> 1.25; pretraining: (950 - spent - 250) / 400 -> 1.5
    assert (cold["plan"]["pretrain_epochs"], cold["plan"]["sft_epochs"]) == (1.5, 1.25)
    stored = json.loads((tmp_path / "cache/demo" / cold["base"].split("/")[-2] / "demo_plan.json").read_text())
    assert stored == {"budget": 1000.0, "quick": False, "sft_epochs": 1.25}
    monkeypatch.setattr(demo, "measure_costs", costs(230.0))  # sized alone: 1.0 epoch; 1.25 x 230 still fits 300
    again = demo.run_demo(out=tmp_path / "b", **kw)
    assert again["base"] == cold["base"] and again["plan"]["sft_epochs"] == 1.25 and again["plan"]["fits"]
    monkeypatch.setattr(demo, "measure_costs", costs(250.0))  # 1.25 x 250 = 312 s: over, so 1.0
    slower = demo.run_demo(out=tmp_path / "c", **kw)
    assert slower["plan"]["sft_epochs"] == 1.0 and slower["epochs"]["pretrain"] == 1.5
