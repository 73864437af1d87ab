"""Chat templates and loss masks: the trained tokens must be exactly the assistant replies."""

import copy
import re

import pytest

from instructkit.data.encode import (IGNORE_INDEX, EncodedExample, encode_messages, encode_preference,
                                     encode_prompt, render_spans)
from instructkit.data.errors import DataError
from instructkit.data.packing import collate_packed, collate_padded
from instructkit.data.templates import (BUILTIN_TEMPLATES, TEMPLATE_EOT, TemplateError, end_of_turn_token,
                                        ensure_template_tokens, has_generation_tags, required_special_tokens,
                                        resolve_template)

CONVERSATION = [
    {"role": "system", "content": "You are terse.\nAnswer in one line."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "  42, café ✓  "},
    {"role": "user", "content": " list two colours "},
    {"role": "assistant", "content": "red\nblue\n"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "You're welcome 123 — ok."},
]
REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizer):
    """One tokenizer per built-in template, with that template's tokens added to a copy."""
    out = {}
    for name in BUILTIN_TEMPLATES:
        tok = copy.deepcopy(tiny_tokenizer)
        ensure_template_tokens(tok, name)
        out[name] = tok
    return out


def trained_segments(tok, ex: EncodedExample) -> list[str]:
    return [text for text, trained in render_spans(tok, ex) if trained]


