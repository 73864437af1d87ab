"""Tiny models: presets span ~1M to ~30M parameters, load offline, render ChatML."""

import pytest
from transformers import AutoConfig

from instructkit.tiny_model import PRESETS, build_tiny_model


def _params(cfg) -> int:
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    return v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_span_1m_to_30m(tmp_path, preset):
    d = build_tiny_model(tmp_path / preset, preset=preset)
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "llama"
    n = _params(cfg)
    assert 0.8e6 <= n <= 32e6, n


def test_tokenizer_roundtrip_and_template(tiny_tokenizer):
    text = "Sort 10, 2 and 33 -> café ✓ {\"k\": 1}"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    out = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Digits are split one by one, so arithmetic sees one token per digit.
    assert len(tiny_tokenizer("12345", add_special_tokens=False)["input_ids"]) == 5


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        build_tiny_model(tmp_path, preset="huge")


def test_isolate_spaces_makes_words_context_free():
    """With isolate_spaces, 'lantern' is one id after a space, after a newline and at a reply start,
    so copying a word from a prompt into an answer is an identity map (the demo relies on it)."""
    from instructkit.tiny_model import default_corpus, train_tokenizer

    corpus = default_corpus(0) + ["the first item of lantern, ocean is lantern."] * 50
    tok = train_tokenizer(corpus, 2048, isolate_spaces=True)
    word = tok("lantern", add_special_tokens=False)["input_ids"]
    for text in ("list: lantern, ocean", "assistant\nlantern", "x lantern"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert any(ids[i:i + len(word)] == word for i in range(len(ids))), text
        assert tok.decode(ids) == text
    plain = train_tokenizer(corpus, 2048, isolate_spaces=False)
    a = plain(" lantern", add_special_tokens=False)["input_ids"]
    b = plain("lantern", add_special_tokens=False)["input_ids"]
    assert a != b  # the GPT-style default differs, which is why the option exists


def test_reply_space_template_gives_the_reply_the_prompt_words_tokens():
    """With GPT-style tokens and ChatML with a space before the reply, a word copied from the prompt
    starts the reply as the same id; the masked targets begin with that word, and reply_text drops
    the template's space again."""
    from instructkit.data.encode import encode_messages
    from instructkit.generate import reply_text, template_adds_reply_space
    from instructkit.tiny_model import default_corpus, train_tokenizer

    corpus = default_corpus(0) + ["the first item of lantern, ocean is lantern."] * 50
    tok = train_tokenizer(corpus, 2048, reply_space=True)
    word = tok(" lantern", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    messages = [{"role": "user", "content": "First item of: lantern, ocean"},
                {"role": "assistant", "content": "lantern"}]
    ex = encode_messages(tok, messages, template=tok.chat_template)
    targets = [t for t in ex.labels if t != -100]
    assert targets[0] == word[0]                       # the reply's first token is " lantern"
    assert word[0] in ex.input_ids[:ex.labels.index(word[0])]  # ... the same id as in the prompt
    assert template_adds_reply_space(tok)
    assert reply_text(tok, targets) == "lantern"       # without the template's space, special tokens dropped
    assert reply_text(tok, tok("  two spaces", add_special_tokens=False)["input_ids"]) == " two spaces"
    # Without the option the tokenizer keeps plain ChatML, whose reply starts "lantern" (another id),
    # and a reply that starts with a space keeps it.
    plain = train_tokenizer(corpus, 2048)
    ex2 = encode_messages(plain, messages, template=plain.chat_template)
    assert [t for t in ex2.labels if t != -100][0] != plain(" lantern", add_special_tokens=False)["input_ids"][0]
    assert not template_adds_reply_space(plain)
    assert reply_text(plain, plain(" lantern", add_special_tokens=False)["input_ids"]) == " lantern"
