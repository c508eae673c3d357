"""Frontends: recognise a model family, and cut a loaded model into a Program of blocks.

A frontend knows how to load and cut a family, and nothing about quantization. One module per
family group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from slimc.errors import ConfigError, UnsupportedModelError

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
    # Every built-in dataset the family reads; another family's is refused before the model loads.
    builtin_datasets: ClassVar[tuple[str, ...]] = ("builtin:text", "builtin:text-eval")

    def load(self, source: ModelSource, *, dtype: torch.dtype, device: str = "cpu", trust_remote_code: bool = False) -> nn.Module:
        from slimc.frontends.hf import load_model

        return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    def skeleton(self, source: ModelSource, dtype: torch.dtype) -> nn.Module:
        """The model `load` gives, on the meta device: every module, shape and dtype, and no weight read."""
        import torch

        from slimc.frontends.hf import model_from_config

        with torch.device("meta"):
            return model_from_config(source, dtype=dtype)

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


def check_builtin_dataset(frontend: Frontend, spec: str, architecture: str, key: str = "calibration.dataset",
                          where: str = "") -> None:
    """Refuse another family's built-in dataset (a diffusion config's prompts for an LLM, ...), naming that
    family and the shipped configs made for this one; names no family knows are left to the data readers.
    `where` (file:line) leads the message."""
    if not spec.startswith("builtin:") or spec in frontend.builtin_datasets:
        return
    owners = [f for f in all_frontends() if spec in f.builtin_datasets]
    if not owners:
        return
    owner = next((f for f in owners if spec in (f.calibration_dataset, f.evaluation_dataset)), owners[0])
    raise ConfigError(
        f"{f'{where}: ' if where else ''}{key} {spec!r} is data for another model family: {owner.name} "
        f"({owner.description}); {architecture} is in the {frontend.name} family, which reads "
        f"{', '.join(frontend.builtin_datasets)} or a data file. Use a config made for it (shipped: "
        f"{', '.join(shipped_config_folders(frontend))}; `slimc configs` lists them) or set {key}"
    )


def shipped_config_folders(frontend: Frontend) -> list[str]:
    """The folders of the shipped configs that calibrate on the frontend's own dataset (`llm/`, `flux/`, ...)."""
    import yaml

    from slimc.configs import shipped_configs

    folders: list[str] = []
    for name, path in shipped_configs().items():
        calibration = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("calibration") or {}
        folder = f"{name.partition('/')[0]}/"
        if calibration.get("dataset") == frontend.calibration_dataset and folder not in folders:
            folders.append(folder)
    return folders
