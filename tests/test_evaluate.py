"""Perplexity against a plain reference: exp of the mean cross-entropy of next-token logits."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB_SIZE, tiny_causal_lm

from slimc.commands.evaluate import perplexity
from slimc.errors import DataError


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB_SIZE, (5, 24), generator=torch.Generator().manual_seed(0))


def reference_perplexity(model, input_ids):
    with torch.no_grad():
        logits = model(input_ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB_SIZE), input_ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_perplexity_is_exp_of_the_mean_next_token_cross_entropy(model, input_ids):
    assert perplexity(model, input_ids) == pytest.approx(reference_perplexity(model, input_ids), rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size(model, input_ids):
    # 5 windows: batches of 1, 2 (with a ragged last batch) and all at once weigh every token equally.
    results = [perplexity(model, input_ids, batch_size=b) for b in (1, 2, 5)]
    assert results == pytest.approx([results[0]] * 3, rel=1e-6)


def test_a_random_model_is_near_uniform_over_the_vocabulary(model, input_ids):
    assert perplexity(model, input_ids) == pytest.approx(VOCAB_SIZE, rel=0.1)


def test_perplexity_with_progress_gives_the_same_value(model, input_ids, caplog):
    with caplog.at_level(logging.INFO, logger="slimc.progress"):
        assert perplexity(model, input_ids, progress=True) == pytest.approx(perplexity(model, input_ids), rel=1e-6)
    assert "perplexity" in caplog.text


def test_perplexity_keeps_the_models_training_flag(input_ids):
    model = tiny_causal_lm("llama").train()
    perplexity(model, input_ids)
    assert model.training


def test_perplexity_of_a_bfloat16_model_is_computed_in_float32(input_ids):
    model = tiny_causal_lm("llama", dtype=torch.bfloat16)
    assert perplexity(model, input_ids) == pytest.approx(reference_perplexity(model, input_ids), rel=1e-2)


def test_windows_shorter_than_two_tokens_are_an_error(model):
    with pytest.raises(DataError, match="seq_len >= 2"):
        perplexity(model, torch.zeros(3, 1, dtype=torch.long))
