"""The block-sequential pipeline: each block is traced, rewritten by every pass, run, and released.

Calibration data enters each stage (vision tower, text decoder, DiT blocks) through a forward of
the model, which runs the stages before it as already rewritten; each later block's inputs are
the previous block's outputs, computed after that block's passes (so quantization error
propagates as it will at run time). Only one block's calibration activations are held at a
time: outputs replace inputs batch by batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from slimc.capture import BlockInput, StageNotReached, capture_stage
from slimc.config import SlimcConfig, format_validation_error
from slimc.errors import ConfigError, DataError, PassError
from slimc.ir import Block, Program, Stage
from slimc.pass_base import Pass, pass_class
from slimc.patterns import is_experts_module, propagate_shapes
from slimc.report import RunReport
from slimc.schemes import QuantScheme
from slimc.tracer import trace_block

# The equivalence check's tolerance: the larger of a floor for the model's dtype and SENSITIVITY_FACTOR times the
# block's own sensitivity, its relative output change when each input element moves by one epsilon of the dtype
# (PERTURBATION_SAMPLES random-sign perturbations, the largest change). A rewrite computes the same function in
# other arithmetic (a lowered layer in float32 from integer codes, where the fake-quantized one rounded weights
# and activations to bfloat16); the difference is rounding noise, which quantizers in the block amplify exactly
# as they amplify a perturbation of the inputs. On the tiny models of every family and shipped config the check
# measured at most 0.72x the sensitivity in bfloat16; a wrong pass is off by many times it.
TOLERANCE_FLOOR = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
                   torch.float16: 5e-3}
SENSITIVITY_FACTOR = 2
PERTURBATION_SAMPLES = 2


def block_output(output: Any) -> torch.Tensor:
    """What a block computes, as one tensor: its output, or its tensor outputs (both streams of a
    joint-attention block) flattened and concatenated, so errors weigh every stream."""
    if isinstance(output, torch.Tensor):
        return output
    tensors = [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
    return tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def hidden_of(inputs: BlockInput) -> torch.Tensor:
    """The hidden states of a block call (its first argument, or `hidden_states`)."""
    args, kwargs = inputs
    return args[0] if args else kwargs["hidden_states"]


def rotate_hidden(hidden: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """hidden (..., d) @ rotation (d, d), computed in float32, in hidden's dtype."""
    return (hidden.float() @ rotation.to(hidden.device, torch.float32)).to(hidden.dtype)


def rebind_hidden(inputs: BlockInput, hidden: torch.Tensor) -> BlockInput:
    """The next block's inputs: the same call with the hidden states replaced."""
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def to_device(batch: BlockInput, device: torch.device) -> BlockInput:
    """A block input with every tensor moved to the processing device."""
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


def perturbed(inputs: BlockInput, seed: int) -> BlockInput:
    """The block call with each element of the hidden states moved by one epsilon of its dtype, up or down at
    random (an ulp or two: the size of the rounding differences between two ways of computing it)."""
    hidden = hidden_of(inputs)
    if not hidden.is_floating_point():
        return inputs
    signs = torch.randint(0, 2, hidden.shape, generator=torch.Generator().manual_seed(seed)).to(hidden.device) * 2 - 1
    return rebind_hidden(inputs, (hidden.float() * (1 + torch.finfo(hidden.dtype).eps * signs)).to(hidden.dtype))


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((actual.float() - reference).norm() / reference.norm().clamp_min(1e-12))


