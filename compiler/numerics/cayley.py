"""Descent on the orthogonal group by Cayley transforms (Li, Fuxin & Todorovic, 2020; SpinQuant learns its
rotations so): every step's result is orthogonal up to float64 rounding, with no re-orthogonalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cayley_step(rotations: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], angle: float) -> list[torch.Tensor]:
    """One Cayley step from the orthogonal `rotations` (each (n, n), n may differ) down the Euclidean `gradients`
    of one loss: a step on their product group, as if they were the blocks of one block-diagonal rotation.

    Per rotation, A = G Rᵀ − R Gᵀ is skew-symmetric, and R' = (I + α/2 A)⁻¹ (I − α/2 A) R is orthogonal for any α,
    moving along −(G − R Gᵀ R), the gradient projected onto the group's tangent space at R. One α = angle / ‖A‖
    for all, ‖A‖ the Frobenius norm of every A together: the step turns them by about `angle` radians in all,
    whatever the scale of the loss, each by its share of the gradient. Float64 in and out.
    """
    skews = [g @ r.T - r @ g.T for r, g in zip(rotations, gradients, strict=True)]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.matrix_norm(a) for a in skews]))) if skews else 0.0
    if norm == 0.0:
        return list(rotations)
    step = angle / norm
    stepped = []
    for rotation, skew in zip(rotations, skews, strict=True):
        eye = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
        stepped.append(torch.linalg.solve(eye + 0.5 * step * skew, (eye - 0.5 * step * skew) @ rotation))
    return stepped
