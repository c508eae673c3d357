"""Lowered layers as one custom torch op each while a Program is exported, and that op's ONNX translation.

While exporting, every QuantizedLinear, and every expert projection of QuantizedExperts, runs as
`slimc_onnx::quantized_linear` (its eager and fake implementations compute what QuantizedLinear does);
`translate_quantized_linear` writes it in ONNX ops from the scheme alone. The weight is the lowered
int8 buffer, so it reaches the file as an integer initializer; `onnx_graph` then folds the transpose
(and the int4 cast) that this translation puts in front of it into the initializer itself.

Layouts, with W the codes transposed to (in, out):

- weight only: ``MatMul(x, DequantizeLinear(W, scale, zp))`` (+ ``Add`` bias);
- static activations: ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)`` before that MatMul, int8 codes of
  both as uint8 (+128), which the runtime fuses into an exact uint8 x uint8 integer matmul;
- dynamic symmetric activations with symmetric per-channel or per-tensor weights (integer matmul):
  the scale ``max|x| / qmax`` per token (``ReduceMax(Abs)``), codes ``Clip(Round(x / s))`` shifted by 128
  to uint8, ``MatMulInteger(codes, W + 128, 128, 128)`` to int32, ``Cast`` to float, ``× s × weight_scale``.
  Both operands are uint8: x86 CPUs without VNNI multiply uint8 × int8 with a saturating 16-bit sum
  (``vpmaddubsw``), which ONNX Runtime's uint8 × int8 kernel inherits, so that pairing is wrong there;
- other dynamic schemes (or with ``integer_matmul: false``): the same codes dequantized
  (``(q - offset) · s``) before the DequantizeLinear MatMul.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from onnxscript import ir
from onnxscript import opset21 as op
from torch import nn

from slimc.numerics.modules import EXPERT_WEIGHTS, QuantizedExperts, QuantizedLinear
from slimc.numerics.quant import _TINY as SCALE_FLOOR  # the floor qparams_from_range clamps scales to
from slimc.schemes import QuantScheme, TensorScheme

__all__ = ["exporting_custom_ops", "integer_matmul", "translation_table"]

_INT_TYPES = {"int8": ir.DataType.INT8, "int4": ir.DataType.INT4}
UINT8_SHIFT = 128  # int8 codes + 128 = uint8: ONNX Runtime multiplies u8 x u8 exactly, and several times faster than s8 x s8


@torch.library.custom_op("slimc_onnx::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_offset: torch.Tensor,
                     bias: torch.Tensor | None, input_scale: torch.Tensor | None, input_offset: torch.Tensor | None,
                     scheme: str, integer: bool) -> torch.Tensor:
    qparams = None if input_scale is None else (input_scale, input_offset)
    layer = QuantizedLinear(QuantScheme.model_validate_json(scheme), weight, weight_scale, weight_offset, bias, qparams, x.dtype)
    return layer(x)


@quantized_linear.register_fake
def _(x, weight, weight_scale, weight_offset, bias, input_scale, input_offset, scheme, integer):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def integer_matmul(scheme: QuantScheme, enabled: bool) -> bool:
    """Whether the layer runs as MatMulInteger: dynamic symmetric activations and symmetric weights with one
    scale per output channel (a per-group scale varies along the summed dimension, so it cannot factor out)."""
    act, weight = scheme.act, scheme.weight
    return (enabled and act is not None and act.dynamic and act.symmetric and weight.symmetric
            and weight.granularity in ("per_channel", "per_tensor"))


def _linear_forward(layer: QuantizedLinear, integer: bool, x: torch.Tensor) -> torch.Tensor:
    return quantized_linear(x, layer.weight, layer.weight_scale, layer.weight_offset, layer.bias, layer.input_scale,
                            layer.input_offset, layer.scheme.model_dump_json(), integer)


def _expert_linear(experts: QuantizedExperts, which: str, expert: int, x: torch.Tensor, integer: bool) -> torch.Tensor:
    """One expert's projection `which` (gate_up_proj / down_proj) as the custom op, on every token."""
    bias = getattr(experts, f"{which}_bias", None)
    stem = which.removesuffix("_proj")
    static = experts.scheme.act is not None and not experts.scheme.act.dynamic
    qparams = [getattr(experts, f"{stem}_input_{q}")[expert:expert + 1] if static else None for q in ("scale", "offset")]
    return quantized_linear(x, getattr(experts, which)[expert], getattr(experts, f"{which}_scale")[expert],
                            getattr(experts, f"{which}_offset")[expert], None if bias is None else bias[expert],
                            *qparams, experts.scheme.model_dump_json(), integer)


