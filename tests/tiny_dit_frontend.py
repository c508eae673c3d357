"""The diffusion frontend fed with seeded transformer inputs, for tests of the Ascend reader and of `slimc eval`.

It loads and cuts a transformer as the real frontend does, but turns any dataset into seeded inputs (a
different seed range for its evaluation dataset) instead of running a pipeline, and records the settings
it was asked for. Tests install it with `installed(monkeypatch)`.
"""

from __future__ import annotations

from tiny_diffusion import tiny_transformer_inputs

import slimc.frontends
from slimc.config import CalibrationConfig
from slimc.frontends.diffusion import DiffusionTransformer
from slimc.ir import Program
from slimc.ir.source import ModelSource

KINDS = {"FluxTransformer2DModel": "flux", "HunyuanVideoTransformer3DModel": "hunyuan_video", "WanTransformer3DModel": "wan"}
EVALUATION_SEED = 1000


class TinyDiT(DiffusionTransformer):
    """The diffusion frontend with seeded inputs instead of a pipeline run."""

    name = "tiny-dit"
    evaluation_dataset = "tiny:held-out-latents"

    def __init__(self) -> None:
        self.requested: list[CalibrationConfig] = []

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
