"""Modules the passes put into block graphs: activation quantizers and lowered (integer) layers.

Backends read the lowered modules' buffers; nothing here knows about file formats.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slimc.ir.leaves import register_leaf
from slimc.numerics.hadamard import OnlineHadamard
from slimc.numerics.int_mm import integer_matmul_available
from slimc.numerics.observers import ChannelObserver, Observer
from slimc.numerics.quant import (
    LastQuantized,
    activation_codes,
    dequantize_weight,
    dynamic_fake_quantize,
    fake_quantize,
    fp8_fake_quantize,
    fp8_scale,
    integer_linear,
    integer_products,
)
from slimc.schemes import KVCacheScheme, QuantScheme, TensorScheme


@register_leaf("quantizer")
class FakeQuantize(nn.Module):
    """Quantize-dequantize of an activation: a node in the block graph.

    Modes: ``observe`` (collect statistics, pass through), ``quantize`` (apply), ``off``.
    Dynamic schemes need no calibration and start in ``quantize``.
    """

    shared: LastQuantized | None = None  # set within `reusing_within_runs` (class defaults: journals pickle modules)

    def __init__(self, scheme: TensorScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.mode = "quantize" if scheme.dynamic else "observe"
        self.observer: Observer | None = None if scheme.dynamic else Observer(scheme)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("offset", torch.zeros(1))

    def freeze(self) -> None:
        """End observation: fix the static scale and offset and start quantizing."""
        if self.observer is not None:
            scale, offset = self.observer.qparams()
            self.scale.copy_(scale)
            self.offset.copy_(offset)
            self.observer = None
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.update(x)
            return x
        if self.mode == "off":
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as mode ``quantize`` gives it, whatever the mode (a static scale as `freeze` fixed it)."""
        if self.scheme.dynamic:
            return (self.shared or dynamic_fake_quantize)(x, self.scheme)
        return fake_quantize(x, self.scale, self.offset, self.scheme)

    def extra_repr(self) -> str:
        s = self.scheme
        return f"{s.dtype}, {s.granularity}, {'sym' if s.symmetric else 'asym'}, {'dynamic' if s.dynamic else 'static'}, mode={self.mode}"


class KVCacheQuantize(FakeQuantize):
    """Quantize-dequantize of the keys or values entering an attention kernel, (batch, kv_heads, tokens, head_dim),
    static, as a runtime with a quantized KV cache stores them: int8 per channel (Ascend C8) or fp8 e4m3 per tensor
    (vLLM). A node in the block graph, which stays there when the block is lowered. `which` is "key" or "value";
    `projection` is the block's Linear whose output it quantizes (k_proj or v_proj, found from the graph), under
    whose checkpoint name the scales are written.

    Buffers after calibration: ``scale``, ``offset`` float32 (kv_heads, head_dim) for int8, (1, 1) for fp8."""

    def __init__(self, kv_scheme: KVCacheScheme, heads: int, head_dim: int, which: str, projection: str) -> None:
        super().__init__(kv_scheme.tensor)
        self.kv_scheme = kv_scheme
        self.which, self.projection = which, projection
        self.observer = ChannelObserver(self.scheme, heads, head_dim)
        shape = (heads, head_dim) if kv_scheme.dtype == "int8" else (1, 1)
        self.scale = torch.ones(shape)
        self.offset = torch.zeros(shape)

    def freeze(self) -> None:
        if self.observer is not None and self.kv_scheme.dtype == "fp8_e4m3":
            amax = torch.maximum(-self.observer.min_val.min(), self.observer.max_val.max()).clamp(min=0)
            self.scale.copy_(fp8_scale(amax).reshape(1, 1))
            self.observer = None
        super().freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            return super().forward(x)
        scale = self.scale[:, None, :]
        if self.kv_scheme.dtype == "fp8_e4m3":
            return fp8_fake_quantize(x, scale)
        return fake_quantize(x, scale, self.offset[:, None, :], self.scheme)

    def extra_repr(self) -> str:
        kv = self.kv_scheme
        return f"{kv.dtype}, {kv.granularity}, {'sym' if kv.symmetric else 'asym'}, mode={self.mode}, {self.which} of {self.projection}"


