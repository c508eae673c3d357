"""`slimc analyze`: which layers quantization hurts most, measured one layer at a time on the calibration data.

The config's pipeline runs up to (not including) its `fake_quant`, so each block is measured as the compile would
quantize it (smoothed, rotated); then, in each block, every Linear the plan quantizes is quantized alone
(`simulated_quantization`: round-to-nearest weights, activations as planned, as smooth's search does) and the
block's output is compared with the unquantized block's on every calibration batch (the worst relative error over
the batches). Blocks are measured on float inputs, so each layer's error is its own. With `end_to_end`, the model's
next-token loss on the calibration batches is measured again with only that layer quantized (one forward of the
whole model per layer and batch: for large models limit it with `top`). Cheap proxies from the layer's input
activations come with each: kurtosis and the share of channels whose max |x| exceeds OUTLIER_FACTOR × the median.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import PrivateAttr

from slimc.commands.compile import check_device, check_not_inside, load_program, resolve_source, streams
from slimc.commands.export import REPORT_FILE, check_output_dir, scratch_directory, staged_output
from slimc.commands.streamed_eval import next_token_nll
from slimc.config import SlimcConfig
from slimc.config.steps import AssignedScheme, PassStep
from slimc.errors import ConfigError
from slimc.frontends import Frontend, check_builtin_dataset, frontend_for
from slimc.ir import Block, Program
from slimc.ir.hooks import temporary_hooks
from slimc.ir.source import ModelSource
from slimc.numerics.calib import simulated_quantization
from slimc.numerics.fidelity import json_safe, relative_error
from slimc.pass_base import Context, Pass
from slimc.passes.fake_quant import FakeQuant
from slimc.patterns import find_linears, linear_roles
from slimc.pipeline import Pipeline
from slimc.report import RunReport, plot_layer_errors

OUTLIER_FACTOR = 8.0  # a channel is an outlier when its max |x| exceeds this many times the median channel's
ANALYSIS_FILE = "analysis.json"
PLOT_FILE = "analysis.png"


@dataclass
class LayerSensitivity:
    name: str
    kind: str  # the layer's role in its block's graph: q, k, v, o, gate, up, down, or linear
    block: int  # the block's position in the program
    scheme: str
    block_error: float  # worst relative error of the block's output over the calibration batches, this layer alone quantized
    kurtosis: float  # of the layer's input activations (3 for a Gaussian)
    outlier_ratio: float  # share of input channels whose max |x| exceeds OUTLIER_FACTOR × the median channel's
    loss_delta: float | None = None  # next-token loss with only this layer quantized minus the float loss
    rank: int = 0  # 1: the most sensitive (largest block_error)


@dataclass
class InputMoments:
    """Running sums of a layer's input activations: shifted power sums (for the kurtosis) and per-channel max |x|."""

    shift: float | None = None
    count: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0] * 4)
    absmax: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        if self.shift is None:  # sums of (x - shift)^k, shift ~ the mean, keep the central moments accurate
            self.shift = x.mean().item()
        centred = x - self.shift
        self.count += centred.numel()
        for power in range(4):
            self.sums[power] += centred.pow(power + 1).sum().item()
        channel = x.abs().amax(0)
        self.absmax = channel if self.absmax is None else torch.maximum(self.absmax, channel)

    def kurtosis(self) -> float:
        """E[(x − μ)⁴] / Var(x)²."""
        m1, m2, m3, m4 = (s / self.count for s in self.sums)
        variance = m2 - m1**2
        fourth = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        return fourth / variance**2 if variance > 0 else math.nan

    def outlier_ratio(self, factor: float = OUTLIER_FACTOR) -> float:
        return (self.absmax > factor * self.absmax.median()).double().mean().item()


