"""LoRA merge + export: merged logits equal base+adapter, same template and stops, model card, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from instructkit.data.encode import encode_prompt
from instructkit.data.templates import BUILTIN_TEMPLATES, ensure_template_tokens
from instructkit.export import ExportError, export_model
from instructkit.generate import SamplingConfig, generate, stop_token_ids
from instructkit.models import load_for_inference

CONVS = [[{"role": "user", "content": "Sort 3, 1, 2"}], [{"role": "user", "content": "hi"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]


def make_adapter(base_dir: Path, run_dir: Path, template: str | None = None) -> Path:
    """A LoRA adapter laid out as a LoRA SFT run writes it, with B randomly initialised (not a no-op)."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if template:
        if ensure_template_tokens(tok, template):
            model.resize_token_embeddings(len(tok))
        tok.chat_template = BUILTIN_TEMPLATES[template]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    final = run_dir / "final"
    peft_model.save_pretrained(final)
    tok.save_pretrained(final)
    (final / "instructkit.json").write_text(json.dumps({
        "method": "sft", "base_model": str(base_dir), "lora": True, "steps": 66, "train_examples": 2000,
        "skipped": 3, "seconds": 15.2, "final_metrics": {"loss": 1.2345, "eval_loss": 1.5}}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "method": "sft", "seed": 7, "model": {"name_or_path": str(base_dir)},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "template": template or "auto",
                 "train_on": "assistant", "max_length": 512, "packing": True},
        "train": {"epochs": 1.0, "micro_batch_size": 8, "grad_accum": 1, "lr": 0.002, "schedule": "cosine"}}))
    (run_dir / "eval-lora").mkdir()
    (run_dir / "eval-lora" / "eval.json").write_text(json.dumps({
        "splits": {"validation": {"n": 40, "accuracy": 0.625}, "heldout_family": {"n": 20, "accuracy": 0.15}},
        "corpus_nll": 4.5}))
    return final


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def exported(tiny_model_dir, adapter, tmp_path_factory):
    return export_model(tiny_model_dir, tmp_path_factory.mktemp("exp") / "merged", adapter=adapter, dtype="fp32")


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_merged_logits_match_base_plus_adapter(tiny_model_dir, adapter, exported):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    x = torch.randint(0, 1500, (3, 24), generator=torch.Generator().manual_seed(0)).tolist()
    base_logits = logits(base, x)
    ref = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(exported).eval()
    ref_logits, merged_logits = logits(ref, x), logits(merged, x)
    assert (merged_logits - base_logits).abs().max() > 0.1  # the adapter really changes the model
    torch.testing.assert_close(merged_logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())


def test_exported_folder_generates_like_training(tiny_model_dir, adapter, exported):
    ref_model, ref_tok = load_for_inference(tiny_model_dir, adapter)
    exp_model, exp_tok = load_for_inference(exported)
    assert exp_tok.chat_template == ref_tok.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    assert stop_token_ids(exp_tok, exp_model) == stop_token_ids(ref_tok, ref_model) == {exp_tok.eos_token_id}
    ids = [encode_prompt(exp_tok, c, template=exp_tok.chat_template) for c in CONVS]
    assert ids == [encode_prompt(ref_tok, c, template=ref_tok.chat_template) for c in CONVS]
    cfg = SamplingConfig(max_new_tokens=12)
    assert [g.token_ids for g in generate(exp_model, exp_tok, ids, cfg)] == \
        [g.token_ids for g in generate(ref_model, ref_tok, ids, cfg)]


def test_end_of_turn_differing_from_eos_lands_in_generation_config(tiny_model_dir, tmp_path):
    """Zephyr ends turns with </s>, a token the base lacked: the embeddings were resized in training."""
    final = make_adapter(tiny_model_dir, tmp_path / "run", template="zephyr")
    out = export_model(tiny_model_dir, tmp_path / "out", adapter=final, dtype="fp32")
    tok = AutoTokenizer.from_pretrained(out)
    eot = tok.convert_tokens_to_ids("</s>")
    assert eot != tok.eos_token_id and tok.chat_template == BUILTIN_TEMPLATES["zephyr"]
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert sorted(gen_cfg["eos_token_id"]) == sorted([eot, tok.eos_token_id])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    # Planted: make </s> the only likely token after the first one; transformers' generate must stop on it.
    calls = []

    def favour_eot_after_first_token(module, inputs, output):
        calls.append(1)
        return output.index_fill(-1, torch.tensor([eot]), 1e4) if len(calls) >= 2 else output

    merged.get_output_embeddings().register_forward_hook(favour_eot_after_first_token)
    ids = torch.tensor([encode_prompt(tok, CONVS[0], template=tok.chat_template)])
    new = merged.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert new[-1] == eot and len(new) == 2


def test_model_card_reports_the_run(exported, tiny_model_dir):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for expected in (f"| base model | `{tiny_model_dir}` |", "sft + LoRA merged into the base weights",
                     "r 4, alpha 8", "data/train.jsonl", "2000 training examples, 3 records skipped",
                     "lr 0.002", "66 steps", "loss 1.234", "| validation | 40 | 0.625 |", "corpus_nll: 4.5",
                     "`<|im_end|>`", "seed 7"):
        assert expected in card, expected
    info = json.loads((exported / "instructkit_export.json").read_text())
    assert info["dtype"] == "fp32" and info["stop_tokens"] == ["<|im_end|>"]


def test_clear_errors(tiny_model_dir, adapter, tmp_path):
    with pytest.raises(ExportError, match="not a LoRA adapter folder.*pass it as --model"):
        export_model(tiny_model_dir, tmp_path / "a", adapter=tiny_model_dir)
    not_lora = tmp_path / "ia3"
    shutil.copytree(adapter, not_lora)
    cfg = json.loads((not_lora / "adapter_config.json").read_text())
    (not_lora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ExportError, match="peft_type.*only LoRA"):
        export_model(tiny_model_dir, tmp_path / "a", adapter=not_lora)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(tiny_model_dir, busy, adapter=adapter)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    # A different base: another model whose weights differ, and one whose shapes differ.
    other = tmp_path / "other"
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=AutoTokenizer.from_pretrained(tiny_model_dir).__len__())
    LlamaForCausalLM(cfg).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    with pytest.raises(ExportError, match="base mismatch.*trained on"):
        export_model(other, tmp_path / "b", adapter=adapter)
    with pytest.raises(ExportError, match="does not fit"):
        export_model(other, tmp_path / "b", adapter=adapter, allow_base_mismatch=True)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("*.tmp-export"))


def test_cli_export_bf16_and_resave_without_adapter(tiny_model_dir, adapter, tmp_path, capsys):
    cwd = Path(__file__).parents[1]
    out = tmp_path / "bf16"
    r = subprocess.run([sys.executable, "-m", "instructkit", "export", "--model", str(tiny_model_dir),
                        "--adapter", str(adapter), "--out", str(out), "--dtype", "bf16"],
                       capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert f"(merged) as bf16 to {out}" in r.stdout
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16

    # User errors come out as one line and exit code 2 (in-process: the same main() as the command).
    from instructkit.cli import main

    capsys.readouterr()
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "not empty" in err
    plain = tmp_path / "fp16"
    r = subprocess.run([sys.executable, "-m", "instructkit", "export", "--model", str(tiny_model_dir),
                        "--out", str(plain), "--dtype", "fp16"], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 0, r.stderr
    m = AutoModelForCausalLM.from_pretrained(plain)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert m.dtype == torch.float16
    torch.testing.assert_close(m.model.embed_tokens.weight.float(), base.model.embed_tokens.weight.half().float())
