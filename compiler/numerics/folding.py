"""What rotate folds into the weights, as pure functions on tensors: rotate stores their results in the parameters,
the learned rotation (slimc.passes.learned_rotation) runs the model on them, differentiably in a dense R. Each
computes in its input's dtype, so the caller chooses the precision."""

from __future__ import annotations

import torch

from slimc.numerics.hadamard import KroneckerRotation

Rotation = torch.Tensor | KroneckerRotation  # dense (n, n), or factored: n·Σ(factor orders) per row instead of n²


def scaled_inputs(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W (..., in) -> W·diag(s): the scale s (in,) of the norm before the layer moved into it."""
    return weight * scale.to(weight)


def rotated_inputs(weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """W (..., in) -> W @ R: the layer reads x·R and computes what it did on x (a bias b (in,) written as y·R: b @ R)."""
    if isinstance(rotation, KroneckerRotation):
        return rotation.apply(weight)
    return weight @ rotation.to(weight.device, weight.dtype)


def rotated_outputs(weight: torch.Tensor, bias: torch.Tensor | None, rotation: Rotation) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W (..., out, in) -> Rᵀ @ W and b (..., out) -> b @ R: the layer writes y·R."""
    folded = rotated_inputs(weight.transpose(-1, -2), rotation).transpose(-1, -2)
    return folded, None if bias is None else rotated_inputs(bias, rotation)


def rotated_head_values(weight: torch.Tensor, bias: torch.Tensor | None, rotation: Rotation,
                        head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v_proj's W (heads·head_dim, in) and b: each head's values become v·R (R of order head_dim)."""
    folded, folded_bias = rotated_outputs(weight.reshape(-1, head_dim, weight.shape[-1]),
                                          None if bias is None else bias.reshape(-1, head_dim), rotation)
    return folded.reshape(weight.shape), None if bias is None else folded_bias.reshape(bias.shape)


def rotated_head_reader(weight: torch.Tensor, rotation: Rotation, head_dim: int) -> torch.Tensor:
    """o_proj's W (out, heads·head_dim) -> reads each head's values v·R back."""
    return rotated_inputs(weight.reshape(weight.shape[0], -1, head_dim), rotation).reshape(weight.shape)
