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

    from slimc.config import CalibrationConfig
    from slimc.frontends.hf import ModelSource
    from slimc.ir import Program
    from slimc.report import RunReport


class Frontend:
    """Base class: `architectures` lists the transformers/diffusers class names the frontend cuts.

    A frontend loads a model, cuts it into a Program of stages and blocks, and turns the
    calibration dataset into batches of the model's forward arguments (`Program.call` runs one).
    """

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # `slimc eval`: the held-out dataset (never the calibration data) that `calibration_batches` turns into
    # evaluation batches unless the user names another, and what is measured on it: "perplexity" (decoder
    # LLMs) or "fidelity" (the quantized model's block and model outputs against the float model's).
    evaluation_dataset: ClassVar[str] = "builtin:text-eval"
    evaluation_metric: ClassVar[str] = "fidelity"
    # The family's own calibration data: what its shipped configs use, and what `slimc trace` traces with.
    calibration_dataset: ClassVar[str] = "builtin:text"
    # Calibration settings for `slimc trace`: the smallest batches that still reach every stage.
    trace_calibration: ClassVar[dict] = {"seq_len": 32}

    def load(self, source: ModelSource, *, dtype: torch.dtype, device: str = "cpu", trust_remote_code: bool = False) -> nn.Module:
        from slimc.frontends.hf import load_model

        return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        raise NotImplementedError

    def calibration_batches(self, calibration: CalibrationConfig, source: ModelSource, program: Program,
                            report: RunReport | None = None) -> list[dict]:
        """The calibration dataset as batches of forward arguments for `program.call`."""
        raise NotImplementedError


def all_frontends() -> list[Frontend]:
    from slimc.frontends.diffusion import DiffusionTransformer
    from slimc.frontends.llm import DecoderLLM
    from slimc.frontends.multimodal import MultimodalLLM
    from slimc.frontends.omni import OmniThinker

    return [DecoderLLM(), DiffusionTransformer(), MultimodalLLM(), OmniThinker()]


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
