"""A stand-in frontend for tiny diffusers transformers, for tests of the Ascend reader and of `slimc eval`.

It cuts a transformer into one stage per block list of tiny_diffusion.BLOCK_LISTS and turns any dataset
into seeded transformer inputs (a different seed range for its evaluation dataset), recording the
settings it was asked for. Tests install it with `installed(monkeypatch)`; the real diffusion frontend
is written separately.
"""

from __future__ import annotations

import torch
from tiny_diffusion import BLOCK_LISTS, tiny_transformer_inputs
from torch import nn

import slimc.frontends
from slimc.config import CalibrationConfig
from slimc.frontends import Frontend
from slimc.frontends.hf import ModelSource, auto_class
from slimc.ir import Block, Program, Stage

KINDS = {"FluxTransformer2DModel": "flux", "HunyuanVideoTransformer3DModel": "hunyuan_video", "WanTransformer3DModel": "wan"}
EVALUATION_SEED = 1000


class TinyDiT(Frontend):
    name = "tiny-dit"
    architectures = tuple(KINDS)
    description = "tiny diffusers transformers (tests)"
    evaluation_dataset = "tiny:held-out-latents"

    def __init__(self) -> None:
        self.requested: list[CalibrationConfig] = []

    def load(self, source: ModelSource, *, dtype: torch.dtype, device: str = "cpu", trust_remote_code: bool = False) -> nn.Module:
        return auto_class(source).from_pretrained(source.path, torch_dtype=dtype).to(device).eval()

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        stages = []
        for list_name in BLOCK_LISTS[KINDS[source.architecture]]:
            blocks = model.get_submodule(list_name)
            stages.append(Stage(list_name, [Block(f"{list_name}.{i}", b, blocks, i, role="dit") for i, b in enumerate(blocks)]))
        return Program(model=model, family=self.name, source=source, stages=stages)

    def calibration_batches(self, calibration: CalibrationConfig, source: ModelSource, program: Program, report=None) -> list[dict]:
        self.requested.append(calibration)
        first = EVALUATION_SEED if calibration.dataset == self.evaluation_dataset else 0
        count = -(-calibration.samples // calibration.batch_size)
        kind = KINDS[source.architecture]
        return [tiny_transformer_inputs(program.model, kind, batch=calibration.batch_size, seed=first + i) for i in range(count)]


def installed(monkeypatch, frontend: TinyDiT | None = None) -> TinyDiT:
    """Make `frontend_for` find a TinyDiT (ahead of the real ones) for the rest of the test."""
    frontend = frontend or TinyDiT()
    real = slimc.frontends.all_frontends
    monkeypatch.setattr(slimc.frontends, "all_frontends", lambda: [frontend, *real()])
    return frontend