def _experts_forward(experts: QuantizedExperts, integer: bool, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """QuantizedExperts as a static graph: every expert on every token, weighted by its routing weight (0 where the
    token is not routed to it). Routed tokens get the same sum, in the same expert order, as `combine_experts`."""
    out = torch.zeros_like(hidden_states)
    for expert in range(experts.num_experts):
        routed = (top_k_weights * (top_k_index == expert)).sum(dim=-1, keepdim=True)
        gate, up = _expert_linear(experts, "gate_up_proj", expert, hidden_states.float(), integer).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        if experts.down_transform is not None:
            h = experts.down_transform(h)
        out = out + (_expert_linear(experts, "down_proj", expert, h, integer) * routed).to(out.dtype)
    return out


@contextlib.contextmanager
def exporting_custom_ops(model: nn.Module, integer: bool) -> Iterator[dict[str, nn.Module]]:
    """Run the model's lowered layers as the custom op meanwhile; yields them by qualified name."""
    lowered = {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    try:
        for module in lowered.values():
            if isinstance(module, QuantizedLinear):
                forward = functools.partial(_linear_forward, module, integer_matmul(module.scheme, integer))
            else:
                forward = functools.partial(_experts_forward, module, integer_matmul(module.scheme, integer))
            module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
        yield lowered
    finally:
        for module in lowered.values():
            module.__dict__.pop("forward", None)


def weight_names(module: nn.Module) -> tuple[str, ...]:
    """The integer weight buffers of a lowered module."""
    return ("weight",) if isinstance(module, QuantizedLinear) else EXPERT_WEIGHTS


# --- ONNX translation ------------------------------------------------------------------------------


def _floats(value: float) -> ir.Value:
    return op.Constant(value_float=float(value))


def _dequantized_weight(weight: ir.Value, scale: ir.Value, offset: ir.Value, w: TensorScheme,
                        shifted: bool = False) -> ir.Value:
    """DequantizeLinear of the (in, out) codes: per-tensor, per output channel (axis 1) or blocked along the input.
    `shifted`: the codes as uint8 (+128, zero point offset + 128), for a runtime that fuses this with uint8
    activations into an integer matmul."""
    if w.granularity == "per_group":  # stored (out, in / g): (in / g, out) blocks along the input
        scale, offset = op.Transpose(scale, perm=[1, 0]), op.Transpose(offset, perm=[1, 0])
        kwargs = {"axis": 0, "block_size": w.group_size}
    else:  # stored (out, 1) or (1, 1): one scale per output column of the (in, out) codes, or a scalar
        shape = op.Constant(value_ints=[] if w.granularity == "per_tensor" else [-1])
        scale, offset, kwargs = op.Reshape(scale, shape), op.Reshape(offset, shape), {"axis": 1}
    if shifted:
        zero_point = op.Cast(op.Add(offset, _floats(UINT8_SHIFT)), to=ir.DataType.UINT8)
        return op.DequantizeLinear(_uint8_weight(weight, w), scale, zero_point, **kwargs)
    codes = _weight_codes(weight, w)
    if w.symmetric:  # a zero point of 0 is DequantizeLinear's default
        return op.DequantizeLinear(codes, scale, **kwargs)
    return op.DequantizeLinear(codes, scale, op.Cast(offset, to=_INT_TYPES[w.dtype]), **kwargs)


def _weight_codes(weight: ir.Value, w: TensorScheme) -> ir.Value:
    codes = op.Transpose(weight, perm=[1, 0])
    return op.Cast(codes, to=ir.DataType.INT4) if w.dtype == "int4" else codes


def _uint8_weight(weight: ir.Value, w: TensorScheme) -> ir.Value:
    """The (in, out) codes shifted by 128 to uint8. The file keeps the int8/int4 codes; this shift of a constant
    is folded by the runtime when it loads the model."""
    widened = op.Cast(_weight_codes(weight, w), to=ir.DataType.INT32)  # int32: Add is implemented for it everywhere
    shift = op.Constant(value=ir.tensor(UINT8_SHIFT, dtype=ir.DataType.INT32))
    return op.Cast(op.Add(widened, shift), to=ir.DataType.UINT8)


def _dynamic_codes(x: ir.Value, act: TensorScheme) -> tuple[ir.Value, ir.Value | None, ir.Value]:
    """(scale, offset or None, float codes) of a dynamic activation, as `qparams_from_range(act_range(x))` and
    `quantize` compute them: per token over the last axis, per tensor over all."""
    axes = () if act.granularity == "per_tensor" else (op.Constant(value_ints=[-1]),)
    if act.symmetric:  # max(-min(x, 0), max(x, 0)) == max|x|
        scale = op.Max(op.Div(op.ReduceMax(op.Abs(x), *axes, keepdims=1), _floats(act.qmax)), _floats(SCALE_FLOOR))
        offset = None
        shifted = op.Div(x, scale)
    else:
        low = op.Min(op.ReduceMin(x, *axes, keepdims=1), _floats(0.0))
        high = op.Max(op.ReduceMax(x, *axes, keepdims=1), _floats(0.0))
        scale = op.Max(op.Div(op.Sub(high, low), _floats(act.qmax - act.qmin)), _floats(SCALE_FLOOR))
        offset = op.Clip(op.Add(op.Round(op.Div(op.Neg(low), scale)), _floats(act.qmin)), _floats(act.qmin), _floats(act.qmax))
        shifted = op.Add(op.Div(x, scale), offset)
    return scale, offset, op.Clip(op.Round(shifted), _floats(act.qmin), _floats(act.qmax))


def _static_fake_quant(x: ir.Value, scale: ir.Value, offset: ir.Value, act: TensorScheme) -> ir.Value:
    """QuantizeLinear-DequantizeLinear with the calibrated scale; int8 codes as uint8 (zero point offset + 128), the
    operand type the runtime's fused integer matmul multiplies exactly (see `_uint8_weight`)."""
    scale = op.Reshape(scale, op.Constant(value_ints=[]))
    offset = op.Reshape(offset, op.Constant(value_ints=[]))
    if act.dtype == "int8":
        zero_point = op.Cast(op.Add(offset, _floats(UINT8_SHIFT)), to=ir.DataType.UINT8)
    else:
        zero_point = op.Cast(offset, to=_INT_TYPES[act.dtype])
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def translate_quantized_linear(x, weight, weight_scale, weight_offset, bias=None, input_scale=None, input_offset=None,
                               scheme: str = "", integer: bool = False):
    """The ONNX ops of `slimc_onnx::quantized_linear` (the layouts in the module docstring), in float32."""
    parsed = QuantScheme.model_validate_json(scheme)
    act, w = parsed.act, parsed.weight
    x32 = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
    if integer:
        scale, _, codes = _dynamic_codes(x32, act)
        shifted = op.Cast(op.Add(codes, _floats(UINT8_SHIFT)), to=ir.DataType.UINT8)
        zero_point = op.Constant(value=ir.tensor(UINT8_SHIFT, dtype=ir.DataType.UINT8))
        accumulated = op.Cast(op.MatMulInteger(shifted, _uint8_weight(weight, w), zero_point, zero_point),
                              to=ir.DataType.FLOAT)
        channel_scale = op.Reshape(weight_scale, op.Constant(value_ints=[] if w.granularity == "per_tensor" else [-1]))
        y = op.Mul(op.Mul(accumulated, scale), channel_scale)
    else:
        if act is not None and act.dynamic:
            scale, offset, codes = _dynamic_codes(x32, act)
            x32 = op.Mul(codes if offset is None else op.Sub(codes, offset), scale)
        elif act is not None:
            x32 = _static_fake_quant(x32, input_scale, input_offset, act)
        static_int8 = act is not None and not act.dynamic and act.dtype == "int8"
        y = op.MatMul(x32, _dequantized_weight(weight, weight_scale, weight_offset, w, shifted=static_int8))
    if bias is not None:
        y = op.Add(y, bias)
    return y if x.dtype == ir.DataType.FLOAT else op.Cast(y, to=x.dtype)


def translation_table() -> dict:
    """`custom_translation_table` for torch.onnx.export."""
    return {torch.ops.slimc_onnx.quantized_linear.default: translate_quantized_linear}
