"""lower: replace fake quantization with integer weights and scales."""

from __future__ import annotations

import torch
from torch import nn

from slimc.ir import Block, QuantSpec
from slimc.numerics.modules import EXPERT_WEIGHTS, FakeQuantExperts, QuantizedExperts, QuantizedLinear
from slimc.numerics.quant import expand_to_weight, quantize
from slimc.pass_base import Context, Pass, register_pass


@register_pass("lower")
class Lower(Pass):
    """Each calibrated Linear (with the quantizer node on its input) becomes a QuantizedLinear holding
    int8 codes and float32 scales; fused experts become QuantizedExperts. The lowered block must
    compute what the fake-quantized one did, which the equivalence check confirms. Backends read
    only lowered modules."""

    requires = ("calibrate",)
    preserves_function = True

    def run_block(self, block: Block, ctx: Context) -> None:
        for target, module in list(block.module.named_modules()):
            spec = ctx.program.quant_specs.get(block.qualified(target))
            if spec is None or not spec.calibrated:
                continue
            if isinstance(module, FakeQuantExperts):
                block.replace_leaf(target, lower_experts(module, spec, ctx.program.dtype))
            elif isinstance(module, nn.Linear):
                quantizer = block.input_quantizer(target)
                input_qparams = None
                if quantizer is not None and not quantizer.scheme.dynamic:
                    input_qparams = (quantizer.scale.clone(), quantizer.offset.clone())
                if quantizer is not None:
                    block.remove_input_quantizer(target)
                block.replace_leaf(target, lower_linear(module, spec, input_qparams))


def _codes(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of an already fake-quantized weight (exact: it lies on the grid)."""
    scheme = spec.scheme.weight
    return quantize(weight, expand_to_weight(scale, weight.shape, scheme), expand_to_weight(offset, weight.shape, scheme), scheme)


@torch.no_grad()
def lower_linear(linear: nn.Linear, spec: QuantSpec, input_qparams) -> QuantizedLinear:
    scale, offset = spec.weight_qparams["weight"]
    return QuantizedLinear(
        spec.scheme, _codes(linear.weight, scale, offset, spec), scale, offset, linear.bias, input_qparams, linear.weight.dtype
    )


@torch.no_grad()
def lower_experts(experts: FakeQuantExperts, spec: QuantSpec, dtype: torch.dtype) -> QuantizedExperts:
    tensors: dict[str, torch.Tensor] = {}
    for name in EXPERT_WEIGHTS:
        weight = getattr(experts, name)
        scale, offset = spec.weight_qparams[name]
        codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)  # filled per expert: no second copy to stack
        for expert in range(weight.shape[0]):
            codes[expert] = _codes(weight[expert], scale[expert], offset[expert], spec)
        tensors[name] = codes
        tensors[f"{name}_scale"], tensors[f"{name}_offset"] = scale.float(), offset.float()
        bias = getattr(experts, f"{name}_bias")
        if bias is not None:
            tensors[f"{name}_bias"] = bias.detach().float()
    act = spec.scheme.act
    if act is not None and not act.dynamic:
        for prefix, group in (("gate_up", experts.gate_up_input), ("down", experts.down_input)):
            tensors[f"{prefix}_input_scale"] = torch.cat([q.scale for q in group])
            tensors[f"{prefix}_input_offset"] = torch.cat([q.offset for q in group])
    return QuantizedExperts(spec.scheme, experts.act_fn, dtype, tensors, experts.down_transform)
