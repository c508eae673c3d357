"""norm_fusion: fold each norm's affine scale (and shift) into the layers that read it."""

from __future__ import annotations

from slimc.ir import Block
from slimc.pass_base import Context, Pass, register_pass
from slimc.patterns import find_norm_linear_groups
from slimc.patterns.fold import fold_norm


@register_pass("norm_fusion")
class NormFusion(Pass):
    """Leave every norm that feeds Linears scale-free, its weights moved into those Linears.

    Rotation needs this (a rotation commutes with a scale-free norm only), and smoothing can
    then fold its scales into the norm without compounding them. Norms read by anything that
    cannot absorb a scale are left alone.
    """

    preserves_function = True

    def run_block(self, block: Block, ctx: Context) -> None:
        for group in find_norm_linear_groups(block.graph_module):
            if not fold_norm(block, group.norm, group.consumers):
                ctx.report.note(f"norm_fusion: {block.qualified(group.norm)} has a bias its readers cannot absorb; left as is")
