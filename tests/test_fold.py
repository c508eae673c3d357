"""Folding into weights part by part: the result of the whole-tensor computation, with working copies bounded by
PART_ELEMENTS (fused MoE experts and large embeddings are gigabytes in bf16)."""

import pytest
import torch
from torch import nn

from slimc.ir import Block
from slimc.numerics.folding import rotated_inputs, rotated_outputs
from slimc.numerics.hadamard import random_rotation
from slimc.passes.rotate import rotate_inputs, rotate_outputs
from slimc.patterns import fold
from slimc.patterns.graph import Consumer


class FusedExperts(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(6, 10, 16, generator=generator).to(dtype), requires_grad=False)


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of at most 40 elements: two experts' (10, 16) slices do not fit, so each expert is a part of its own
    and a (10, 16) matrix splits into rows."""
    monkeypatch.setattr(fold, "PART_ELEMENTS", 40)


def test_parts_cover_the_tensor_in_views_of_whole_trailing_slices(small_parts):
    weight = torch.arange(6 * 10 * 16, dtype=torch.float32).reshape(6, 10, 16)
    rows = list(fold.tensor_parts(weight))
    assert [p.shape for p in rows] == [(2, 16)] * 30 and all(p.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for p in rows)
    assert torch.equal(torch.cat(rows), weight.reshape(-1, 16))
    experts = list(fold.tensor_parts(weight, trailing=2))
    assert [p.shape for p in experts] == [(1, 10, 16)] * 6
    transposed = weight.transpose(1, 2)
    assert [p.shape for p in fold.tensor_parts(transposed)] == [transposed.shape]  # not viewable: whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_fused_experts_by_parts_equals_folding_them_whole(small_parts, dtype):
    rotation = random_rotation(16, seed=3)[0]
    weight = FusedExperts(dtype).gate_up_proj.detach()
    expected_inputs = rotated_inputs(weight.double(), rotation).to(dtype)
    inputs = weight.clone()
    rotate_inputs(inputs, rotation)
    assert torch.equal(inputs, expected_inputs)

    by_rows = random_rotation(10, seed=4)[0]
    expected_outputs = rotated_outputs(weight.double(), None, by_rows)[0].to(dtype)
    outputs = weight.clone()
    rotate_outputs(outputs, None, by_rows)
    assert torch.equal(outputs, expected_outputs)

    layer = nn.Module()
    layer.experts = FusedExperts(dtype)
    block = Block("model.layers.0", layer, nn.ModuleList([layer]), 0)
    experts = [Consumer("experts", "experts")]
    assert torch.equal(fold.input_channel_absmax(block, experts), weight.float().abs().reshape(-1, 16).amax(0))
    scale = torch.linspace(0.5, 2.0, 16)
    fold.scale_input_channels(block, experts, scale)
    assert torch.equal(layer.experts.gate_up_proj, (weight.float() * scale).to(dtype))


def test_update_in_parts_never_hands_the_transform_more_than_a_part(small_parts):
    seen = []

    def double(part: torch.Tensor) -> torch.Tensor:
        seen.append(part.numel())
        return part * 2

    weight = torch.ones(6, 10, 16)
    fold.update_in_parts(weight, double)
    assert max(seen) <= 40 and sum(seen) == weight.numel() and torch.equal(weight, torch.full_like(weight, 2.0))
