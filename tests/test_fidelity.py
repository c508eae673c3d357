"""Fidelity numerics against their plain formulas, and the comparison of two models block by block."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_causal_lm

import slimc.numerics.fidelity
from slimc.errors import DataError
from slimc.frontends.llm import call_without_cache
from slimc.numerics.fidelity import (
    Metrics,
    compare_models,
    cosine_similarity,
    float_leaves,
    json_safe,
    metrics_of,
    pair_sums,
    psnr,
    relative_error,
    render,
    summarize,
    tensor_sums,
)


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, 7, generator=generator) * 4 + 1
    return f + 0.1 * torch.randn(f.shape, generator=generator), f


def test_cosine_similarity_is_the_dot_product_over_the_norms(pair):
    q, f = pair
    assert cosine_similarity(q, f) == pytest.approx(float(F.cosine_similarity(q.flatten(), f.flatten(), dim=0)), rel=1e-6)


def test_relative_error_is_the_error_norm_over_the_float_norm(pair):
    q, f = pair
    assert relative_error(q, f) == pytest.approx(float((q - f).norm() / f.norm()), rel=1e-6)


def test_relative_error_equals_the_one_from_all_the_sums_bit_for_bit(pair, monkeypatch):
    q, f = pair
    monkeypatch.setattr(slimc.numerics.fidelity, "CHUNK", 16)  # several chunks, summed in the same order
    for quantized in (q, q.to(torch.bfloat16), f.clone(), torch.zeros_like(f)):
        assert relative_error(quantized, f) == metrics_of(tensor_sums(quantized, f)).relative_error


def test_relative_error_of_tensors_of_different_shapes_is_an_error(pair):
    q, f = pair
    with pytest.raises(DataError, match="shape"):
        relative_error(q[:2], f)


def test_psnr_is_ten_log10_of_the_squared_float_range_over_the_mse(pair):
    q, f = pair
    expected = 10 * math.log10(float(f.max() - f.min()) ** 2 / float(((q - f) ** 2).mean()))
    assert psnr(q, f) == pytest.approx(expected, rel=1e-6)


def test_identical_tensors_give_cosine_1_relative_error_0_and_infinite_psnr(pair):
    _, f = pair
    assert metrics_of(tensor_sums(f.clone(), f)) == Metrics(cosine=pytest.approx(1.0), relative_error=0.0, psnr=math.inf)


def test_zero_tensors_are_identical_and_a_zero_reference_gives_infinite_relative_error():
    zero = torch.zeros(4)
    assert metrics_of(tensor_sums(zero, zero)) == Metrics(1.0, 0.0, math.inf)
    assert relative_error(torch.ones(4), zero) == math.inf


def test_bfloat16_tensors_are_compared_in_float64():
    f = torch.linspace(-3, 3, 101)
    q = f.to(torch.bfloat16)
    assert relative_error(q, f) == pytest.approx(float((q.double() - f.double()).norm() / f.double().norm()), rel=1e-9)


def test_chunked_sums_equal_one_pass(pair, monkeypatch):
    q, f = pair
    whole = tensor_sums(q, f)
    monkeypatch.setattr(slimc.numerics.fidelity, "CHUNK", 16)
    chunked = tensor_sums(q, f)
    for key in ("ff", "qq", "qf", "dd"):
        assert getattr(chunked, key) == pytest.approx(getattr(whole, key), rel=1e-12)
    assert (chunked.low, chunked.high, chunked.n) == (whole.low, whole.high, whole.n)


def test_tensors_of_different_shapes_are_not_compared():
    with pytest.raises(DataError, match=r"shape \(2, 3\).*shape \(3, 2\)"):
        tensor_sums(torch.zeros(2, 3), torch.zeros(3, 2))


def test_every_float_leaf_of_an_output_is_compared_as_one_vector(pair):
    q, f = pair
    mask = torch.ones(3, dtype=torch.long)
    quantized = float_leaves((q[0], {"mask": mask, "sample": q[1:]}))
    reference = float_leaves((f[0], {"mask": mask, "sample": f[1:]}))
    assert list(reference) == ["0", "1.sample"]  # integer tensors are not compared
    joined = metrics_of(pair_sums(quantized, reference, "block"))
    assert joined == metrics_of(tensor_sums(q, f))


def test_summary_is_the_mean_and_the_worst_of_the_batches():
    batches = [Metrics(0.99, 0.10, 30.0), Metrics(0.97, 0.20, 20.0), Metrics(1.0, 0.0, math.inf)]
    summary = summarize(batches[:2])
    assert summary.mean == Metrics(pytest.approx(0.98), pytest.approx(0.15), pytest.approx(25.0))
    assert summary.worst == Metrics(0.97, 0.20, 20.0)
    assert summarize(batches).worst == Metrics(0.97, 0.20, 20.0)


def test_json_safe_writes_infinities_as_strings():
    assert json_safe({"a": [math.inf, -math.inf, 1.5]}) == {"a": ["inf", "-inf", 1.5]}


# --- two models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    return tiny_causal_lm("llama")


def batches(count: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(4, 512, (2, 12), generator=generator)} for _ in range(count)]


LAYERS = ["model.layers.0", "model.layers.1"]


def test_a_model_against_its_copy_gives_cosine_1_relative_error_0_and_infinite_psnr(llm):
    report = compare_models(llm, copy.deepcopy(llm), batches(), call_without_cache, LAYERS)
    for summary in [*report.blocks.values(), *report.outputs.values()]:
        assert summary.worst.cosine == pytest.approx(1.0, abs=1e-6)
        assert summary.worst.relative_error == 0.0 and summary.worst.psnr == math.inf


def test_the_report_lists_every_block_in_order_then_the_logits(llm):
    noisy = copy.deepcopy(llm)
    with torch.no_grad():
        noisy.model.layers[1].mlp.down_proj.weight.mul_(1.05)
    report = compare_models(llm, noisy, batches(3), call_without_cache, LAYERS)
    assert list(report.blocks) == LAYERS and list(report.outputs) == ["logits"]
    assert report.blocks["model.layers.0"].worst.relative_error == 0.0
    assert 0 < report.blocks["model.layers.1"].mean.relative_error < 0.05
    assert report.outputs["logits"].batches == 3


def test_a_block_name_the_model_lacks_is_a_data_error(llm):
    with pytest.raises(DataError, match="no block model.layers.9"):
        compare_models(llm, llm, batches(1), call_without_cache, ["model.layers.9"])


def test_the_table_has_a_row_per_block_and_per_output(llm):
    report = compare_models(llm, copy.deepcopy(llm), batches(1), call_without_cache, LAYERS)
    text = render({"dataset": "builtin:text-eval", "batches": 1, "quantized_dir": "OUT", **report.to_dict()})
    rows = [line.split()[0:2] for line in text.splitlines()[3:]]
    assert rows == [["model.layers.0", "1.000000"], ["model.layers.1", "1.000000"], ["output", "logits"]]
    assert "cosine" in text and "rel. error" in text and "PSNR (dB)" in text and "inf" in text


def test_json_rows_count_the_batches_that_reached_each_block(llm):
    report = compare_models(llm, copy.deepcopy(llm), batches(2), call_without_cache, LAYERS)
    assert [row["batches"] for row in report.to_dict()["blocks"]] == [2, 2]
