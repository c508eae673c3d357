"""Descent on the orthogonal group by Cayley transforms (Li, Fuxin & Todorovic, 2020; SpinQuant learns its
rotations so): every step's result is orthogonal up to float64 rounding, with no re-orthogonalisation."""

from __future__ import annotations

import torch


def cayley_step(rotation: torch.Tensor, gradient: torch.Tensor, angle: float) -> torch.Tensor:
    """One Cayley step from the orthogonal `rotation` (n, n) down the Euclidean `gradient` (n, n) of a loss.

    A = G Rᵀ − R Gᵀ is skew-symmetric, and R' = (I + α/2 A)⁻¹ (I − α/2 A) R is orthogonal for any α, moving
    along −(G − R Gᵀ R), the gradient projected onto the group's tangent space at R. α = angle / ‖A‖ (Frobenius):
    the step turns R by about `angle` radians, whatever the scale of the loss. Float64 in and out.
    """
    skew = gradient @ rotation.T - rotation @ gradient.T
    norm = float(torch.linalg.matrix_norm(skew))
    if norm == 0.0:
        return rotation
    step = angle / norm
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
    return torch.linalg.solve(eye + 0.5 * step * skew, (eye - 0.5 * step * skew) @ rotation)