class Context:
    """What a pass sees while working on a block: the program, the config, the block's inputs."""

    def __init__(self, program: Program, config: SlimcConfig, steps: Sequence[Pass], report: RunReport) -> None:
        self.program = program
        self.config = config
        self.steps = steps
        self.report = report
        self.device = torch.device(config.model.device)
        self.inputs: list[BlockInput] = []

    @torch.no_grad()
    def run(self, block: Block, batches: Sequence[BlockInput] | None = None) -> list[torch.Tensor]:
        """The block graph's outputs (see `block_output`) on (some of) its calibration inputs."""
        batches = self.inputs if batches is None else batches
        return [block_output(block.traced(*args, **kwargs)) for args, kwargs in batches]

    def planned_scheme(self, qualified_name: str) -> tuple[str, QuantScheme] | None:
        """The scheme a later step will give a layer, so earlier steps (smoothing) can aim for it."""
        for step in self.steps:
            scheme_for = getattr(step, "scheme_for", None)
            if scheme_for is not None:
                found = scheme_for(qualified_name, self.config)
                if found is not None:
                    return found
        return None

    def rotate_stream(self, rotation: torch.Tensor) -> None:
        """Rotate the hidden states of the current calibration inputs: x -> x R."""
        self.inputs = [rebind_hidden(batch, rotate_hidden(hidden_of(batch), rotation)) for batch in self.inputs]

    def tolerance(self, sensitivity: float) -> float:
        """What the equivalence check accepts from a block whose outputs move by `sensitivity` (relative) under
        a one-epsilon perturbation of its inputs: the config's tolerance if set, else as TOLERANCE_FLOOR says."""
        if self.config.checks.equivalence_tolerance is not None:
            return self.config.checks.equivalence_tolerance
        return max(TOLERANCE_FLOOR.get(self.program.dtype, 1e-3), SENSITIVITY_FACTOR * sensitivity)