class Sensitivity(Pass):
    """The measuring step that stands where the config's `fake_quant` would: it quantizes nothing for good, and
    answers the plan with the schemes of the steps it replaces, so the passes before it aim for them as in a compile."""

    name: ClassVar[str] = "sensitivity"
    batches: int | None = None  # measure on the first this many calibration batches; None: on all of them
    _assigners: list[PassStep] = PrivateAttr(default_factory=list)
    _blocks: dict[str, Block] = PrivateAttr(default_factory=dict)
    _measured: list[LayerSensitivity] = PrivateAttr(default_factory=list)

    @property
    def measured(self) -> list[LayerSensitivity]:
        return self._measured

    def block_of(self, layer: str) -> Block:
        return self._blocks[layer]

    def scheme_for(self, layer: str, config: SlimcConfig) -> AssignedScheme | None:
        return next((found for step in self._assigners if (found := step.scheme_for(layer, config)) is not None), None)

    def run_block(self, block: Block, ctx: Context) -> None:
        gm = block.graph_module
        planned = {target: ctx.plan.scheme(block.qualified(target)) for target in find_linears(gm)}
        planned = {target: assigned for target, assigned in planned.items() if assigned is not None}
        if not planned:
            return
        kinds = linear_roles(gm)
        position = ctx.program.position(block)
        moments = {target: InputMoments() for target in planned}
        measured = None if self.batches is None else ctx.leading(self.batches)
        with temporary_hooks() as hooks:
            for target in planned:
                hooks.before(block.leaf(target), lambda m, args, t=target: moments[t].add(args[0]))
            reference = ctx.run(block, measured)
        for target, (scheme_name, scheme) in planned.items():
            with simulated_quantization(block, {target: scheme}):
                outputs = ctx.run(block, measured)
            error = ctx.world.worst([relative_error(o, r) for o, r in zip(outputs, reference)])
            name = block.qualified(target)
            self._blocks[name] = block
            self._measured.append(LayerSensitivity(name, kinds[target], position, scheme_name, error,
                                                  moments[target].kurtosis(), moments[target].outlier_ratio()))


def measuring_pipeline(config: SlimcConfig, batches: int | None = None) -> tuple[Pipeline, Sensitivity]:
    """The config's steps before its first `fake_quant`, then the measuring step in its place (measuring on the first
    `batches` calibration batches, or on all; the steps before it see all of them, as in a compile)."""
    steps = Pipeline.from_config(config).steps
    cut = next((i for i, step in enumerate(steps) if isinstance(step, FakeQuant)), None)
    if cut is None:
        raise ConfigError(f"{config.where('pipeline')}: pipeline: analyze measures the layers a fake_quant step "
                          "quantizes, and this config has none")
    sensitivity = Sensitivity(batches=batches)
    sensitivity._assigners = steps[cut:]
    return Pipeline(steps[:cut] + [sensitivity]), sensitivity


@torch.no_grad()
def model_loss(program: Program, batches: Sequence[dict[str, Any]]) -> float:
    """The mean next-token loss of the model (blocks as their graphs are now) on the batches."""
    total, count = 0.0, 0
    with program.executing_graphs():
        for batch in batches:
            logits = getattr(program.call(program.model, batch), "logits", None)
            if logits is None or "input_ids" not in batch:
                raise ConfigError(f"--end-to-end measures the next-token loss of a language model, and the "
                                  f"{program.family} model gives no logits for token ids; analyze it without --end-to-end")
            nll, tokens = next_token_nll(logits, batch["input_ids"].to(logits.device))
            total, count = total + nll, count + tokens
    return total / count


@dataclass
class Analysis:
    layers: list[LayerSensitivity]
    float_loss: float | None
    report: RunReport

    def to_json(self) -> str:
        """Layers most sensitive first; a kurtosis of a constant input (no variance) is "nan"."""
        return json.dumps({"float_loss": self.float_loss, "outlier_factor": OUTLIER_FACTOR, "ranked_by": "block_error",
                           "layers": [json_safe(asdict(layer)) for layer in self.layers]}, indent=2)


@dataclass
class Measurement:
    """What measuring the planned layers leaves: the program (its blocks as the passes before `fake_quant` left
    them), the calibration batches, and the layers ranked most sensitive first."""

    program: Program
    batches: list[dict[str, Any]]
    layers: list[LayerSensitivity]
    sensitivity: Sensitivity


