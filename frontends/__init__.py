"""Frontends: recognise a model family, and cut a loaded model into a Program of blocks.

A frontend knows how to load and cut a family, and nothing about quantization. One module per
family group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimc.environment import require_extra
from slimc.errors import ConfigError, UnsupportedModelError
from slimc.frontends.base import Frontend

__all__ = ["Frontend", "all_frontends", "check_builtin_dataset", "frontend_for", "shipped_config_folders", "supported_architectures"]

if TYPE_CHECKING:
    from slimc.ir.source import ModelSource


def all_frontends() -> list[Frontend]:
    from slimc.frontends.diffusion import DiffusionTransformer
    from slimc.frontends.llm import DecoderLLM
    from slimc.frontends.multimodal import MultimodalLLM
    from slimc.frontends.omni import OmniThinker

    return [DecoderLLM(), DiffusionTransformer(), MultimodalLLM(), OmniThinker()]


def supported_architectures() -> list[str]:
    return sorted(a for f in all_frontends() for a in f.architectures)


def frontend_for(source: ModelSource, family: str = "auto") -> Frontend:
    """The frontend for a model: by the config's `family`, or from its architecture; its extra installed."""
    frontend = _choose_frontend(source, family)
    if frontend.extra is not None:
        require_extra(frontend.extra, f"{source.architecture} ({frontend.description})")
    return frontend


def _choose_frontend(source: ModelSource, family: str) -> Frontend:
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