class Pipeline:
    """The passes of a config, validated and ordered."""

    def __init__(self, steps: list[Pass]) -> None:
        self.steps = steps

    @classmethod
    def from_config(cls, config: SlimcConfig) -> Pipeline:
        steps: list[Pass] = []
        for index, raw in enumerate(config.pipeline):
            params = {key: value for key, value in raw.items() if key != "pass"}
            try:
                step_class = pass_class(str(raw["pass"]))
            except ConfigError as error:
                raise ConfigError(f"{config.where('pipeline', index, 'pass')}: pipeline.{index}.pass: {error}") from None
            try:
                step = step_class(**params)
            except ValidationError as error:
                raise ConfigError(
                    format_validation_error(error, step_class, config.source_file, config.lines, prefix=("pipeline", index))
                ) from None
            missing = [name for name in step.requires if name not in {s.name for s in steps}]
            if missing:
                raise ConfigError(
                    f"{config.where('pipeline', index)}: pipeline.{index}: pass {step.name!r} needs "
                    f"{', '.join(repr(m) for m in missing)} earlier in the pipeline"
                )
            step.check(config, index)
            steps.append(step)
        return cls(steps)

    def run(self, program: Program, config: SlimcConfig, batches: list[dict[str, Any]], report: RunReport) -> Context:
        """Run every pass on every block, stage by stage. `batches` are calibration batches: each a dict
        of the model's forward arguments. A stage's inputs are captured by running the model (through
        the already rewritten stages before it) on every batch."""
        ctx = Context(program, config, self.steps, report)
        prepared = False
        for stage in program.stages:
            try:
                with report.timed("capture"), program.executing_graphs():
                    stage_inputs = capture_stage(
                        [block.module for block in stage.blocks],
                        [functools.partial(program.call, program.model, batch) for batch in batches],
                        stage=f"stage {stage.name!r}",
                    )
            except StageNotReached as error:
                self._leave_unreached(stage, ctx, error)
                continue
            ctx.inputs = [to_device(batch, ctx.device) for batch in stage_inputs.first]
            if not prepared:
                prepared = True
                for step in self.steps:
                    with report.timed(step.name):
                        step.prepare(program, ctx)
            for position, block in enumerate(tqdm(stage.blocks, desc=stage.name, unit="block")):
                outputs = self._run_block(block, ctx)
                if position + 1 < len(stage.blocks):
                    ctx.inputs = [to_device(stage_inputs.next_inputs(position + 1, b, out), ctx.device)
                                  for b, out in enumerate(outputs)]
            ctx.inputs = []
        for step in self.steps:
            with report.timed(step.name):
                step.finish(program, ctx)
        return ctx

    @staticmethod
    def _leave_unreached(stage: Stage, ctx: Context, error: StageNotReached) -> None:
        """A stage no calibration batch runs (text-only data and a vision tower) stays float if the config
        quantizes none of its layers; if it quantizes some, the data cannot calibrate them."""
        selected = [block.qualified(name) for block in stage.blocks for name, module in block.module.named_modules()
                    if (isinstance(module, nn.Linear) or is_experts_module(module))
                    and ctx.planned_scheme(block.qualified(name)) is not None]
        if selected:
            raise DataError(
                f"calibration.dataset {ctx.config.calibration.dataset!r} gives no input to stage {stage.name!r}, but the "
                f"config quantizes {len(selected)} of its layers (e.g. {selected[0]}): give calibration data that runs "
                "it (images for a vision tower: builtin:image-text or a .jsonl of {\"image\": ..., \"text\": ...} lines; "
                "see docs/calibration.md), or exclude those layers from the fake_quant rules"
            ) from error
        ctx.report.note(f"stage {stage.name!r}: no calibration batch runs it and the config quantizes none of its "
                        "layers, so it stays as loaded")

    def _run_block(self, block: Block, ctx: Context) -> list[Any]:
        """Trace the block if needed, run every pass on it, and return its outputs on every batch."""
        moved = ctx.device.type != "cpu"
        if moved:
            block.module.to(ctx.device)
        if block.traced is None:
            with ctx.report.timed("trace"):
                args, kwargs = ctx.inputs[0]
                block.traced = trace_block(block.module, args, kwargs, name=block.name)
                propagate_shapes(block.traced.graph_module, block.traced.flatten_inputs(args, kwargs))
        for step in self.steps:
            checked = step.preserves_function and ctx.config.checks.equivalence
            reference = self._reference(step, block, ctx) if checked else None
            with ctx.report.timed(step.name):
                step.run_block(block, ctx)
            if reference is not None:
                self._check_equivalence(step, block, ctx, reference)
        with torch.no_grad():
            outputs = [block.traced(*args, **kwargs) for args, kwargs in ctx.inputs]
        if moved:
            block.module.to("cpu")
        return outputs

    @staticmethod
    def _reference(step: Pass, block: Block, ctx: Context) -> tuple[torch.Tensor, float]:
        """What the block must still compute after `step`, on the first calibration batch, and how much that
        moves under a one-epsilon perturbation of the inputs (the sensitivity the tolerance scales with)."""
        rotation = step.stream_rotation()
        batch = ctx.inputs[0]
        if rotation is not None:
            batch = rebind_hidden(batch, rotate_hidden(hidden_of(batch), rotation.T))
        calls = [batch] + [perturbed(batch, seed) for seed in range(PERTURBATION_SAMPLES)]
        outputs = ctx.run(block, calls)
        if rotation is not None:
            outputs = [rotate_hidden(output, rotation) for output in outputs]
        reference = outputs[0]
        return reference, max(relative_error(output, reference) for output in outputs[1:])

    @staticmethod
    def _check_equivalence(step: Pass, block: Block, ctx: Context, reference: tuple[torch.Tensor, float]) -> None:
        expected, sensitivity = reference
        error = relative_error(ctx.run(block, ctx.inputs[:1])[0], expected)
        tolerance = ctx.tolerance(sensitivity)
        if not error <= tolerance:
            if ctx.config.checks.equivalence_tolerance is not None:
                basis = "checks.equivalence_tolerance"
            else:
                basis = (f"{SENSITIVITY_FACTOR}x the block's {sensitivity:.1e} change under a one-epsilon perturbation "
                         f"of its inputs, at least {TOLERANCE_FLOOR.get(ctx.program.dtype, 1e-3):.0e}")
            raise PassError(
                f"pass {step.name!r} changed what block {block.name} computes: relative output difference "
                f"{error:.3e} exceeds the tolerance {tolerance:.1e} ({basis}). The pass should preserve the function; "
                "report this with the model, or set `checks.equivalence_tolerance` in the config if the difference is expected"
            )
