"""calibrate: fix static activation scales from the calibration data, then quantize the weights."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from slimc.errors import PassError
from slimc.ir import Block
from slimc.modules import EXPERT_WEIGHTS, FakeQuantExperts, FakeQuantize
from slimc.pass_base import Pass, register_pass
from slimc.pipeline import Context, relative_error
from slimc.quant import dequantize_weight, quantize_weight
from slimc.report import LayerRecord
from slimc.schemes import TensorScheme


@register_pass("calibrate")
class Calibrate(Pass):
    """Run the block on all its calibration inputs with the activation quantizers observing, fix
    their static scales, then quantize each weight (round to nearest, at the scheme's granularity,
    with its observer: minmax, percentile or mse clipping search). Each quantized layer's relative
    output error is measured on the first `error_batches` batches and reported.

    `route_all_experts` also sends every calibration token through every MoE expert (outputs
    discarded), so rarely routed experts get activation statistics of their own.
    """

    requires = ("fake_quant",)

    route_all_experts: bool = False
    error_batches: int = Field(1, ge=1)

    def run_block(self, block: Block, ctx: Context) -> None:
        layers = {
            target: module
            for target, module in block.module.named_modules()
            if block.qualified(target) in ctx.program.quant_specs and isinstance(module, nn.Linear | FakeQuantExperts)
        }
        if not layers:
            return
        quantizers = [m for m in block.graph_module.modules() if isinstance(m, FakeQuantize)]
        quantizers += [m for e in layers.values() if isinstance(e, FakeQuantExperts) for m in e.modules() if isinstance(m, FakeQuantize)]
        samples = self._observe(block, ctx, layers, quantizers)
        for target, module in layers.items():
            before = self._layer_outputs(module, samples[target], block, target, quantize_inputs=False)
            self._quantize_weights(block, ctx, target, module)
            after = self._layer_outputs(module, samples[target], block, target, quantize_inputs=True)
            spec = ctx.program.quant_specs[block.qualified(target)]
            spec.output_error = max(relative_error(a, b) for a, b in zip(after, before))
            ctx.report.layers.append(LayerRecord(block.qualified(target), spec.scheme.label, spec.output_error))

    def _observe(self, block: Block, ctx: Context, layers: dict, quantizers: list[FakeQuantize]) -> dict[str, list]:
        """Keep the layers' float inputs of the first batches, then observe static quantizers on every batch once."""
        modes = {id(q): q.mode for q in quantizers}
        for q in quantizers:
            q.mode = "off"
        samples: dict[str, list] = {target: [] for target in layers}
        hooks = [
            module.register_forward_pre_hook(lambda m, args, t=target: samples[t].append(tuple(a.detach() for a in args)))
            for target, module in layers.items()
        ]
        try:
            ctx.run(block, ctx.inputs[: self.error_batches])
        finally:
            for hook in hooks:
                hook.remove()
        static = [q for q in quantizers if not q.scheme.dynamic]
        for q in static:
            q.mode = "observe"
        if static:
            self._run_all(block, ctx, layers)
        for q in quantizers:
            q.mode = modes[id(q)]
        self._freeze(block, ctx, quantizers, layers)
        return samples

    def _run_all(self, block: Block, ctx: Context, layers: dict) -> None:
        """All calibration batches through the block, so static observers see the whole set."""
        experts = [m for m in layers.values() if isinstance(m, FakeQuantExperts)]
        for module in experts:
            module.route_all = self.route_all_experts
        try:
            ctx.run(block, ctx.inputs)
        finally:
            for module in experts:
                module.route_all = False

    @staticmethod
    def _freeze(block: Block, ctx: Context, quantizers: list[FakeQuantize], layers: dict) -> None:
        for experts in (m for m in layers.values() if isinstance(m, FakeQuantExperts)):
            for group in (experts.gate_up_input, experts.down_input):
                if group is not None and _borrow_unobserved(group):
                    ctx.report.note(f"calibrate: some experts of {block.name} saw no calibration tokens and use the "
                                    "range of all experts; set route_all_experts: true to calibrate each")
        for q in quantizers:
            if q.observer is not None and not q.observer.observed:
                raise PassError(f"calibrate: a quantizer in block {block.name} saw no data; the calibration inputs never reach it")
            q.freeze()

    @staticmethod
    @torch.no_grad()
    def _quantize_weights(block: Block, ctx: Context, target: str, module: nn.Module) -> None:
        spec = ctx.program.quant_specs[block.qualified(target)]
        if isinstance(module, FakeQuantExperts):
            for name in EXPERT_WEIGHTS:
                spec.weight_qparams[name] = quantize_experts_weight(getattr(module, name), spec.scheme.weight)
        else:
            codes, scale, offset = quantize_weight(module.weight, spec.scheme.weight)
            module.weight.copy_(dequantize_weight(codes, scale, offset, spec.scheme.weight).to(module.weight.dtype))
            spec.weight_qparams["weight"] = (scale, offset)

    @staticmethod
    @torch.no_grad()
    def _layer_outputs(module: nn.Module, samples: list, block: Block, target: str, quantize_inputs: bool) -> list[torch.Tensor]:
        """The layer's outputs on its recorded inputs, with or without its input quantization."""
        quantizers = [m for m in module.modules() if isinstance(m, FakeQuantize)]
        node_quantizer = block.input_quantizer(target)
        modes = {id(q): q.mode for q in quantizers}
        for q in quantizers:
            q.mode = "quantize" if quantize_inputs else "off"
        try:
            outputs = []
            for args in samples:
                if node_quantizer is not None and quantize_inputs:
                    args = (node_quantizer(args[0]), *args[1:])
                outputs.append(module(*args))
            return outputs
        finally:
            for q in quantizers:
                q.mode = modes[id(q)]


@torch.no_grad()
def quantize_experts_weight(weight: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a fused (E, out, in) weight per expert and per output row, in place; stacked scale/offset."""
    scales, offsets = [], []
    for expert in range(weight.shape[0]):
        codes, scale, offset = quantize_weight(weight[expert], scheme)
        weight[expert].copy_(dequantize_weight(codes, scale, offset, scheme).to(weight.dtype))
        scales.append(scale)
        offsets.append(offset)
    return torch.stack(scales), torch.stack(offsets)


def _borrow_unobserved(group: nn.ModuleList) -> bool:
    """Give quantizers that saw no data the union range of their observed siblings; True if any did."""
    observed = [q.observer for q in group if q.observer is not None and q.observer.observed]
    missing = [q for q in group if q.observer is not None and not q.observer.observed]
    if not missing or not observed:
        return False
    low = torch.stack([o.min_val for o in observed]).min()
    high = torch.stack([o.max_val for o in observed]).max()
    for q in missing:
        q.observer.update(torch.stack([low, high]))
    return True
