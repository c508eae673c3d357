"""GPTQ: quantize a weight column by column, moving each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

The Hessian of the layer's squared output error is ``H = 2/N · Σ x xᵀ`` over its calibration
inputs x (in,). Quantized codes, scales and offsets come back in the stored shapes of
`quant.quantize_weight`, so lowering and export cannot tell GPTQ from round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimc.distributed import World
from slimc.numerics.quant import expand_to_weight, fake_quantize, group_count, quantize, weight_qparams
from slimc.schemes import TensorScheme

HESSIAN_ROWS = 1024  # rows of the float64 sum scaled at a time when the float32 Hessian is made


class HessianAccumulator:
    """Running ``2/N · Σ x xᵀ`` of a layer's inputs (..., in), summed in float64 on the inputs' device: the sum of
    processes' partial sums (`reduce_hessians`) then rounds to the float32 Hessian of one process's sum."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], x.shape[-1], device=x.device, dtype=torch.float64)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def hessian(self, release: bool = False) -> torch.Tensor:
        """The float32 Hessian, each element the float64 one rounded once, built a block of rows at a time (no
        float64 copy of the whole: 2.9 GB at a 7B model's 18944 columns). `release` then frees the float64 sum."""
        if self.sum is None or self.count == 0:
            raise ValueError("no inputs were seen")
        hessian = torch.empty(self.sum.shape, dtype=torch.float32, device=self.sum.device)
        for rows in range(0, self.sum.shape[0], HESSIAN_ROWS):
            hessian[rows:rows + HESSIAN_ROWS] = self.sum[rows:rows + HESSIAN_ROWS] * (2.0 / self.count)
        if release:
            self.sum = None
        return hessian


