"""Diffusion transformers (diffusers): FLUX.1, HunyuanVideo, Wan 2.1 / 2.2.

A transformer is its embedders (patch, timestep, text, guidance), the lists of repeated blocks its
forward runs, and its output norm and projection. The blocks are found structurally: every
`nn.ModuleList` whose items are all of one class holding Linears, outermost lists only, in the order
the model registers them (which is the order its forward runs them: HunyuanVideo's token refiner,
then dual, then single blocks; Flux double, then single blocks; Wan blocks). Each list is one stage.
Lists nested inside an embedder (HunyuanVideo's token refiner in `context_embedder`) prepare the text
conditioning and get role "text"; the others are the DiT's own ("dit").

From a pipeline directory the frontend quantizes the pipeline's transformer, or both of Wan2.2 A14B's
experts (`transformer` for high-noise steps, `transformer_2` for low-noise ones): they are held by one
`PipelineTransformers` container, so one Program has both experts' stages, `program.call` routes each
recorded call to the expert that ran it, and each expert is exported on its own (`program.parts`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc.config import CalibrationConfig
from slimc.errors import ModelLoadError
from slimc.frontends.base import Frontend
from slimc.frontends.diffusion_data import (
    PROMPT_SPECS,
    calibration_calls,
    cast_floats,
    compute_dtype,
    summary,
)
from slimc.ir import Block, Program, Stage
from slimc.ir.source import ModelSource, auto_class, config_source, load_checked
from slimc.report import RunReport

EXPERT_KEY = "_expert"  # in a batch of a two-expert Program: the component (transformer, transformer_2) to run


class PipelineTransformers(nn.Module):
    """A pipeline's transformers as submodules named like its components (`transformer`, `transformer_2`)."""

    def __init__(self, transformers: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in transformers.items():
            self.add_module(name, module)


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The lists of repeated blocks: ModuleLists of one class whose items hold Linears, outermost only,
    in registration order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(m) for m in module}) != 1:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found) or isinstance(module[0], nn.Linear):
            continue
        if any(isinstance(m, nn.Linear) for m in module[0].modules()):
            found.append((name, module))
    return found


def call_transformer(model: nn.Module, batch: dict[str, Any]) -> Any:
    """Run one recorded call: on the expert it names in a two-expert Program, else on the model.

    Floating-point inputs are cast to the transformer's compute dtype first, as its pipeline casts them:
    a batch recorded from a float32 model (evaluation) then also runs a bfloat16 quantized one."""
    expert = batch.get(EXPERT_KEY)
    transformer = model if expert is None else model.get_submodule(expert)
    kwargs = {k: v for k, v in batch.items() if k != EXPERT_KEY}
    return transformer(**cast_floats(kwargs, compute_dtype(transformer)))


def component_source(source: ModelSource, component: str) -> ModelSource:
    """The source of one transformer of a pipeline: its config, the pipeline's directory, one component."""
    sub = config_source(source.path / component)
    return dataclasses.replace(source, config=sub.config, architecture=sub.architecture, components=(component,))


def expert_program(program: Program, component: str) -> Program:
    """A view of one expert of a two-expert Program: its blocks, annotations and model, named without the
    component prefix, as the expert's own checkpoint names them."""
    prefix = f"{component}."

    def strip(name: str) -> str:
        return name.removeprefix(prefix)

    stages = [Stage(strip(s.name), [dataclasses.replace(b, name=strip(b.name)) for b in s.blocks])
              for s in program.stages if s.blocks and s.blocks[0].name.startswith(prefix)]
    return Program(
        model=program.model.get_submodule(component), family=program.family,
        source=component_source(program.source, component), stages=stages, call=call_transformer,
        quant_specs={strip(k): v for k, v in program.quant_specs.items() if k.startswith(prefix)},
        rotations=program.rotations, config_updates=program.config_updates, tied_embeddings=program.tied_embeddings,
        device=program.device, source_tensors=program.source_tensors, ascend_metadata=program.ascend_metadata,
    )


