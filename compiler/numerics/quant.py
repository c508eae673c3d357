"""Quantization numerics: pure functions on tensors.

Conventions (the ones Ascend runtimes use, see docs/formats/mindie.md):
- symmetric: ``scale = amax / qmax``, ``offset = 0``;
- asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``offset = round(-min / scale) + qmin``;
- ``q = clamp(round(x / scale + offset), qmin, qmax)``, ``x ≈ (q - offset) * scale``.
Scales and offsets are float32 and broadcast against the tensor they belong to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slimc.schemes import TensorScheme

_TINY = torch.finfo(torch.float32).tiny * 1024


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, scheme: TensorScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset for values in [min_val, max_val] (any broadcastable shape, float32 out).

    The range is widened to include 0 so that exact zeros (padding, ReLU) stay exact.
    """
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if scheme.symmetric:
        scale = torch.maximum(-min_val, max_val) / scheme.qmax
        offset = torch.zeros_like(scale)
    else:
        scale = (max_val - min_val) / (scheme.qmax - scheme.qmin)
        scale = torch.clamp(scale, min=_TINY)
        offset = torch.round(-min_val / scale) + scheme.qmin
        offset = torch.clamp(offset, scheme.qmin, scheme.qmax)
    return torch.clamp(scale, min=_TINY), offset


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """Integer codes of ``x`` (returned as int8 storage for int8 and int4 alike).

    ``round(x / scale + offset)``, in that order, as the runtimes compute it: ``round(x / scale) +
    offset`` differs on float ties, and one flipped activation step compounds through the layers.
    """
    q = torch.round(x.float() / scale + offset)
    return torch.clamp(q, scheme.qmin, scheme.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Float32 values of integer codes."""
    return (q.float() - offset).mul_(scale)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """Quantize then dequantize, in the dtype of ``x``: the values of `dequantize(quantize(...))`, each step
    done in place on one float32 buffer (lowered layers and searches run this on every activation).
    A symmetric scheme's offset is 0, which it neither adds nor subtracts: two passes fewer, the same values
    (a code of -0 stays -0, which adding 0 made +0; equal as numbers, in every product and sum after)."""
    values = x.float() / scale
    if scheme.symmetric:
        values.round_().clamp_(scheme.qmin, scheme.qmax).mul_(scale)
    else:
        values.add_(offset).round_().clamp_(scheme.qmin, scheme.qmax).sub_(offset).mul_(scale)
    return values.to(x.dtype)


FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The symmetric float8 e4m3 scale of values up to `amax` in magnitude: amax / 448 (compressed-tensors' and
    vLLM's static FP8 convention), float32."""
    return torch.clamp(amax.float() / FP8_E4M3_MAX, min=_TINY)


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8(clamp(x / scale, ±448)) · scale`` in float32, back in the dtype of ``x``: what an FP8 KV cache holds."""
    values = (x.float() / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return values.mul_(scale).to(x.dtype)


def group_count(in_features: int, group_size: int) -> int:
    """How many groups of ``group_size`` input channels there are; raises ValueError if it does not divide."""
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input size {in_features}")
    return in_features // group_size


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in / group_size, group_size); raises ValueError if it does not divide."""
    out_features, in_features = w.shape
    return w.reshape(out_features, group_count(in_features, group_size), group_size)


def weight_range(w: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a weight (out, in) at the scheme's granularity.

    Shapes: per_tensor (1, 1); per_channel (out, 1); per_group (out, in / g).
    """
    w = w.float()
    if scheme.granularity == "per_tensor":
        return w.min().reshape(1, 1), w.max().reshape(1, 1)
    if scheme.granularity == "per_channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if scheme.granularity == "per_group":
        g = grouped(w, scheme.group_size)
        return g.amin(dim=2), g.amax(dim=2)
    raise ValueError(f"weights cannot be quantized {scheme.granularity}")


def expand_to_weight(param: torch.Tensor, w_shape: torch.Size, scheme: TensorScheme) -> torch.Tensor:
    """Broadcast a stored weight scale/offset to the full (out, in) weight shape."""
    if scheme.granularity == "per_group":
        return param.repeat_interleave(scheme.group_size, dim=1)
    return param.expand(w_shape)


def act_range(x: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of an activation (..., in), float32: per_tensor () or per_token (..., 1)."""
    if scheme.granularity == "per_tensor":
        low, high = torch.aminmax(x)
    elif scheme.granularity == "per_token":
        # two reductions: torch.aminmax along the last dimension is 7 to 18 times slower on the CPU (torch 2.x)
        low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"activations cannot be quantized {scheme.granularity}")
    return low.float(), high.float()


def dynamic_fake_quantize(x: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """Quantize-dequantize an activation with scales computed from ``x`` itself (dynamic)."""
    scale, offset = qparams_from_range(*act_range(x, scheme), scheme)
    return fake_quantize(x, scale, offset, scheme)


INT32_MAX = torch.iinfo(torch.int32).max


def integer_products(act: TensorScheme | None, weight: TensorScheme, in_features: int) -> bool:
    """Whether a lowered layer's products can be summed as integers, exactly: integer activation codes against
    symmetric weights with one scale per output row (a per-group scale varies along the summed dimension, so it
    cannot factor out of the sum), in int32 sums that cannot overflow. An asymmetric activation subtracts its
    offset times the weight codes' row sums, which doubles the bound."""
    if act is None or not weight.symmetric or weight.granularity not in ("per_channel", "per_tensor"):
        return False
    largest = max(-act.qmin, act.qmax) * max(-weight.qmin, weight.qmax) * in_features
    return largest * (1 if act.symmetric else 2) <= INT32_MAX


def activation_codes(x: torch.Tensor, scheme: TensorScheme, scale: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An activation (..., in) as int8 codes (rows, in) with its scale and offset, (rows, 1) or broadcastable:
    computed from ``x`` (dynamic) where `scale` is None, else the calibrated ones. The codes are the ones
    `fake_quantize` rounds to, by the same steps."""
    rows = x.reshape(-1, x.shape[-1])
    if scale is None:
        scale, offset = qparams_from_range(*act_range(rows, scheme), scheme)
    values = rows.float() / scale
    if not scheme.symmetric:
        values.add_(offset)
    return values.round_().clamp_(scheme.qmin, scheme.qmax).to(torch.int8), scale, offset


def integer_linear(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, symmetric: bool,
                   weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``((codes − offset) · weight_codesᵀ) · scale · weight_scale + bias``, float32 (rows, out): the products summed
    exactly in int32 (`integer_products` says where they fit), then scaled, as the quantized runtimes' integer
    matmul computes it. The codes (rows, in) and weight codes (out, in) are int8; the weight scale is one per row."""
    acc = torch._int_mm(codes, weight_codes.t())
    if not symmetric:
        acc.sub_(offset.to(torch.int32) * weight_codes.sum(dim=1, dtype=torch.int32))
    out = acc.float().mul_(scale).mul_(weight_scale.reshape(1, -1))
    return out if bias is None else out.add_(bias)


class LastQuantized:
    """`quantize(x, scheme)` with its last result kept: Linears that read one tensor with one scheme (q, k and v;
    gate and up) get it quantized once, the first of them. A tensor written in place since (its version moved) is
    quantized again. Keeps that tensor and its result alive until the next call, or until it is dropped."""

    def __init__(self, quantize: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        self._quantize = quantize
        self._last: tuple[torch.Tensor, int, Any, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, scheme: Any) -> torch.Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version and last[2] == scheme:
            return last[3]
        result = self._quantize(x, scheme)
        self._last = (x, x._version, scheme, result)
        return result


def clip_search_weight_qparams(
    w: torch.Tensor, scheme: TensorScheme, grid: int = 40, max_shrink: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight scale/offset minimising the squared quantization error per row or group (mse observer).

    Tries shrinking the min/max range by factors in [1 - max_shrink, 1] and keeps, per scale
    entry, the factor with the lowest error.
    """
    w = w.float()
    lo, hi = weight_range(w, scheme)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_offset = qparams_from_range(lo, hi, scheme)
    for i in range(grid + 1):
        factor = 1.0 - max_shrink * i / grid
        scale, offset = qparams_from_range(lo * factor, hi * factor, scheme)
        err = _weight_error(w, scale, offset, scheme)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def _weight_error(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """Squared error per stored scale entry."""
    full_scale = expand_to_weight(scale, w.shape, scheme)
    full_offset = expand_to_weight(offset, w.shape, scheme)
    sq = fake_quantize(w, full_scale, full_offset, scheme).sub_(w)
    sq.mul_(sq)  # in place on fake_quantize's buffer: two fewer passes over the weight than (q - w) ** 2
    if scheme.granularity == "per_tensor":
        return sq.sum().reshape(1, 1)
    if scheme.granularity == "per_channel":
        return sq.sum(dim=1, keepdim=True)
    return grouped(sq, scheme.group_size).sum(dim=2)


def weight_qparams(w: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of a weight (out, in) by the scheme's observer (stored shapes as weight_range)."""
    if scheme.observer == "mse":
        return clip_search_weight_qparams(w, scheme)
    if scheme.observer == "percentile":
        lo, hi = _percentile_weight_range(w, scheme)
        return qparams_from_range(lo, hi, scheme)
    return qparams_from_range(*weight_range(w, scheme), scheme)


def _percentile_weight_range(w: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor]:
    q = scheme.percentile / 100.0
    w = w.float()
    if scheme.granularity == "per_tensor":
        flat = w.reshape(1, -1)
    elif scheme.granularity == "per_channel":
        flat = w
    else:
        flat = grouped(w, scheme.group_size)
    lo = torch.quantile(flat, 1.0 - q, dim=-1, keepdim=scheme.granularity != "per_group")
    hi = torch.quantile(flat, q, dim=-1, keepdim=scheme.granularity != "per_group")
    return lo, hi


def quantize_weight(w: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest weight quantization: (codes int8 (out, in), scale, offset) with stored shapes."""
    scale, offset = weight_qparams(w, scheme)
    q = quantize(w, expand_to_weight(scale, w.shape, scheme), expand_to_weight(offset, w.shape, scheme), scheme)
    return q, scale, offset


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """Float32 weight (out, in) from codes and stored scale/offset."""
    return dequantize(q, expand_to_weight(scale, q.shape, scheme), expand_to_weight(offset, q.shape, scheme))


def round_through(x: torch.Tensor) -> torch.Tensor:
    """round(x), whose gradient is taken as that of x (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def ste_fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """`fake_quantize` with a gradient (for learning what feeds a quantizer): the rounding passes the gradient
    straight through, the clamp stops it outside the range, and the scale, if computed from ``x``, gets the gradient
    of the error it causes. Float32 out."""
    values = round_through(x.float() / scale + offset)
    return (values.clamp(scheme.qmin, scheme.qmax) - offset) * scale


def ste_fake_quantize_weight(w: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a weight (out, in) from its min/max range, with a gradient
    (`ste_fake_quantize`); float32 out. The `mse` and `percentile` observers search without gradients and are not
    applied here."""
    scale, offset = qparams_from_range(*weight_range(w, scheme), scheme)
    if scheme.granularity == "per_group":
        values = ste_fake_quantize(grouped(w, scheme.group_size), scale[..., None], offset[..., None], scheme)
        return values.reshape(w.shape)
    return ste_fake_quantize(w, scale, offset, scheme)


def ste_dynamic_fake_quantize(x: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """`dynamic_fake_quantize` with a gradient (`ste_fake_quantize`), in the dtype of ``x``. A static scheme is
    quantized with the range of ``x`` itself, as its observer would measure it on this batch."""
    scale, offset = qparams_from_range(*act_range(x, scheme), scheme)
    return ste_fake_quantize(x, scale, offset, scheme).to(x.dtype)


FAKE_QUANT_CHUNK = 1 << 20  # weight elements per float32 working chunk of fake_quantize_weight


def fake_quantize_weight(w: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a weight (out, in), in its dtype: the values of
    `dequantize_weight(*quantize_weight(w, scheme), scheme).to(w.dtype)`.

    A search tries many weights of a large layer; this takes a few rows at a time into float32,
    instead of the whole weight's float32 copies, codes and scales expanded to its shape.
    """
    out = torch.empty_like(w)
    whole = weight_qparams(w, scheme) if scheme.granularity == "per_tensor" else None  # the one not row by row
    rows = max(1, FAKE_QUANT_CHUNK // w.shape[1])
    for start in range(0, w.shape[0], rows):
        part = w[start:start + rows]
        scale, offset = whole if whole is not None else weight_qparams(part, scheme)
        if scheme.granularity == "per_group":
            values = fake_quantize(grouped(part, scheme.group_size), scale[..., None], offset[..., None], scheme)
            out[start:start + rows] = values.reshape(part.shape)
        else:
            out[start:start + rows] = fake_quantize(part, scale, offset, scheme)
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes in [-8, 7] two per byte along the last dim (low nibble first): (..., n) -> (..., n/2) int8."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    return packed.view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (..., n/2) int8 -> (..., n) int8 codes in [-8, 7]."""
    u = packed.view(torch.uint8)
    low = (u & 0xF).to(torch.int16)
    high = (u >> 4).to(torch.int16)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=-1).flatten(-2).to(torch.int8)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant migration scales ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input channel.

    Activations are divided by ``s`` and weights multiplied by it. Channels that are all zero in
    either tensor keep ``s = 1``; scales are clamped to [1e-5, 1e5] to stay finite in low precision.
    """
    act_absmax, weight_absmax = act_absmax.float(), weight_absmax.float()
    scales = act_absmax.pow(alpha) / weight_absmax.pow(1.0 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0) | ~torch.isfinite(scales)
    return torch.where(dead, torch.ones_like(scales), scales).clamp(1e-5, 1e5)
