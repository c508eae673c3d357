"""The frontend contract: what every model family's frontend provides (see slimc.frontends)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimc.config import CalibrationConfig
    from slimc.ir import Program
    from slimc.ir.source import ModelSource
    from slimc.report import RunReport

# The built-in text datasets (slimc.frontends.data reads them); here, so the contract needs no data imports.
BUILTIN_SPECS = ("builtin:text", "builtin:text-eval", "builtin:mix", "builtin:eval", "builtin:validation")


class Frontend:
    """Base class: `architectures` lists the transformers/diffusers class names the frontend cuts.

    A frontend loads a model, cuts it into a Program of stages and blocks, and turns the
    calibration dataset into batches of the model's forward arguments (`Program.call` runs one).
    """

    name: ClassVar[str] = ""
    streams: ClassVar[bool] = True  # `load` takes a device map offloading the blocks (slimc.ir.streaming)
    architectures: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    extra: ClassVar[str | None] = None  # the slimc extra installing the libraries the family needs (`slimc[diffusion]`)
    # `slimc eval`: the held-out dataset (never the calibration data) that `calibration_batches` turns into
    # evaluation batches unless the user names another, and what is measured on it: "perplexity" (decoder
    # LLMs) or "fidelity" (the quantized model's block and model outputs against the float model's).
    evaluation_dataset: ClassVar[str] = "builtin:text-eval"
    evaluation_metric: ClassVar[str] = "fidelity"
    # The family's own calibration data: what its shipped configs use, and what `slimc trace` traces with.
    calibration_dataset: ClassVar[str] = "builtin:text"
    # Calibration settings for `slimc trace`: the smallest batches that still reach every stage.
    trace_calibration: ClassVar[dict] = {"seq_len": 32}
    # Every built-in dataset the family reads; another family's is refused before the model loads.
    builtin_datasets: ClassVar[tuple[str, ...]] = BUILTIN_SPECS

    def load(self, source: ModelSource, *, dtype: torch.dtype, device: str | dict[str, str] = "cpu",
             trust_remote_code: bool = False, offload_folder: Path | None = None) -> nn.Module:
        """The model, loaded on `device`: a device, or a device map that may offload modules to disk (into
        `offload_folder`, see slimc.ir.streaming) where the frontend `streams`."""
        from slimc.ir.source import load_model

        return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                          **({"offload_folder": str(offload_folder)} if offload_folder is not None else {}))

    def skeleton(self, source: ModelSource, dtype: torch.dtype) -> nn.Module:
        """The model `load` gives, on the meta device: every module, shape and dtype, and no weight read."""
        import torch

        from slimc.ir.source import model_from_config

        with torch.device("meta"):
            return model_from_config(source, dtype=dtype)

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        raise NotImplementedError

    def calibration_batches(self, calibration: CalibrationConfig, source: ModelSource, program: Program,
                            report: RunReport | None = None) -> list[dict]:
        """The calibration dataset as batches of forward arguments for `program.call`."""
        raise NotImplementedError
