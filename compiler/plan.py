"""The quantization plan: which layer gets which scheme, resolved from the config's steps before any block runs.

A layer is a Linear or a fused experts module inside the program's blocks, named by its qualified name. Every
step declares the schemes it assigns (`PassStep.scheme_for`); the first step that gives a layer one decides it.
Passes before the quantizing one read the plan to aim for it (smoothing and rotation searches), the quantizing
one to annotate the layers, and `compile --dry-run` and `slimc doctor` to show it; all resolve it here, from
names alone, so a meta-device skeleton is enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from slimc.config.steps import AssignedScheme, PassStep
from slimc.ir.leaves import is_experts_module

if TYPE_CHECKING:
    from slimc.config import SlimcConfig
    from slimc.ir import Program


def quantizable_layer_names(program: Program) -> list[str]:
    """Qualified names of the Linears and fused experts inside the program's blocks."""
    return [
        block.qualified(name)
        for block in program.blocks
        for name, module in block.module.named_modules()
        if isinstance(module, nn.Linear) or is_experts_module(module)
    ]


@dataclass(frozen=True)
class QuantPlan:
    """The scheme of every quantizable layer the steps quantize; the other layers (`float_layers`) stay float."""

    layers: tuple[str, ...]  # every quantizable layer, in the program's order
    schemes: dict[str, AssignedScheme]  # by qualified name, the layers some step quantizes

    @classmethod
    def resolve(cls, program: Program, config: SlimcConfig, steps: Sequence[PassStep]) -> QuantPlan:
        layers = tuple(quantizable_layer_names(program))
        schemes = {}
        for layer in layers:
            assigned = next((found for step in steps if (found := step.scheme_for(layer, config)) is not None), None)
            if assigned is not None:
                schemes[layer] = assigned
        return cls(layers, schemes)

    def scheme(self, layer: str) -> AssignedScheme | None:
        """The scheme planned for the layer of this qualified name; None: it stays float."""
        return self.schemes.get(layer)

    @property
    def float_layers(self) -> list[str]:
        return [layer for layer in self.layers if layer not in self.schemes]
