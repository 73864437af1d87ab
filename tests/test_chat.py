"""Streaming generation (on_token, StreamDecoder), end-of-turn detection and the terminal chat."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from instructkit.chat import ChatSession, chat_loop
from instructkit.data.encode import encode_prompt
from instructkit.data.templates import BUILTIN_TEMPLATES, ensure_template_tokens
from instructkit.generate import SamplingConfig, StreamDecoder, end_of_turn_ids, generate


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    convs = [[{"role": "user", "content": "Sort 3, 1, 2"}], [{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]]
    return [encode_prompt(tiny_tokenizer, c, template=tiny_tokenizer.chat_template) for c in convs]


def test_on_token_sees_every_token_and_changes_nothing(model, tiny_tokenizer, prompts):
    cfg = SamplingConfig(max_new_tokens=9, temperature=1.0, seed=4)
    seen = {i: [] for i in range(len(prompts))}
    with_cb = generate(model, tiny_tokenizer, prompts, cfg, batch_size=2,
                       on_token=lambda i, t: seen[i].append(t))
    without = generate(model, tiny_tokenizer, prompts, cfg, batch_size=2)
    assert [g.token_ids for g in with_cb] == [g.token_ids for g in without]
    assert [seen[i] for i in range(len(prompts))] == [g.token_ids for g in with_cb]


def test_on_token_returning_true_ends_only_that_sequence(model, tiny_tokenizer, prompts):
    cfg = SamplingConfig(max_new_tokens=10)
    full = generate(model, tiny_tokenizer, prompts, cfg)
    counts = [0] * len(prompts)

    def limit_second(i, tok):
        counts[i] += 1
        return i == 1 and counts[i] >= 3

    cut = generate(model, tiny_tokenizer, prompts, cfg, on_token=limit_second)
    assert cut[1].token_ids == full[1].token_ids[:3] and cut[1].finish_reason == "length"
    assert cut[1].text == tiny_tokenizer.decode(full[1].token_ids[:3], skip_special_tokens=True)
    assert [cut[i].token_ids for i in (0, 2)] == [full[i].token_ids for i in (0, 2)]


def _stream(tok, ids, stop):
    dec = StreamDecoder(tok, stop)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.finish()


def test_stream_decoder_deltas_add_up_to_the_final_text(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "Hello world, the answer is 42. END and more text"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    deltas, rest = _stream(tok, ids, ["END"])
    assert "".join(deltas) + rest == "Hello world, the answer is 42. "
    assert not any(d.endswith(("E", "EN", "END")) for d in deltas)  # a possible stop is held back
    # Text that could still be the start of a stop string is held back until it is settled.
    stop = "is 42. X"  # never completed: everything comes out in the end
    deltas, rest = _stream(tok, ids, [stop])
    shown = ""
    for d in deltas:
        shown += d
        assert not any(shown.endswith(stop[:k]) for k in range(1, len(stop)))
    assert shown + rest == text


def test_stream_decoder_never_splits_a_character(tiny_tokenizer):
    text = "café ☕ naïve 日本"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte-level pieces: some tokens are half a character
    deltas, rest = _stream(tiny_tokenizer, ids, [])
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) + rest == text


def test_stream_decoder_matches_generate_with_stop_strings(model, tiny_tokenizer, prompts):
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=9)
    g = generate(model, tiny_tokenizer, prompts[:1], cfg)[0]
    stop = g.text[4:6]
    cfg.stop = [stop]
    dec = StreamDecoder(tiny_tokenizer, cfg.stop)
    out = []
    [h] = generate(model, tiny_tokenizer, prompts[:1], cfg, on_token=lambda i, t: out.append(dec.push(t)))
    assert "".join(out) + dec.finish() == h.text == g.text[:g.text.find(stop)]


@pytest.mark.parametrize("name,eot", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("zephyr", "</s>")])
def test_end_of_turn_ids_read_from_the_template(tiny_tokenizer, name, eot):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    ensure_template_tokens(tok, name)
    tok.chat_template = BUILTIN_TEMPLATES[name]
    ids = end_of_turn_ids(tok)
    assert tok.convert_tokens_to_ids(eot) in ids and tok.eos_token_id in ids


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


def test_chat_keeps_history_and_obeys_commands(model, tiny_tokenizer):
    sampling = SamplingConfig(max_new_tokens=8)
    session = ChatSession(model, tiny_tokenizer, system=None, sampling=sampling)
    out = Recorder()
    lines = ["hello there", "/system Be brief.", "/system", "and now?", "/reset", "fresh start", "/bogus",
             "/exit", "never sent"]
    assert chat_loop(session, iter(lines), out) == 3

    def expect(messages):
        ids = encode_prompt(tiny_tokenizer, messages, template=tiny_tokenizer.chat_template)
        return generate(model, tiny_tokenizer, [ids], sampling)[0].text

    r1 = expect([{"role": "user", "content": "hello there"}])
    r2 = expect([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
                 {"role": "assistant", "content": r1}, {"role": "user", "content": "and now?"}])
    r3 = expect([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fresh start"}])
    text = out.getvalue()
    assert f"assistant> {r1}" in text and f"assistant> {r2}" in text and f"assistant> {r3}" in text
    assert "(system message set)" in text and "(system: 'Be brief.')" in text
    assert "(conversation cleared)" in text and "unknown command /bogus" in text
    assert "never sent" not in text and session.history[-2]["content"] == "fresh start"
    assert out.writes > 20  # streamed piece by piece, not one write per reply


def test_chat_drops_oldest_turns_to_fit_the_context(model, tiny_tokenizer):
    session = ChatSession(model, tiny_tokenizer, system="S", sampling=SamplingConfig(max_new_tokens=8))
    session.context = 60
    out = io.StringIO()
    chat_loop(session, iter([f"message number {i} with a few words" for i in range(4)]), out)
    assert "oldest exchange(s) to fit the 60-token context" in out.getvalue()
    ids = encode_prompt(tiny_tokenizer, session.messages(), template=tiny_tokenizer.chat_template)
    assert len(ids) <= 60 and session.messages()[0] == {"role": "system", "content": "S"}


def test_cli_chat_from_piped_stdin(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "instructkit", "chat", "--model", str(tiny_model_dir),
                        "--max-new-tokens", "6", "--temperature", "0", "--system", "Be brief."],
                       input="hi\n/system\n/exit\n", capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("assistant> ") and lines[-1] == "(system: 'Be brief.')"


def test_chat_without_template_is_a_clear_error(model, tiny_tokenizer):
    import copy

    from instructkit.models import ModelError

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(ModelError, match="no chat template.*--template"):
        ChatSession(model, bare)
