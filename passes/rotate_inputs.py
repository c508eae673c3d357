"""rotate_inputs: an online Hadamard rotation in front of Linears that no offline rotation reaches.

In DiT blocks the residual stream cannot be rotated offline (QuaRot R1): AdaLN modulation
`norm(x)·(1 + scale) + shift` and per-channel gates sit between the stream and the Linears, and
neither commutes with a rotation. What stays possible is rotating each Linear's input at run
time: x → x·H (a fast Walsh–Hadamard transform), with W → W·H fused into the weight, so
y = (x·H)(W·H)ᵀ = x·Wᵀ. Activation outliers are spread over all channels before they are
quantized, which is what 4-bit activations need. Linears that read the same tensor share one
rotation node (q, k and v compute it once).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import fx

from slimc.config import SlimcConfig
from slimc.errors import ConfigError
from slimc.hadamard import OnlineHadamard, describe_hadamard
from slimc.ir import Block, Program
from slimc.pass_base import Pass, register_pass
from slimc.passes.rotate import rotate_inputs as fuse_input_rotation
from slimc.patterns import find_linears
from slimc.pipeline import Context

QUANTIZING_PASSES = {"fake_quant", "calibrate", "lower"}


@register_pass("rotate_inputs")
class RotateInputs(Pass):
    """Online Hadamard rotation of the inputs of the Linears that `include` selects and `exclude`
    does not (globs over qualified names), fused into their weights. Comes after `smooth` (which
    then works on unrotated activations) and before `fake_quant`."""

    preserves_function = True

    include: list[str] = ["*"]
    exclude: list[str] = []

    def check(self, config: SlimcConfig, step_index: int) -> None:
        earlier = [str(step.get("pass")) for step in config.pipeline[:step_index]]
        misplaced = [name for name in earlier if name in QUANTIZING_PASSES]
        if misplaced:
            raise ConfigError(f"{config.where('pipeline', step_index)}: pipeline.{step_index}: rotate_inputs must come before "
                              f"{', '.join(misplaced)}: the rotation changes the activations they quantize")

    def selects(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(fnmatchcase(name, p) for p in self.exclude)

    def run_block(self, block: Block, ctx: Context) -> None:
        gm = block.graph_module
        linears = set(find_linears(gm))
        readers: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in linears and self.selects(block.qualified(node.target)):
                readers.setdefault(node.args[0], []).append(node)
        for source, group in readers.items():
            weights = [gm.get_submodule(linear.target).weight for linear in group]
            transform = OnlineHadamard(weights[0].shape[-1]).to(weights[0].device)
            for weight in weights:
                fuse_input_rotation(weight, transform.matrix())
            target = block.rotation_target(group[0].target)
            gm.add_submodule(target, transform)
            with gm.graph.inserting_after(source):
                rotated = gm.graph.call_module(target, (source,))
            for linear in group:
                linear.replace_input_with(source, rotated)
            description = describe_hadamard(transform.order)
            ctx.program.metadata.setdefault("rotations", {}).setdefault("online", {}).update(
                {block.qualified(linear.target): description for linear in group})
        gm.recompile()

    def finish(self, program: Program, ctx: Context) -> None:
        online = program.metadata.get("rotations", {}).get("online", {})
        if online:
            sizes = sorted({description for description in online.values()})
            ctx.report.note(f"rotate_inputs: online Hadamard before {len(online)} Linears ({'; '.join(sizes)})")
