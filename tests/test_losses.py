"""Losses against closed-form values."""

import math

import pytest
import torch

from instructkit.losses import token_logprobs, token_nll_sum


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(5, 7)
    targets = torch.tensor([0, 1, 2, 3, 6])
    assert float(token_nll_sum(logits, targets)) == pytest.approx(5 * math.log(7), rel=1e-6)


def test_two_class_closed_form():
    # p(target) = e^2 / (e^2 + e^0) -> nll = log(1 + e^-2) = 0.126928
    logits = torch.tensor([[2.0, 0.0]])
    assert float(token_nll_sum(logits, torch.tensor([0]))) == pytest.approx(0.126928, abs=1e-6)
    assert float(token_logprobs(logits, torch.tensor([0]))[0]) == pytest.approx(-0.126928, abs=1e-6)


def test_chunking_does_not_change_the_sum():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(37, 11, generator=g), torch.randint(0, 11, (37,), generator=g)
    a = token_nll_sum(logits, targets, chunk_size=4096)
    b = token_nll_sum(logits, targets, chunk_size=5)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert float(a) == pytest.approx(float(-token_logprobs(logits, targets).sum()), rel=1e-5)


def test_empty_targets_give_differentiable_zero():
    logits = torch.randn(0, 4, requires_grad=True)
    out = token_nll_sum(logits, torch.zeros(0, dtype=torch.long))
    assert float(out) == 0.0
    out.backward()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        token_nll_sum(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