class QuantizedInputAccumulator(HessianAccumulator):
    """The statistics of GPTQ on a layer's inputs as it will read them, `quantize`d (its input quantizer's
    quantize-dequantize, with scales fixed): the Hessian of the quantized inputs q(x) (``2/N · Σ q(x) q(x)ᵀ``, what
    `hessian` gives) and their cross sum with the float inputs (``C = Σ x q(x)ᵀ``). The weight that best maps the
    quantized inputs to the float outputs, ``W' = W C (Σ q(x) q(x)ᵀ)⁻¹``, leaves a residual orthogonal to the
    quantized inputs, so the run-time error ``Σ |W x − V q(x)|²`` of any V is that residual's plus
    ``Σ |(W' − V) q(x)|²``: GPTQ of W' on this Hessian minimises the error the layer makes on quantized inputs
    (GPTAQ's asymmetric calibration, for the layer's own input quantization)."""

    def __init__(self, quantize: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.quantize = quantize
        self.cross: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        quantized = self.quantize(x.float()).double()
        if self.cross is None:
            self.cross = torch.zeros(x.shape[-1], x.shape[-1], device=x.device, dtype=torch.float64)
        self.cross.addmm_(x.double().T, quantized)
        super().add(quantized)

    def input_correction(self, damp: float, release: bool = False) -> torch.Tensor:
        """M (in, in) float32 with ``W' = W M``: ``C (H + λI)⁻¹`` in float64, λ = damp · mean(diag H) as GPTQ damps
        H. `release` then frees the cross sum."""
        if self.sum is None or self.cross is None or self.count == 0:
            raise ValueError("no inputs were seen")
        damped = self.sum.clone()
        damped.diagonal().add_(damp * self.sum.diagonal().mean().clamp_min(1e-12))
        factor, info = torch.linalg.cholesky_ex(damped)
        if info != 0:
            raise ValueError("the Hessian of the quantized inputs stays singular after damping")
        correction = torch.cholesky_solve(self.cross.T.contiguous(), factor).T.float()  # C H⁻¹ = (H⁻¹ Cᵀ)ᵀ, H symmetric
        if release:
            self.cross = None
        return correction


def reduce_hessians(hessians: dict, world: World) -> None:
    """Sum each accumulator of `hessians` (target -> accumulator, or -> {(weight, expert): accumulator} for fused
    experts) over the processes; an expert some process saw gets an accumulator on all."""
    if world.size == 1 or not hessians:
        return
    accumulators = []
    for target in sorted(hessians):
        entry = hessians[target]
        if isinstance(entry, HessianAccumulator):
            if all(entry is not taken for taken in accumulators):  # Linears reading one input share it: sum it once
                accumulators.append(entry)
            continue
        seen = {key: value.sum.shape[0] for key, value in entry.items() if value.sum is not None}
        for key, size in sorted({k: s for process in world.gather(seen) for k, s in process.items()}.items()):
            found = entry.setdefault(key, HessianAccumulator())
            if found.sum is None:
                found.sum = torch.zeros(size, size, dtype=torch.float64)
            accumulators.append(found)
    for accumulator in accumulators:
        accumulator.sum = world.sum(accumulator.sum)
        if isinstance(accumulator, QuantizedInputAccumulator):
            accumulator.cross = world.sum(accumulator.cross)
    counts = world.sum(torch.tensor([a.count for a in accumulators], dtype=torch.float64))
    for accumulator, count in zip(accumulators, counts.tolist(), strict=True):
        accumulator.count = int(count)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = Uᵀ U with λ = damp · mean(diag H); damping grows until H is positive definite.

    With J the order-reversing permutation, J H J = L Lᵀ gives H = V Vᵀ for the upper V = J L J, so
    H⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹ (upper, positive diagonal: the factor is unique). One Cholesky and one
    triangular inverse, instead of a Cholesky, an inverse from it and a second Cholesky (tests/test_gptq.py
    bounds the difference from the float64 factor). Besides H, at most three matrices of its size are held: at
    18944 columns (a 7B model's down projection) each is 1.4 GB.
    """
    mean_diag = hessian.diagonal().mean().clamp_min(1e-8)
    for attempt in range(6):
        reversed_damped = hessian.flip(0, 1)  # J (H + λI) J: the diagonal stays the diagonal
        reversed_damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(reversed_damped)
        del reversed_damped
        if info == 0:
            upper = lower.flip(0, 1)
            del lower
            return upper_triangular_inverse(upper)
    raise ValueError("the Hessian stays singular even with strong damping; are the calibration inputs all zero?")


def upper_triangular_inverse(upper: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """The inverse of an upper triangular matrix, by halves: [[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹ B C⁻¹], [0, C⁻¹]].

    All but blocks of `leaf` rows are matrix products: a third of the multiply-adds of a triangular solve against
    the identity (which does not know its right-hand side is triangular), at a matrix product's speed; at 4096
    columns on one thread, half the time."""
    inverse = torch.zeros_like(upper)
    _invert_upper_into(upper, inverse, leaf)
    return inverse


def _invert_upper_into(upper: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    n = upper.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(upper, torch.eye(n, dtype=upper.dtype, device=upper.device), upper=True))
        return
    half = n // 2
    _invert_upper_into(upper[:half, :half], out[:half, :half], leaf)
    _invert_upper_into(upper[half:, half:], out[half:, half:], leaf)
    out[:half, half:] = (out[:half, :half] @ upper[:half, half:]) @ out[half:, half:]
    out[:half, half:].neg_()


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ takes from a layer's input Hessian alone, whatever the weight: the Linears reading one input (q, k
    and v; gate and up) factor their shared Hessian once. `dead` (in,) bool: the columns no input reached (zero
    diagonal); `order` (in,): the columns in processing order; `inverse` (in, in): the upper Cholesky factor of the
    damped inverse Hessian, rows and columns in that order."""

    dead: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor


def factor_hessian(hessian: torch.Tensor, *, damp: float = 0.01, act_order: bool = False) -> HessianFactor:
    """The factor of a Hessian (in, in) for `gptq_quantize`. With `act_order`, columns are processed in order of
    decreasing Hessian diagonal (the most informative inputs first)."""
    dead = hessian.diagonal() == 0
    diagonal = hessian.diagonal().float().masked_fill(dead, 1.0)  # a dead column gets a unit diagonal
    order = torch.argsort(diagonal, descending=True) if act_order else torch.arange(len(diagonal), device=diagonal.device)
    h = hessian.detach()[order][:, order].float()  # the one copy the factor works on
    h.diagonal().copy_(diagonal[order])
    return HessianFactor(dead, order, _inverse_hessian_factor(h, damp))


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    scheme: TensorScheme,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-quantize a weight (out, in) given its input Hessian (in, in), or that Hessian's `factor_hessian` (then
    `damp` and `act_order` are the factor's, not these).

    Returns (codes int8 (out, in), scale, offset), shapes as `quant.weight_range`. Per-channel
    and per-tensor scales are fixed from the whole weight first (with the scheme's observer,
    so `mse` clipping applies); per-group scales are fixed from the error-updated weights when
    the first column of the group is reached. With `act_order` groups stay the contiguous
    column ranges the format stores.
    """
    out_features, in_features = weight.shape
    w = weight.detach().float().clone()
    factor = hessian if isinstance(hessian, HessianFactor) else factor_hessian(hessian, damp=damp, act_order=act_order)
    w[:, factor.dead.to(w.device)] = 0.0

    grouped = scheme.granularity == "per_group"
    if grouped:
        groups = group_count(in_features, scheme.group_size)
        scale = torch.empty(out_features, groups, device=w.device)
        offset = torch.empty(out_features, groups, device=w.device)
        column_scale, column_offset = torch.empty_like(w), torch.empty_like(w)
    else:
        scale, offset = weight_qparams(w, scheme)
        column_scale, column_offset = expand_to_weight(scale, w.shape, scheme), expand_to_weight(offset, w.shape, scheme)

    order, hinv = factor.order.to(w.device), factor.inverse.to(w.device)
    position = torch.empty_like(order)  # where each original column sits in the processing order
    position[order] = torch.arange(in_features, device=order.device)
    w = w[:, order]
    quantized = torch.zeros_like(w)
    fixed_groups: set[int] = set()

    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        # The block's columns as rows (block, out): each column and its update are contiguous, not strided by `in`.
        # The values are those of updating w's columns in place; w gets them back before anything reads it.
        block = w[:, start:end].T.contiguous()
        errors, done = torch.zeros_like(block), torch.empty_like(block)
        hinv_block = hinv[start:end, start:end]
        for i, column in enumerate(order[start:end].tolist()):
            if grouped and column // scheme.group_size not in fixed_groups:
                group = column // scheme.group_size
                columns = slice(group * scheme.group_size, (group + 1) * scheme.group_size)
                w[:, start:end] = block.T  # a group reads its columns' current values, these included
                group_scale, group_offset = weight_qparams(w[:, position[columns]], scheme)
                scale[:, group], offset[:, group] = group_scale[:, 0], group_offset[:, 0]
                column_scale[:, columns], column_offset[:, columns] = group_scale, group_offset
                fixed_groups.add(group)
            col = block[i]
            q = fake_quantize(col, column_scale[:, column], column_offset[:, column], scheme)
            done[i] = q
            error = (col - q) / hinv_block[i, i]
            block[i:] -= hinv_block[i, i:, None] * error[None, :]
            errors[i] = error
        w[:, start:end] = block.T
        quantized[:, start:end] = done.T
        w[:, end:] -= errors.T.contiguous() @ hinv[start:end, end:]

    restored = torch.empty_like(quantized)
    restored[:, order] = quantized
    codes = quantize(restored, expand_to_weight(scale, w.shape, scheme), expand_to_weight(offset, w.shape, scheme), scheme)
    return codes, scale, offset
