"""The generation engine against transformers' own generate and a full-forward recomputation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructkit.data.encode import encode_prompt
from instructkit.generate import SamplingConfig, _filter_logits, generate


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return m


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    convs = [[{"role": "user", "content": "Sort 3, 1, 2"}],
             [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is the largest of 4, 9 and 2? Please answer."}],
             [{"role": "user", "content": "hi"}]]
    return [encode_prompt(tiny_tokenizer, c, template=tiny_tokenizer.chat_template) for c in convs]


def test_greedy_matches_transformers_generate_per_prompt(model, tiny_tokenizer, prompts):
    ours = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=12), batch_size=3)
    for p, g in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                             eos_token_id=tiny_tokenizer.eos_token_id,
                             pad_token_id=tiny_tokenizer.pad_token_id)[0, len(p):].tolist()
        assert g.token_ids == ref[:len(g.token_ids)]
        assert len(g.token_ids) == len(ref) or g.finish_reason == "stop"


def test_logprobs_equal_full_forward(model, tiny_tokenizer, prompts):
    gens = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3))
    for p, g in zip(prompts, gens):
        ids = torch.tensor([p + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), -1)
        expect = logp.gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(expect, torch.tensor(g.logprobs), atol=1e-4)


def test_batched_equals_one_at_a_time(model, tiny_tokenizer, prompts):
    cfg = SamplingConfig(max_new_tokens=10)
    batched = generate(model, tiny_tokenizer, prompts, cfg, batch_size=8)
    single = [generate(model, tiny_tokenizer, [p], cfg)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(model, tiny_tokenizer, prompts):
    # Twelve rows, eight of them ended after 1-3 tokens by the callback: the batch is compacted
    # (finished rows dropped from the KV cache) while the four long rows must still decode exactly
    # as they would alone.
    many = [prompts[i % 3] for i in range(12)]
    cut = {i: 1 + i % 3 for i in range(12) if i % 3 != 0}
    seen = {i: 0 for i in range(12)}

    def on_token(i, tok):
        seen[i] += 1
        return i in cut and seen[i] >= cut[i]

    cfg = SamplingConfig(max_new_tokens=16)
    gens = generate(model, tiny_tokenizer, many, cfg, batch_size=12, on_token=on_token)
    alone = generate(model, tiny_tokenizer, [prompts[0]], cfg)[0]
    for i, g in enumerate(gens):
        if i in cut:
            assert len(g.token_ids) == cut[i]
        else:
            assert g.token_ids == alone.token_ids
            assert g.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_sampling_is_deterministic_for_a_seed(model, tiny_tokenizer, prompts):
    a = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=7))
    b = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=7))
    c = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=8))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_top_k_1_is_greedy(model, tiny_tokenizer, prompts):
    greedy = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=6))
    k1 = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=1))
    assert [g.token_ids for g in greedy] == [g.token_ids for g in k1]


def test_length_and_stop_reasons(model, tiny_tokenizer, prompts):
    g = generate(model, tiny_tokenizer, prompts[:1], SamplingConfig(max_new_tokens=5))[0]
    assert len(g.token_ids) <= 5 and g.finish_reason in ("length", "stop")
    if g.finish_reason == "length":
        assert len(g.token_ids) == 5
    # A stop string made of the first generated text cuts the text before it.
    full = generate(model, tiny_tokenizer, prompts[:1], SamplingConfig(max_new_tokens=12))[0]
    if len(full.text) >= 2:
        stop = full.text[1:3]
        cut = generate(model, tiny_tokenizer, prompts[:1], SamplingConfig(max_new_tokens=12, stop=[stop]))[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_eos_stops_generation(tiny_model_dir, tiny_tokenizer, prompts):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eos = tiny_tokenizer.eos_token_id
    calls = {"n": 0}

    def favour_eos_from_third_token(module, inputs, output):
        calls["n"] += 1
        if calls["n"] >= 3:  # prompt pass + 1 free token, then end-of-turn wins
            output = output.clone()
            output[..., eos] += 1e4
        return output

    m.get_output_embeddings().register_forward_hook(favour_eos_from_third_token)
    g = generate(m, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=10), batch_size=8)
    assert all(x.finish_reason == "stop" for x in g)
    assert all(len(x.token_ids) == 3 and x.token_ids[-1] == eos for x in g)
    assert all("<|im_end|>" not in x.text for x in g)


def test_filter_logits_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, 0, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(_filter_logits(logits, 2, 1.0)).sum() == 2


def test_bad_sampling_values():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_load_for_inference_in_bf16_generates_and_logprobs_track_fp32(tiny_model_dir, tiny_tokenizer, prompts):
    """``dtype="bfloat16"`` (eval/best-of-n/answer ``--dtype``) loads bf16 weights; generation runs and
    its log-probs are those of the fp32 model up to bf16 rounding, on the same tokens."""
    from instructkit.models import load_for_inference

    m16, _ = load_for_inference(tiny_model_dir, dtype="bfloat16")
    m32, _ = load_for_inference(tiny_model_dir)
    assert next(m16.parameters()).dtype == torch.bfloat16 and next(m32.parameters()).dtype == torch.float32
    g = generate(m16, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=8), batch_size=8)
    assert all(len(x.token_ids) >= 1 and x.finish_reason in ("stop", "length") for x in g)
    for p, x in zip(prompts, g):
        ids = torch.tensor([p + x.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(m32(ids).logits[0, len(p) - 1:-1].float(), -1)
        ref = logp.gather(-1, torch.tensor(x.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(x.logprobs), ref, atol=0.1), (x.logprobs, ref)