def measure_layers(config: SlimcConfig, source: ModelSource, frontend: Frontend, report: RunReport,
                   scratch: Path | None, batches: int | None = None) -> Measurement:
    """Load the model (streamed with a `scratch` directory where the config streams, whole without one), run the
    measuring pipeline on the calibration data, and rank every planned Linear by its block error on the first
    `batches` calibration batches (all by default)."""
    pipeline, sensitivity = measuring_pipeline(config, batches)
    program = load_program(config, source, frontend, report, scratch)
    batches = frontend.calibration_batches(config.calibration, source, program, report)
    pipeline.run(program, config, batches, report)
    layers = sorted(sensitivity.measured, key=lambda layer: -layer.block_error)
    for rank, layer in enumerate(layers, 1):
        layer.rank = rank
    return Measurement(program, batches, layers, sensitivity)


def analyze_model(config: SlimcConfig, *, model_path: str | None, out_dir: Path, end_to_end: bool = False,
                  top: int | None = None, batches: int | None = None, overwrite: bool = False) -> Analysis:
    """Measure every planned Linear's sensitivity (block errors on the first `batches` calibration batches, or all)
    and write analysis.json and analysis.png in `out_dir`."""
    if top is not None and not end_to_end:
        raise ConfigError("--top K limits the --end-to-end measurement to the K layers of largest block error; "
                          "add --end-to-end, or leave --top out")
    if top is not None and top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches must be at least 1, got {batches}")
    check_device(config.model.device)
    measuring_pipeline(config)  # a config without fake_quant is refused before the model loads
    source = resolve_source(config, model_path)
    frontend = frontend_for(source, config.model.family)
    check_builtin_dataset(frontend, config.calibration.dataset, source.architecture, where=config.where("calibration", "dataset"))
    check_not_inside(source, out_dir)
    check_output_dir(out_dir, overwrite)
    report = RunReport()
    with scratch_directory(out_dir) as scratch:
        # the end-to-end loss runs the whole model after the blocks ran, so it needs the model held whole
        measured = measure_layers(config, source, frontend, report,
                                  None if end_to_end or not streams(config, source, frontend) else scratch, batches)
        layers = measured.layers
        float_loss = None
        if end_to_end:
            with report.timed("end-to-end loss"):
                program, batches = measured.program, measured.batches
                float_loss = model_loss(program, batches)
                for layer in layers[:top]:
                    block = measured.sensitivity.block_of(layer.name)
                    target = layer.name.removeprefix(block.name + ".")
                    with simulated_quantization(block, {target: config.schemes[layer.scheme]}):
                        layer.loss_delta = model_loss(program, batches) - float_loss
    analysis = Analysis(layers, float_loss, report)
    with staged_output(out_dir, overwrite) as staging:  # the directory appears only with all its files
        (staging / ANALYSIS_FILE).write_text(analysis.to_json())
        plot_layer_errors([(layer.kind, layer.block, layer.block_error) for layer in layers], staging / PLOT_FILE,
                          "block-output relative error, one layer quantized alone")
        report.finish()
        (staging / REPORT_FILE).write_text(report.to_json())
    return analysis


def render_table(analysis: Analysis, rows: int | None = None) -> str:
    """The layers, most sensitive first, as a plain-text table."""
    lines = [f"{'rank':>4}  {'block err':>9}  {'loss Δ':>9}  {'kurtosis':>8}  {'outliers':>8}  {'kind':6}  layer"]
    for layer in analysis.layers[:rows]:
        delta = "" if layer.loss_delta is None else f"{layer.loss_delta:+.2e}"
        lines.append(f"{layer.rank:>4}  {layer.block_error:9.3e}  {delta:>9}  {layer.kurtosis:8.2f}  "
                     f"{layer.outlier_ratio:8.2%}  {layer.kind:6}  {layer.name}")
    if analysis.float_loss is not None:
        lines.append(f"float next-token loss on the calibration batches: {analysis.float_loss:.4f}")
    return "\n".join(lines)
