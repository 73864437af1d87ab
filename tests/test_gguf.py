"""GGUF files as a starting model: a tiny Llama written as GGUF (the way llama.cpp lays it out) must
convert into a Hugging Face folder with the same logits, tokenizer and chat template, be cached by
content, train end to end from ``model.name_or_path: x.gguf``, and fail clearly on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

gguf = pytest.importorskip("gguf")

from instructkit import gguf as ikgguf  # noqa: E402
from instructkit.models import ModelError  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXTS = ["hello world, the cat and the dog", "Write a list: red green blue.\nthanks!", "sum of 12 and 345 is 357",
         "<|im_start|>user\nhi<|im_end|>\n"]


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py reorders q/k rows for its rope layout; transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, path: Path, arch: str = "llama") -> Path:
    """Write the HF model in ``model_dir`` as an F32 GGUF with llama.* metadata and a gpt2 tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    # tokenizer: byte-level BPE ("gpt2"); special tokens are CONTROL so they stay whole
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok.convert_ids_to_tokens(list(range(len(tok)))))
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tok))])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())  # no output.weight: tied embeddings
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads).numpy())
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads).numpy())
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def header_only_gguf(path: Path, arch: str) -> Path:
    """A valid GGUF with metadata only (enough for the checks that run before any weight is read)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("header only")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """INSTRUCTKIT_CACHE pointed at a fresh folder for this module, restored afterwards."""
    old = os.environ.get("INSTRUCTKIT_CACHE")
    path = tmp_path_factory.mktemp("ikcache")
    os.environ["INSTRUCTKIT_CACHE"] = str(path)
    ikgguf._RESOLVED.clear()
    yield path
    ikgguf._RESOLVED.clear()
    if old is None:
        os.environ.pop("INSTRUCTKIT_CACHE", None)
    else:
        os.environ["INSTRUCTKIT_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, cache_dir) -> Path:
    return Path(ikgguf.resolve_model_path(str(tiny_gguf)))


def test_convert_matches_original_logits_tokenizer_and_template(tiny_model_dir, tiny_gguf, converted, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert converted.parent == cache_dir / "gguf" and converted.name.startswith("tiny-")
    info = json.loads((converted / ikgguf.PROVENANCE_FILE).read_text())
    assert info["sha256"] == ikgguf.file_sha256(tiny_gguf) and info["architecture"] == "llama"
    assert info["size"] == tiny_gguf.stat().st_size and info["quant_types"] == {"F32": 2 + 9 * 4}
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    orig = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    conv = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert getattr(conv, "hf_quantizer", None) is None and all(p.dtype == torch.float32 for p in conv.parameters())
    ids = torch.randint(0, orig.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, orig(ids).logits, atol=1e-5, rtol=0)

    t_orig, t_conv = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert t_conv(text)["input_ids"] == t_orig(text)["input_ids"], text
    assert t_conv.chat_template == t_orig.chat_template and t_conv.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert (t_conv.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == t_orig.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_second_resolve_hits_cache_and_edit_reconverts(tiny_gguf, converted, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(ikgguf, "convert_gguf", lambda src, out, quiet=False: calls.append(out))
    ikgguf._RESOLVED.clear()  # a new process: the file is hashed again and found in the cache
    assert ikgguf.resolve_model_path(str(tiny_gguf)) == str(converted)
    assert ikgguf.resolve_model_path(tiny_gguf.parent) == str(converted)  # its folder names it too
    assert calls == []
    edited = tmp_path / "tiny.gguf"
    edited.write_bytes(tiny_gguf.read_bytes() + b"\0")
    ikgguf.resolve_model_path(str(edited))
    assert len(calls) == 1 and calls[0] != converted and calls[0].name.startswith("tiny-")


def test_other_values_are_returned_unchanged(tiny_model_dir):
    assert ikgguf.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ikgguf.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_train_from_gguf_writes_normal_hf_folder(tiny_gguf, converted, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.synth.toy import write_toy_dataset

    toy = write_toy_dataset(tmp_path / "toy", n_train=16, n_eval=4, seed=1)
    cfg = {"method": "sft", "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_gguf)},
           "data": {"train": str(toy / "train.jsonl"), "max_length": 512},
           "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3, "progress": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "instructkit", "train", str(tmp_path / "c.yaml")], capture_output=True,
                          text=True, env={**ENV, "INSTRUCTKIT_CACHE": str(cache_dir)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "converting" not in proc.stderr and "done: 2 steps" in proc.stderr  # the cached folder was reused
    final = tmp_path / "run" / "final"
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template and tok.eos_token == "<|im_end|>"
    base = AutoModelForCausalLM.from_pretrained(converted)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))


def test_convert_gguf_command(tiny_gguf, tmp_path):
    from instructkit.cli import main

    assert main(["convert-gguf", str(tiny_gguf), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "chat_template.jinja").exists()
    assert main(["convert-gguf", str(tiny_gguf), "--out", str(tmp_path / "hf")]) == 2  # never overwrites


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    path = header_only_gguf(tmp_path / "m.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ModelError, match=r"pip install 'instructkit\[gguf\]'"):
        ikgguf.resolve_model_path(str(path))


def test_unsupported_architecture_is_named_with_the_fix(tmp_path):
    path = header_only_gguf(tmp_path / "r.gguf", "rwkv6")
    with pytest.raises(ModelError) as e:
        ikgguf.resolve_model_path(str(path))
    msg = str(e.value)
    assert "'rwkv6'" in msg and "llama" in msg and "qwen2" in msg and "Hugging Face checkpoint" in msg


def test_folder_with_several_gguf_files_lists_them(tmp_path):
    for name in ("a.Q4_K_M.gguf", "a.Q8_0.gguf"):
        header_only_gguf(tmp_path / name, "llama")
    with pytest.raises(ModelError, match="holds 2 GGUF files") as e:
        ikgguf.resolve_model_path(str(tmp_path))
    assert "a.Q4_K_M.gguf" in str(e.value) and "a.Q8_0.gguf" in str(e.value) and "name one" in str(e.value)


def test_bad_magic_and_missing_file(tmp_path):
    bad = tmp_path / "page.gguf"
    bad.write_text("<html>404</html>")
    with pytest.raises(ModelError, match="not a GGUF file"):
        ikgguf.resolve_model_path(str(bad))
    with pytest.raises(ModelError, match="GGUF file not found"):
        ikgguf.resolve_model_path(str(tmp_path / "nope.gguf"))


@pytest.mark.slow
def test_real_model_smollm2(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (Q4_1) from `make real-model` or $INSTRUCTKIT_REAL_MODEL; skipped if absent."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.real_model import find_real_model

    path = find_real_model(Path(__file__).resolve().parents[1])
    if path is None:
        pytest.skip("real model not present: run `make real-model` or set INSTRUCTKIT_REAL_MODEL")
    from instructkit.models import count_trainable, load_for_inference

    model, tok = load_for_inference(str(path))
    folder = Path(ikgguf.resolve_model_path(str(path)))
    assert json.loads((folder / ikgguf.PROVENANCE_FILE).read_text())["file_type"] == "Q4_1"
    assert count_trainable(model)[1] == 134_515_008 and type(model).__name__ == "LlamaForCausalLM"
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
