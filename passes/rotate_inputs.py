"""rotate_inputs: an online Hadamard rotation in front of Linears that no offline rotation reaches.

In DiT blocks the residual stream cannot be rotated offline (QuaRot R1): AdaLN modulation
`norm(x)·(1 + scale) + shift` and per-channel gates sit between the stream and the Linears, and
neither commutes with a rotation. What stays possible is rotating each Linear's input at run
time: x → x·H (a fast Walsh–Hadamard transform), with W → W·H fused into the weight, so
y = (x·H)(W·H)ᵀ = x·Wᵀ. Activation outliers are spread over all channels before they are
quantized, which is what 4-bit activations need. Linears that read the same tensor share one
rotation node (q, k and v compute it once).

A rotation does not help every input. One whose channels share a large mean (a GELU's output, read by
the MLP's down projection: nearly all positive) is turned into one huge channel, the mean times √n in
the Hadamard's all-ones row, which then sets every token's int4 scale. With `search: true` each reader
group is rotated only where that lowers the quantized block error on calibration inputs.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from pydantic import Field, PrivateAttr
from torch import fx

from slimc.ir import Block, Program
from slimc.numerics.calib import simulated_quantization
from slimc.numerics.fidelity import relative_error
from slimc.numerics.hadamard import OnlineHadamard, describe_hadamard
from slimc.pass_base import Context, Pass, register_pass
from slimc.passes.rotate import rotate_inputs as fuse_input_rotation
from slimc.patterns import find_linears
from slimc.schemes import QuantScheme


@register_pass("rotate_inputs")
class RotateInputs(Pass):
    """Online Hadamard rotation of the inputs of the Linears that `include` selects and `exclude`
    does not (globs over qualified names), fused into their weights. Comes after `smooth` (which
    then works on unrotated activations) and before `fake_quant`. With `search`, a group of Linears
    reading one tensor keeps its rotation only where quantizing them as planned gives a lower block
    error (on `search_batches` calibration batches) rotated than not."""

    preserves_function = True
    runs_before = ("fake_quant", "calibrate", "lower")
    runs_before_reason = "the rotation changes the activations they quantize"

    include: list[str] = ["*"]
    exclude: list[str] = []
    search: bool = False
    search_batches: int = Field(1, ge=1)
    _kept: dict[str, bool] = PrivateAttr(default_factory=dict)

    def selects(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(fnmatchcase(name, p) for p in self.exclude)

    def run_block(self, block: Block, ctx: Context) -> None:
        gm = block.graph_module
        linears = set(find_linears(gm))
        readers: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in linears and self.selects(block.qualified(node.target)):
                readers.setdefault(node.args[0], []).append(node)
        reference = ctx.run(block, ctx.leading(self.search_batches)) if self.search else None
        for source, group in readers.items():
            planned = self._planned(block, ctx, group) if self.search else {}
            before = self._quantized_error(block, ctx, planned, reference) if planned else None
            saved = [gm.get_submodule(linear.target).weight.detach().clone() for linear in group] if planned else []
            rotated = self._rotate(block, source, group)
            if planned:
                keep = self._quantized_error(block, ctx, planned, reference) < before
                self._kept[block.qualified(group[0].target)] = keep
                if not keep:
                    self._unrotate(block, rotated, source, group, saved)
                    continue
            description = describe_hadamard(gm.get_submodule(rotated.target).order)
            ctx.program.rotations.online.update({block.qualified(linear.target): description for linear in group})

    @staticmethod
    def _rotate(block: Block, source: fx.Node, group: list[fx.Node]) -> fx.Node:
        """x -> x·H before the Linears of `group` (all reading `source`), H fused into their weights."""
        gm = block.graph_module
        weights = [gm.get_submodule(linear.target).weight for linear in group]
        transform = OnlineHadamard(weights[0].shape[-1]).to(weights[0].device)
        for weight in weights:
            fuse_input_rotation(weight, transform.rotation())
        target = block.rotation_target(group[0].target)
        gm.add_submodule(target, transform)
        with gm.graph.inserting_after(source):
            rotated = gm.graph.call_module(target, (source,))
        for linear in group:
            linear.replace_input_with(source, rotated)
        gm.recompile()
        return rotated

    @staticmethod
    def _unrotate(block: Block, rotated: fx.Node, source: fx.Node, group: list[fx.Node], weights: list[torch.Tensor]) -> None:
        gm = block.graph_module
        with torch.no_grad():
            for linear, weight in zip(group, weights):
                gm.get_submodule(linear.target).weight.copy_(weight)
        for linear in group:
            linear.replace_input_with(rotated, source)
        gm.graph.erase_node(rotated)
        gm.delete_submodule(rotated.target)
        gm.recompile()

    @staticmethod
    def _planned(block: Block, ctx: Context, group: list[fx.Node]) -> dict[str, QuantScheme]:
        """The schemes the plan gives the group's Linears (only those with quantized activations)."""
        planned = {}
        for linear in group:
            found = ctx.plan.scheme(block.qualified(linear.target))
            if found is not None and found.scheme.act is not None:
                planned[linear.target] = found.scheme
        return planned

    def _quantized_error(self, block: Block, ctx: Context, planned: dict[str, QuantScheme], reference: list) -> float:
        with simulated_quantization(block, planned):
            outputs = ctx.run(block, ctx.leading(self.search_batches))
        return ctx.world.worst([relative_error(o, r) for o, r in zip(outputs, reference)])

    def finish(self, program: Program, ctx: Context) -> None:
        online = program.rotations.online
        if online:
            sizes = sorted({description for description in online.values()})
            ctx.report.note(f"rotate_inputs: online Hadamard before {len(online)} Linears ({'; '.join(sizes)})")
        if self._kept:
            left = [name for name, kept in self._kept.items() if not kept]
            ctx.report.note(f"rotate_inputs: searched {len(self._kept)} groups: {len(left)} better left unrotated "
                            "(each group's choice is in the report's details)")
            ctx.report.details["rotate_inputs_kept"] = dict(self._kept)