class QKHadamard(OnlineHadamard):
    """The online Hadamard on an attention kernel's queries and keys, after RoPE: (batch, heads, tokens, head_dim),
    every head by H / √head_dim. q·kᵀ is unchanged (Hᵀ H = I); the keys the cache stores have flatter channels, so
    their int8 per-channel scales fit better. One module, two graph nodes (query and key). `key_projection` is the
    block's k_proj, by whose checkpoint name the attention is written."""

    def __init__(self, head_dim: int, key_projection: str) -> None:
        super().__init__(head_dim)
        self.key_projection = key_projection

    def extra_repr(self) -> str:
        return f"head_dim={self.order}, {self.kind}, queries and keys of {self.key_projection}"


@register_leaf("linear")
class QuantizedLinear(nn.Module):
    """A Linear lowered to integer weights and scales; computes what the quantized runtime computes: on a CPU
    whose int8 matmul is exact (`integer_matmul_available`), where `integer_products` allows, the integer matmul
    of activation and weight codes, scaled after (several times faster than a float32 matmul, and exact where the
    float one rounds every partial sum); otherwise the dequantized activation times the dequantized weight in
    float32.

    Buffers: ``weight`` int8 codes (out, in) (int4 codes are stored unpacked in int8);
    ``weight_scale``/``weight_offset`` float32 (out, 1) or (out, in / group); ``bias`` float32 or
    absent; static activations add ``input_scale``/``input_offset`` float32 (1,).
    """

    # set within `reusing_within_runs` and `float_matmuls` (class defaults: journals pickle modules)
    shared: LastQuantized | None = None
    shared_codes: LastQuantized | None = None
    integer_matmul = True

    def __init__(
        self,
        scheme: QuantScheme,
        weight_codes: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_offset: torch.Tensor,
        bias: torch.Tensor | None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = weight_codes.shape
        self.dtype = dtype
        self.register_buffer("weight", weight_codes.to(torch.int8))
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("weight_offset", weight_offset.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        if input_qparams is not None:
            self.register_buffer("input_scale", input_qparams[0].float().reshape(1))
            self.register_buffer("input_offset", input_qparams[1].float().reshape(1))
        else:
            self.input_scale = self.input_offset = None

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, self.weight_offset, self.scheme.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.scheme.act
        if sums_integers(self, x, self.in_features):
            if act.dynamic:
                codes, scale, offset = (self.shared_codes or activation_codes)(x, act)
            else:
                codes, scale, offset = activation_codes(x, act, self.input_scale, self.input_offset)
            out = integer_linear(codes, scale, offset, act.symmetric, self.weight, self.weight_scale, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if act is None:
            x32 = x.float()
        elif act.dynamic:
            x32 = (self.shared or dynamic_fake_quantize_float32)(x, act)
        else:
            x32 = fake_quantize(x.float(), self.input_scale, self.input_offset, act)
        return F.linear(x32, self.dequantized_weight(), self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.label}"


def sums_integers(layer: QuantizedLinear | QuantizedExperts, x: torch.Tensor, in_features: int) -> bool:
    """Whether a lowered layer computes its products of `x` as an integer matmul: not within `float_matmuls`, on a
    device whose int8 matmul is exact, where its scheme allows (`integer_products`)."""
    scheme = layer.scheme
    return layer.integer_matmul and integer_matmul_available(x.device) and integer_products(scheme.act, scheme.weight, in_features)


def dynamic_fake_quantize_float32(x: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    """A lowered layer's dynamic activation quantization: of x in float32, in float32."""
    return dynamic_fake_quantize(x.float(), scheme)


@contextlib.contextmanager
def reusing_within_runs(module: nn.Module) -> Iterator[None]:
    """While `module` (a block) runs on batch after batch: its dynamic quantizers and lowered Linears that read one
    tensor with one scheme (q, k and v) quantize it once per call, and compute the same values. Lowered weights are
    still dequantized per call where the float path runs: holding a block's in float32 would add four bytes per
    weight to the peak."""
    quantizers = [m for m in module.modules() if type(m) is FakeQuantize]
    linears = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    quantized, quantized_float32 = LastQuantized(dynamic_fake_quantize), LastQuantized(dynamic_fake_quantize_float32)
    codes = LastQuantized(activation_codes)
    try:
        for quantizer in quantizers:
            quantizer.shared = quantized
        for linear in linears:
            linear.shared, linear.shared_codes = quantized_float32, codes
        yield
    finally:
        for layer in quantizers:
            layer.shared = None
        for linear in linears:
            linear.shared = linear.shared_codes = None


@contextlib.contextmanager
def float_matmuls(module: nn.Module) -> Iterator[None]:
    """Within: `module`'s lowered layers multiply their dequantized activations and weights in float32, as the
    fake-quantized layers they replace do, instead of summing integer products. The two differ by float32
    rounding per layer, and a code a layer later can round the other way on it, which says nothing about whether
    the lowering kept the codes and scales: the equivalence check compares the two this way."""
    lowered = [m for m in module.modules() if isinstance(m, QuantizedLinear | QuantizedExperts)]
    before = [layer.integer_matmul for layer in lowered]
    try:
        for layer in lowered:
            layer.integer_matmul = False
        yield
    finally:
        for layer, integer in zip(lowered, before, strict=True):
            layer.integer_matmul = integer


class ChannelScale(nn.Module):
    """``x · mul_scale`` per channel, computed in float32: the explicit multiply that smoothing puts before
    a Linear whose input no layer can absorb a scale into (msModelSlim's non-fusion smoothing; Ascend
    checkpoints store it as ``<linear>.div.mul_scale``). Buffer ``mul_scale`` float32 (in_features,)."""

    def __init__(self, mul_scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mul_scale", mul_scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.mul_scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.mul_scale.numel()}"


EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # the fused weights of transformers' *Experts modules


def routed_tokens(top_k_index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each expert that tokens are routed to, in increasing order, with those tokens' indices and routing slots."""
    for expert in torch.unique(top_k_index).tolist():
        if 0 <= expert < num_experts:
            token_idx, slot = torch.where(top_k_index == expert)
            yield expert, token_idx, slot


def combine_experts(expert_forward, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Run each routed expert on its tokens and sum the outputs weighted by the router."""
    out = torch.zeros_like(hidden_states)
    for expert, token_idx, slot in routed_tokens(top_k_index, num_experts):
        y = expert_forward(expert, hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


@register_leaf("experts")
class FakeQuantExperts(nn.Module):
    """A fused MoE experts module with a quantizer on each expert's inputs.

    Keeps the `(hidden_states, top_k_index, top_k_weights)` interface of transformers' `*Experts`
    modules and their fused weights: ``gate_up_proj`` (E, 2I, H), rows [0, I) gate and [I, 2I) up,
    and ``down_proj`` (E, H, I). Routed tokens are only known inside this module, so activation
    statistics are collected here, per expert. With ``route_all`` set during calibration, every
    token also passes through every expert (its output is discarded) so that rarely routed
    experts still get statistics. ``scheme`` None keeps the experts float (the rotate pass wraps
    them this way to put ``down_transform``, an online rotation, before each expert's down
    projection; fake_quant then wraps the wrapper and keeps the transform).
    """

    def __init__(self, experts: nn.Module, scheme: QuantScheme | None) -> None:
        super().__init__()
        if getattr(experts, "is_transposed", False) or not getattr(experts, "has_gate", True):
            raise NotImplementedError(f"{type(experts).__name__}: transposed or gate-less expert weights are not supported yet")
        self.scheme = scheme
        self.down_transform = getattr(experts, "down_transform", None)
        self.num_experts = experts.gate_up_proj.shape[0]
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.gate_up_proj_bias = getattr(experts, "gate_up_proj_bias", None)
        self.down_proj_bias = getattr(experts, "down_proj_bias", None)
        self.act_fn = experts.act_fn
        self.route_all = False
        self.capture = None  # callable(expert, weight name, input) while a weight algorithm collects statistics
        act = scheme.act if scheme is not None else None
        self.gate_up_input = nn.ModuleList(FakeQuantize(act) for _ in range(self.num_experts)) if act else None
        self.down_input = nn.ModuleList(FakeQuantize(act) for _ in range(self.num_experts)) if act else None

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_input is not None:
            x = self.gate_up_input[expert](x)
        if self.capture is not None:
            self.capture(expert, "gate_up_proj", x)
        gate_up = F.linear(x, self.gate_up_proj[expert], None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[expert])
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        if self.down_transform is not None:
            h = self.down_transform(h)
        if self.down_input is not None:
            h = self.down_input[expert](h)
        if self.capture is not None:
            self.capture(expert, "down_proj", h)
        return F.linear(h, self.down_proj[expert], None if self.down_proj_bias is None else self.down_proj_bias[expert])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.route_all:
            capture, self.capture = self.capture, None  # weight statistics come from routed tokens only
            try:
                for expert in range(self.num_experts):
                    self.expert_forward(expert, hidden_states)
            finally:
                self.capture = capture
        return combine_experts(self.expert_forward, hidden_states, top_k_index, top_k_weights, self.num_experts)


@register_leaf("experts")
class QuantizedExperts(nn.Module):
    """Fused MoE experts lowered to integer weights: per expert, per output row scales.

    Buffers: ``gate_up_proj`` int8 (E, 2I, H), ``down_proj`` int8 (E, H, I), each with
    ``*_scale``/``*_offset`` float32 (E, rows, 1) or (E, rows, in / group); static activations add
    ``gate_up_input_scale``/``_offset`` and ``down_input_scale``/``_offset`` float32 (E,).
    Each expert's projections are computed as QuantizedLinear computes a layer.
    """

    integer_matmul = True  # False within `float_matmuls`

    def __init__(self, scheme: QuantScheme, act_fn: nn.Module, dtype: torch.dtype, tensors: dict[str, torch.Tensor],
                 down_transform: nn.Module | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        self.act_fn = act_fn
        self.down_transform = down_transform
        self.dtype = dtype
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.num_experts = self.gate_up_proj.shape[0]

    def _project(self, x: torch.Tensor, which: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s projection `which` (gate_up_proj / down_proj) of its tokens x, float32."""
        act, stem = self.scheme.act, which.removesuffix("_proj")
        codes = getattr(self, which)[expert]
        bias = getattr(self, f"{which}_bias", None)
        bias = None if bias is None else bias[expert]
        input_scale = input_offset = None
        if act is not None and not act.dynamic:
            input_scale = getattr(self, f"{stem}_input_scale")[expert]
            input_offset = getattr(self, f"{stem}_input_offset")[expert]
        weight_scale = getattr(self, f"{which}_scale")[expert]
        if sums_integers(self, x, codes.shape[1]):
            x_codes, scale, offset = activation_codes(x, act, input_scale, input_offset)
            out = integer_linear(x_codes, scale, offset, act.symmetric, codes, weight_scale, bias)
            return out.reshape(*x.shape[:-1], codes.shape[0])
        x32 = x.float()
        if act is not None:
            x32 = dynamic_fake_quantize(x32, act) if act.dynamic else fake_quantize(x32, input_scale, input_offset, act)
        weight = dequantize_weight(codes, weight_scale, getattr(self, f"{which}_offset")[expert], self.scheme.weight)
        return F.linear(x32, weight, bias)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._project(x, "gate_up_proj", expert).chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        if self.down_transform is not None:
            h = self.down_transform(h)
        return self._project(h, "down_proj", expert)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return combine_experts(self.expert_forward, hidden_states, top_k_index, top_k_weights, self.num_experts)
