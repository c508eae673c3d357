"""What rotate folds into the weights, as pure functions on tensors: rotate stores their results in the parameters,
the learned rotation (slimc.passes.learned_rotation) runs the model on them, differentiably in a dense R. Each
computes in its input's dtype, so the caller chooses the precision."""

from __future__ import annotations

import torch

from slimc.numerics.hadamard import KroneckerRotation, precise_dtype

Rotation = torch.Tensor | KroneckerRotation  # dense (n, n), or factored: n·Σ(factor orders) per row instead of n²


def precise(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor detached, in float64 where its device has it (the folding is exact only up to the arithmetic)."""
    return None if tensor is None else tensor.detach().to(precise_dtype(tensor.device))


def scaled_inputs(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W (..., in) -> W·diag(s): the scale s (in,) of the norm before the layer moved into it."""
    return weight * scale.to(weight)


def _order(rotation: Rotation) -> int:
    return rotation.order if isinstance(rotation, KroneckerRotation) else rotation.shape[0]


def rotated_inputs(weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """W (..., in) -> W·(I ⊗ R): the layer reads x·(I ⊗ R) and computes what it did on x, R (n, n) turning each group
    of n channels (all of them for R1, each attention head's for R2). A bias b written as y·(I ⊗ R) folds alike."""
    if weight.shape[-1] != _order(rotation):
        return rotated_inputs(weight.reshape(*weight.shape[:-1], -1, _order(rotation)), rotation).reshape(weight.shape)
    if isinstance(rotation, KroneckerRotation):
        return rotation.apply(weight)
    return weight @ rotation.to(weight.device, weight.dtype)


def rotated_outputs(weight: torch.Tensor, bias: torch.Tensor | None, rotation: Rotation) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W (..., out, in) -> (I ⊗ R)ᵀ·W and b (out,) -> b·(I ⊗ R): the layer writes y·(I ⊗ R), R (n, n) turning each
    group of n output channels."""
    folded_bias = None if bias is None else rotated_inputs(bias, rotation)
    if weight.shape[-2] != _order(rotation):
        rows = weight.reshape(*weight.shape[:-2], -1, _order(rotation), weight.shape[-1])
        return rotated_outputs(rows, None, rotation)[0].reshape(weight.shape), folded_bias
    return rotated_inputs(weight.transpose(-1, -2), rotation).transpose(-1, -2), folded_bias