def trained_text(tok, ex: EncodedExample) -> str:
    ids = [t for t in ex.labels if t != IGNORE_INDEX]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def strip_generation_tags(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


# --- templates -------------------------------------------------------------------------------------

def test_builtin_tables_are_complete():
    assert set(TEMPLATE_EOT) == set(BUILTIN_TEMPLATES)
    for name, src in BUILTIN_TEMPLATES.items():
        assert has_generation_tags(src), name
        assert isinstance(required_special_tokens(name), list)
    assert "<|eot_id|>" in required_special_tokens("llama3")


def test_resolve_auto_uses_tokenizer_template(tiny_tokenizer):
    assert resolve_template(tiny_tokenizer, "auto") == tiny_tokenizer.chat_template


def test_resolve_auto_without_template_names_the_builtins(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(TemplateError) as e:
        resolve_template(tok, "auto")
    msg = str(e.value)
    assert "data.template" in msg and "no chat template" in msg
    for name in BUILTIN_TEMPLATES:
        assert name in msg


def test_resolve_unknown_name(tiny_tokenizer):
    with pytest.raises(TemplateError, match="chatml"):
        resolve_template(tiny_tokenizer, "vicuna")


def test_missing_special_tokens_then_ensure(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    with pytest.raises(TemplateError, match="data.add_special_tokens: true") as e:
        resolve_template(tok, "llama3")
    assert "<|start_header_id|>" in str(e.value)
    before = len(tok)
    assert ensure_template_tokens(tok, "llama3") == 3
    assert len(tok) == before + 3
    assert ensure_template_tokens(tok, "llama3") == 0
    assert resolve_template(tok, "llama3") == BUILTIN_TEMPLATES["llama3"]
    assert len(tok.encode("<|eot_id|>", add_special_tokens=False)) == 1
    assert end_of_turn_token(tok, "llama3") == "<|eot_id|>"
    assert end_of_turn_token(tok, "alpaca") == tok.eos_token


def test_builtins_match_apply_chat_template(tokenizers):
    """Our renderer + offsets agree with transformers' own assistant mask on the built-ins."""
    for name, tok in tokenizers.items():
        ex = encode_messages(tok, CONVERSATION, template=name)
        hf = tok.apply_chat_template(CONVERSATION, chat_template=BUILTIN_TEMPLATES[name], tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
        assert ex.input_ids == list(hf["input_ids"]), name
        assert [int(lab != IGNORE_INDEX) for lab in ex.labels] == list(hf["assistant_masks"]), name


# --- masks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_assistant_mask_is_exactly_the_replies(tokenizers, name):
    tok = tokenizers[name]
    eot = end_of_turn_token(tok, name)
    ex = encode_messages(tok, CONVERSATION, template=name, train_on="assistant")
    assert ex.labels[0] == IGNORE_INDEX
    assert trained_segments(tok, ex) == [r + eot for r in REPLIES]
    assert trained_text(tok, ex) == "".join(r + eot for r in REPLIES)
    # Every target is the token at its own position (HF convention: the model shifts).
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(ex.labels, ex.input_ids))
    # The preview pieces put together give back the whole rendered conversation.
    assert "".join(t for t, _ in render_spans(tok, ex)) == tok.decode(ex.input_ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_last_assistant_and_all(tokenizers, name):
    tok = tokenizers[name]
    eot = end_of_turn_token(tok, name)
    last = encode_messages(tok, CONVERSATION, template=name, train_on="last_assistant")
    assert trained_segments(tok, last) == [REPLIES[-1] + eot]
    everything = encode_messages(tok, CONVERSATION, template=name, train_on="all")
    assert everything.labels[0] == IGNORE_INDEX
    assert everything.labels[1:] == everything.input_ids[1:]
    assert everything.n_targets == len(everything.input_ids) - 1


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_fallback_without_generation_tags_gives_same_mask(tokenizers, name):
    tok = tokenizers[name]
    untagged = strip_generation_tags(BUILTIN_TEMPLATES[name])
    assert not has_generation_tags(untagged)
    for train_on in ("assistant", "last_assistant"):
        tagged = encode_messages(tok, CONVERSATION, template=name, train_on=train_on)
        fallback = encode_messages(tok, CONVERSATION, template=untagged, train_on=train_on)
        assert fallback.input_ids == tagged.input_ids
        assert fallback.labels == tagged.labels


def test_tokenizer_own_template_without_tags(tiny_tokenizer):
    """train_on=assistant through 'auto' with a model's own (untagged) ChatML template."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = strip_generation_tags(tok.chat_template)
    ex = encode_messages(tok, CONVERSATION, template=resolve_template(tok, "auto"))
    assert trained_segments(tok, ex) == [r + "<|im_end|>" for r in REPLIES]


def test_prefix_inconsistent_template_is_an_error(tiny_tokenizer):
    # The generation prompt opens a <think> block that rendered replies do not have.
    bad = strip_generation_tags(BUILTIN_TEMPLATES["chatml"]).replace(
        "{{ '<|im_start|>assistant\\n' }}{% endif %}", "{{ '<|im_start|>assistant\\n<think>' }}{% endif %}")
    assert bad != strip_generation_tags(BUILTIN_TEMPLATES["chatml"])
    with pytest.raises(DataError) as e:
        encode_messages(tiny_tokenizer, CONVERSATION, template=bad, file="d.jsonl", line=3)
    assert e.value.reason == "template_not_prefix_consistent"
    assert e.value.line == 3 and "generation" in e.value.fix


def test_earlier_turns_do_not_leak_and_first_message_can_be_assistant(tokenizers):
    tok = tokenizers["chatml"]
    msgs = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yes"}]
    ex = encode_messages(tok, msgs, template=strip_generation_tags(BUILTIN_TEMPLATES["chatml"]))
    assert trained_segments(tok, ex) == ["Hello!<|im_end|>", "yes<|im_end|>"]


def test_bos_is_not_doubled(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    ensure_template_tokens(tok, "llama3")
    tok.bos_token = "<|endoftext|>"
    ex = encode_messages(tok, CONVERSATION, template="llama3")
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.input_ids.count(tok.bos_token_id) == 1
    # chatml renders no BOS, and this tokenizer does not add one to plain text: none appears.
    ex = encode_messages(tok, CONVERSATION, template="chatml")
    assert tok.bos_token_id not in ex.input_ids


def test_bos_added_when_tokenizer_adds_one_and_template_does_not(tiny_tokenizer):
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    # Make the tokenizer add BOS to plain text, like Llama/Mistral tokenizers do.
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", bos)])
    assert tok("x").input_ids[0] == bos
    ex = encode_messages(tok, CONVERSATION, template="chatml")
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1 and ex.labels[0] == IGNORE_INDEX
    assert trained_segments(tok, ex) == [r + "<|im_end|>" for r in REPLIES]
    ensure_template_tokens(tok, "llama3")
    ex = encode_messages(tok, CONVERSATION, template="llama3")  # renders BOS itself
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1


def test_encode_prompt_is_a_prefix_of_training_ids(tokenizers):
    for name, tok in tokenizers.items():
        ex = encode_messages(tok, CONVERSATION, template=name, train_on="last_assistant")
        prompt = encode_prompt(tok, CONVERSATION[:-1], template=name)
        assert ex.input_ids[:len(prompt)] == prompt
        first_target = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
        assert first_target == len(prompt), name


# --- pad == eos --------------------------------------------------------------------------------------

def test_pad_equal_to_eos_keeps_eos_targets(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    short = encode_messages(tok, CONVERSATION[:3], template="chatml")
    long = encode_messages(tok, CONVERSATION, template="chatml")
    eos = tok.eos_token_id
    # Every assistant turn's closing eos is a target (1 reply in `short`, 3 in `long`).
    assert sum(1 for lab in long.labels if lab == eos) == 3
    assert sum(1 for lab in short.labels if lab == eos) == 1

    batch = collate_padded([short, long], pad_id=tok.pad_token_id)
    n = len(short.input_ids)
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == eos).all()  # padding written with the (eos) pad id ...
    assert int((batch["labels"][0] == eos).sum()) == 1  # ... but only the real eos is a target
    assert (batch["labels"][1] == eos).sum() == 3

    packed = collate_packed([short, long], [[0], [1]], pad_id=tok.pad_token_id)
    assert (packed["labels"][0] == eos).sum() == 1
    assert (packed["example_index"][0, n:] == -1).all()
    assert (packed["labels"][0, n:] == IGNORE_INDEX).all()


# --- errors and truncation -------------------------------------------------------------------------

def test_too_long_is_an_error_naming_the_record(tiny_tokenizer):
    full = encode_messages(tiny_tokenizer, CONVERSATION, template="chatml")
    with pytest.raises(DataError) as e:
        encode_messages(tiny_tokenizer, CONVERSATION, template="chatml", max_length=20,
                        file="train.jsonl", line=7)
    err = e.value
    assert err.reason == "too_long" and err.file == "train.jsonl" and err.line == 7
    assert err.field == "messages"
    assert f"example is {len(full.input_ids)} tokens, longer than max_length 20" in str(err)
    assert "data.truncation: right" in err.fix


def test_right_truncation(tiny_tokenizer):
    full = encode_messages(tiny_tokenizer, CONVERSATION, template="chatml")
    m = len(full.input_ids) - 5
    cut = encode_messages(tiny_tokenizer, CONVERSATION, template="chatml", max_length=m, truncation="right")
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:m] and cut.labels == full.labels[:m]
    same = encode_messages(tiny_tokenizer, CONVERSATION, template="chatml", max_length=len(full.input_ids))
    assert not same.truncated and same.input_ids == full.input_ids


def test_no_targets_after_truncation(tiny_tokenizer):
    with pytest.raises(DataError) as e:
        encode_messages(tiny_tokenizer, CONVERSATION, template="chatml", max_length=10, truncation="right")
    assert e.value.reason == "no_targets_after_truncation"


def test_no_targets(tiny_tokenizer):
    with pytest.raises(DataError) as e:
        encode_messages(tiny_tokenizer, [{"role": "user", "content": "hi"}], template="chatml",
                        file="f.jsonl", line=2)
    assert e.value.reason == "no_targets" and e.value.line == 2


def test_invalid_messages(tiny_tokenizer):
    with pytest.raises(DataError) as e:
        encode_messages(tiny_tokenizer, [{"role": "user", "content": 3}], template="chatml")
    assert e.value.field == "messages[0].content"
    with pytest.raises(ValueError):
        encode_messages(tiny_tokenizer, CONVERSATION, template="chatml", train_on="everything")


# --- preference pairs --------------------------------------------------------------------------------

PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "name a colour " + "please " * 10},
]


def test_preference_targets_only_the_responses(tokenizers):
    for name, tok in tokenizers.items():
        eot = end_of_turn_token(tok, name)
        chosen, rejected = encode_preference(tok, PROMPT, "blue ✓", {"role": "assistant", "content": "no."},
                                             template=name)
        assert trained_segments(tok, chosen) == ["blue ✓" + eot]
        assert trained_segments(tok, rejected) == ["no." + eot]
        pc = next(i for i, lab in enumerate(chosen.labels) if lab != IGNORE_INDEX)
        pr = next(i for i, lab in enumerate(rejected.labels) if lab != IGNORE_INDEX)
        assert pc == pr and chosen.input_ids[:pc] == rejected.input_ids[:pr]
        assert chosen.input_ids[:pc] == encode_prompt(tok, PROMPT, template=name)
        assert not chosen.truncated and not rejected.truncated


def test_preference_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer):
    tok = tiny_tokenizer
    long_reply = "red green blue " * 20
    full_c, full_r = encode_preference(tok, PROMPT, long_reply, "no.", template="chatml")
    prompt_ids = encode_prompt(tok, PROMPT, template="chatml")
    max_length = 40
    with pytest.raises(DataError) as e:
        encode_preference(tok, PROMPT, long_reply, "no.", template="chatml", max_length=max_length,
                          truncation="error")
    assert e.value.reason == "too_long"
    c, r = encode_preference(tok, PROMPT, long_reply, "no.", template="chatml", max_length=max_length)
    assert len(c.input_ids) == max_length and c.truncated
    assert len(r.input_ids) <= max_length and r.truncated  # its prompt was shortened too
    keep = max_length // 2
    # prompt: its last `keep` tokens; chosen response: its first tokens
    assert c.input_ids[:keep] == prompt_ids[-keep:]
    assert r.input_ids[:keep] == prompt_ids[-keep:]
    assert c.input_ids[keep:] == full_c.input_ids[len(prompt_ids):len(prompt_ids) + max_length - keep]
    assert r.input_ids[keep:] == full_r.input_ids[len(prompt_ids):]
    assert c.labels[0] == IGNORE_INDEX and c.n_targets == max_length - keep