class DiffusionTransformer(Frontend):
    name = "diffusion"
    architectures = ("FluxTransformer2DModel", "HunyuanVideoTransformer3DModel", "WanTransformer3DModel")
    description = "diffusion transformers (diffusers): FLUX.1, HunyuanVideo, Wan 2.1/2.2"
    extra = "diffusion"
    streams = False  # loaded whole: a diffusers transformer is a few GB to a few tens of GB, its blocks small
    calibration_dataset = "builtin:prompts"
    builtin_datasets = PROMPT_SPECS
    trace_calibration = {"diffusion": {"steps": 2}}  # two steps reach both Wan2.2 experts (boundary at 0.875)
    evaluation_dataset = "builtin:prompts-eval"
    evaluation_metric = "fidelity"

    def load(self, source: ModelSource, *, dtype: torch.dtype, device: str | dict[str, str] = "cpu",
             trust_remote_code: bool = False, offload_folder: Path | None = None) -> nn.Module:
        if not source.is_pipeline:
            return _load_transformer(source, dtype, device)
        loaded = {name: _load_transformer(component_source(source, name), dtype, device) for name in source.components}
        return next(iter(loaded.values())) if len(loaded) == 1 else PipelineTransformers(loaded).eval()

    def skeleton(self, source: ModelSource, dtype: torch.dtype) -> nn.Module:
        if not source.is_pipeline:
            return super().skeleton(source, dtype)
        transformers = {name: super(DiffusionTransformer, self).skeleton(component_source(source, name), dtype)
                        for name in source.components}
        return next(iter(transformers.values())) if len(transformers) == 1 else PipelineTransformers(transformers)

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        stages = []
        for list_name, blocks in block_lists(model):
            inside_embedder = "." in (list_name.split(".", 1)[1] if isinstance(model, PipelineTransformers) else list_name)
            role = "text" if inside_embedder else "dit"
            stages.append(Stage(list_name, [Block(f"{list_name}.{i}", b, blocks, i, role=role) for i, b in enumerate(blocks)]))
        if not stages:
            raise ModelLoadError(f"{source.architecture}: found no list of repeated blocks to cut the transformer into")
        program = Program(model=model, family=self.name, source=source, stages=stages, call=call_transformer)
        if isinstance(model, PipelineTransformers):
            program.parts = functools.partial(_expert_programs, program)
        return program

    def calibration_batches(self, calibration: CalibrationConfig, source: ModelSource, program: Program,
                            report: RunReport | None = None) -> list[dict]:
        """One batch per recorded transformer call (two-expert Programs: tagged with the expert under EXPERT_KEY)."""
        model = program.model
        experts = source.components or (source.path.name,)
        transformers = dict(model.named_children()) if isinstance(model, PipelineTransformers) else {experts[0]: model}
        calls = calibration_calls(
            calibration, source.path if source.is_pipeline else None, experts,
            transformers=transformers if source.is_pipeline else None, dtype=compute_dtype(next(iter(transformers.values()))),
            device=program.device, transformer_dir=None if source.is_pipeline else source.path,
        )
        if report is not None:
            report.metrics["calibration_calls"] = float(len(calls))
            report.note(f"calibration: {summary(calls)} from {calibration.dataset}")
        if isinstance(model, PipelineTransformers):
            return [{EXPERT_KEY: call.expert, **call.kwargs} for call in calls]
        return [call.kwargs for call in calls]


def _expert_programs(program: Program) -> dict[str, Program]:
    return {name: expert_program(program, name) for name, _ in program.model.named_children()}


def _load_transformer(source: ModelSource, dtype: torch.dtype, device: str) -> nn.Module:
    """The transformer of a transformer directory, or of a one-component pipeline source."""
    directory = source.path / source.components[0] if source.is_pipeline else source.path
    model = load_checked(auto_class(source), directory, directory, torch_dtype=dtype, use_safetensors=True)
    return model.to(device).eval()
