"""Frontends: recognise a model family, and cut a loaded model into a Program of blocks.

A frontend knows how to load and cut a family, and nothing about quantization. One module per
family group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from slimc.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimc.frontends.hf import ModelSource
    from slimc.ir import Program
    from slimc.pipeline import BlockInput


class Frontend:
    """Base class: `architectures` lists the transformers/diffusers class names the frontend cuts."""

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        raise NotImplementedError

    def first_block_inputs(self, program: Program, batches: list[torch.Tensor]) -> list[BlockInput]:
        """The first block's (args, kwargs) for each calibration batch."""
        raise NotImplementedError


def all_frontends() -> list[Frontend]:
    from slimc.frontends.llm import DecoderLLM

    return [DecoderLLM()]


def supported_architectures() -> list[str]:
    return sorted(a for f in all_frontends() for a in f.architectures)


def frontend_for(source: ModelSource, family: str = "auto") -> Frontend:
    """The frontend for a model: by the config's `family`, or from its architecture."""
    frontends = all_frontends()
    if family != "auto":
        chosen = next((f for f in frontends if f.name == family), None)
        if chosen is None:
            raise UnsupportedModelError(
                f"model.family {family!r} is unknown; families: auto, {', '.join(f.name for f in frontends)}"
            )
        if source.architecture not in chosen.architectures:
            raise UnsupportedModelError(
                f"model.family {family!r} does not cover {source.architecture}; it covers {', '.join(chosen.architectures)}"
            )
        return chosen
    for frontend in frontends:
        if source.architecture in frontend.architectures:
            return frontend
    raise UnsupportedModelError(
        f"{source.architecture} is not a supported model architecture. Supported: {', '.join(supported_architectures())}"
    )
