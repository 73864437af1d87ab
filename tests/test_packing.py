"""Packing: best-fit-decreasing rows, and packed batches computing exactly what unpacked ones do."""

import random

import pytest
import torch

from instructkit.data.encode import IGNORE_INDEX, EncodedExample, encode_messages
from instructkit.data.packing import (block_causal_mask, collate_packed, collate_padded,
                                      pack_best_fit_decreasing, packing_efficiency)


def reference_bfd(lengths, max_length):
    """Quadratic textbook best-fit decreasing, to check the fast one against."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
        else:
            r = len(rows)
            rows.append([])
            room.append(max_length)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def check_rows(rows, lengths, max_length):
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
    assert all(row for row in rows)


# --- best fit decreasing ---------------------------------------------------------------------------

def test_bfd_known_case():
    lengths = [6, 5, 4, 3, 2, 1]
    rows = pack_best_fit_decreasing(lengths, 7)
    assert rows == [[0, 5], [1, 4], [2, 3]]
    assert packing_efficiency(rows, lengths, 7) == 1.0


def test_bfd_prefers_tightest_row():
    # 8 -> row0 (2 left), 7 -> row1 (3 left), 3 goes to row1 (tight fit), 2 fills row0.
    lengths = [8, 7, 3, 2]
    rows = pack_best_fit_decreasing(lengths, 10)
    assert rows == [[0, 3], [1, 2]]
    assert packing_efficiency(rows, lengths, 10) == 1.0
    assert packing_efficiency([[0], [1], [2], [3]], lengths, 10) == pytest.approx(20 / 40)


@pytest.mark.parametrize("seed", range(5))
def test_bfd_matches_reference_and_is_deterministic(seed):
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 100])
    lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 300))]
    rows = pack_best_fit_decreasing(lengths, max_length)
    check_rows(rows, lengths, max_length)
    assert rows == reference_bfd(lengths, max_length)
    assert rows == pack_best_fit_decreasing(list(lengths), max_length)


def test_bfd_many_examples():
    rng = random.Random(0)
    lengths = [rng.randint(8, 2048) for _ in range(100_000)]
    rows = pack_best_fit_decreasing(lengths, 2048)
    check_rows(rows, lengths, 2048)
    assert packing_efficiency(rows, lengths, 2048) > 0.95


def test_bfd_rejects_too_long_and_handles_empty():
    with pytest.raises(ValueError, match="example 1 has length 9"):
        pack_best_fit_decreasing([3, 9], 8)
    assert pack_best_fit_decreasing([], 8) == []
    assert packing_efficiency([], [], 8) == 0.0


# --- collation -------------------------------------------------------------------------------------

def toy(n, first_target=1, start=10):
    ids = list(range(start, start + n))
    return EncodedExample(ids, [IGNORE_INDEX] * first_target + ids[first_target:])


def test_collate_packed_layout():
    examples = [toy(5), toy(3, start=50), toy(4, start=80), toy(2, start=90)]
    rows = [[0, 1], [2, 3]]
    b = collate_packed(examples, rows, max_length=16, pad_id=0)
    assert b["input_ids"].shape == (2, 8)  # longest row 8 tokens, already a multiple of 8
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    assert b["example_index"][1].tolist() == [2, 2, 2, 2, 3, 3, -1, -1]
    assert b["seq_lens"].tolist() == [[5, 3], [4, 2]]
    assert b["labels"][0, 5].item() == IGNORE_INDEX  # first token of a packed example
    assert (b["labels"][1, 6:] == IGNORE_INDEX).all()
    m = b["attention_mask"]
    assert m.dtype == torch.bool and m.shape == (2, 1, 8, 8)
    assert m[0, 0, 6].tolist() == [False] * 5 + [True, True, False]  # only its own example, causal
    assert m[1, 0, 7].tolist() == [False] * 7 + [True]  # padding sees only itself
    assert m.any(dim=-1).all()  # no empty softmax rows

    b = collate_packed(examples, [[1], [3]], pad_id=0)
    assert b["input_ids"].shape == (2, 8)  # rounded up to a multiple of 8
    b = collate_packed(examples, [[1], [3]], pad_id=0, pad_to_multiple_of=None)
    assert b["input_ids"].shape == (2, 3)
    b = collate_packed(examples, [[0]], max_length=6, pad_id=0)
    assert b["input_ids"].shape == (1, 6)  # rounding never exceeds max_length
    with pytest.raises(ValueError):
        collate_packed(examples, [[0, 1]], max_length=6, pad_id=0)


def test_block_causal_mask_equals_causal_for_one_example():
    idx = torch.zeros(1, 5, dtype=torch.long)
    assert torch.equal(block_causal_mask(idx)[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_collate_padded_layout():
    b = collate_padded([toy(3), toy(5)], pad_id=7)
    assert b["input_ids"].shape == (2, 5)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert b["input_ids"][0, 3:].tolist() == [7, 7]
    assert (b["labels"][0, 3:] == IGNORE_INDEX).all()
    assert b["example_index"][0].tolist() == [0, 0, 0, -1, -1]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 4]


# --- packed == unpacked on a real model ------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return m.eval()


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    rng = random.Random(0)
    words = "the red cat sat on a mat and then 12 dogs ran over 3 green hills café ✓".split()
    out = []
    for k in range(9):
        msgs = [{"role": "system", "content": "Be brief."}] if k % 3 == 0 else []
        for _ in range(1 + k % 3):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))})
        out.append(encode_messages(tiny_tokenizer, msgs, template="chatml"))
    return out


def per_example_losses(logits, labels, example_index, n):
    """Summed next-token cross-entropy per example, grouped by the example owning each label."""
    logits, labels, owner = logits[:, :-1], labels[:, 1:], example_index[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="none")
    keep = labels.reshape(-1) != IGNORE_INDEX
    return torch.zeros(n, dtype=ce.dtype).index_add_(0, owner.reshape(-1)[keep], ce[keep])


@torch.no_grad()
def test_packed_equals_unpacked(model, examples, tiny_tokenizer):
    lengths = [len(e.input_ids) for e in examples]
    max_length = 128
    assert max(lengths) <= max_length
    rows = pack_best_fit_decreasing(lengths, max_length)
    assert any(len(r) > 1 for r in rows), "the test needs rows holding several examples"

    alone_logits = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
    alone = torch.stack([
        per_example_losses(lg[None], torch.tensor([e.labels]), torch.zeros(1, len(e.labels), dtype=torch.long), 1)[0]
        for lg, e in zip(alone_logits, examples)])
    assert (alone > 0).all()

    batch = collate_packed(examples, rows, max_length=max_length, pad_id=tiny_tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    packed = per_example_losses(logits, batch["labels"], batch["example_index"], len(examples))
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=0)
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            n = lengths[i]
            torch.testing.assert_close(logits[r, pos:pos + n], alone_logits[i], atol=1e-4, rtol=0)
            pos += n
    assert torch.isfinite(logits).all()  # padding rows attend to themselves: no NaN

    padded = collate_padded(examples, pad_id=tiny_tokenizer.pad_token_id)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                   position_ids=padded["position_ids"]).logits
    torch.testing.assert_close(per_example_losses(logits, padded["labels"], padded["example_index"],
                                                  len(examples)), alone, atol=1e-4, rtol=0)


@torch.no_grad()
def test_packing_without_block_mask_would_differ(model, examples, tiny_tokenizer):
    """Guard for the test above: a plain causal mask over the packed row changes the losses."""
    rows = [[0, 1, 2]]
    batch = collate_packed(examples, rows, pad_id=tiny_tokenizer.pad_token_id, pad_to_multiple_of=None)
    good = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits
    leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    second = batch["example_index"][0] == 1
    assert (good[0, second] - leaky[0, second]).abs().max() > 1e-3
