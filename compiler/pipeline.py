"""The block-sequential pipeline: each block is traced, rewritten by every pass, run, and released.

Calibration data enters each stage (vision tower, text decoder, DiT blocks) through a forward of
the model, which runs the stages before it as already rewritten; each later block's inputs are
the previous block's outputs, computed after that block's passes (so quantization error
propagates as it will at run time), or with `calibration.propagate: float` before any pass changes
what it computes (`FloatOutputs`). Only one block's calibration activations are held at a
time: outputs replace inputs batch by batch, in an `ActivationStore` that keeps those beyond
`memory.activations_gb` on disk; and, when the program streams its weights, only
one block's weights: a finished block is spilled to disk (`Program.finish_block`).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimc.config import SlimcConfig
from slimc.distributed import SINGLE, World
from slimc.errors import ConfigError, DataError, PassError
from slimc.ir import Block, Program, Stage
from slimc.ir.activations import GB, ActivationStore, FloatOutputs
from slimc.ir.calls import (
    hidden_of,
    perturbed,
    rebind_hidden,
    rotate_hidden,
    row_count,
    spread_rows,
    take_rows,
    tokens_per_row,
)
from slimc.ir.capture import BlockInput, StageInputs, StageNotReached, capture_stage
from slimc.ir.tracer import trace_block
from slimc.journal import BlockState, Journal
from slimc.numerics.fidelity import relative_error
from slimc.numerics.modules import float_matmuls, reusing_within_runs
from slimc.pass_base import Context, Pass
from slimc.patterns import propagate_shapes
from slimc.progress import Progress
from slimc.report import RunReport

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


def equivalence_tolerance(config: SlimcConfig, dtype: torch.dtype, sensitivity: float) -> float:
    """What the equivalence check accepts from a block whose outputs move by `sensitivity` (relative) under a
    one-epsilon perturbation of its inputs: the config's tolerance if set, else as TOLERANCE_FLOOR says."""
    if config.checks.equivalence_tolerance is not None:
        return config.checks.equivalence_tolerance
    return max(TOLERANCE_FLOOR.get(dtype, 1e-3), SENSITIVITY_FACTOR * sensitivity)


class Pipeline:
    """The passes of a config, validated and ordered."""

    def __init__(self, steps: list[Pass]) -> None:
        self.steps = steps
        self._prepared = False

    @classmethod
    def from_config(cls, config: SlimcConfig) -> Pipeline:
        """The config's steps (typed and checked when it loaded), each a fresh copy: a pass keeps state while it runs."""
        steps: list[Pass] = []
        for index, step in enumerate(config.pipeline):
            if not isinstance(step, Pass):
                raise ConfigError(f"{config.where('pipeline', index, 'pass')}: pipeline.{index}.pass: {step.name!r} is a "
                                  "PassStep that does no work on blocks; derive it from slimc.passes.Pass")
            steps.append(step.model_copy(deep=True))
        return cls(steps)

    def run(self, program: Program, config: SlimcConfig, batches: list[dict[str, Any]], report: RunReport,
            journal: Journal | None = None, world: World = SINGLE, spill_parent: Path | None = None) -> Context:
        """Run every pass on every block, stage by stage. `batches` are calibration batches: each a dict
        of the model's forward arguments. A stage's inputs are captured by running the model (through
        the already rewritten stages before it) on every batch. With a `journal`, each finished block is
        committed to it, and blocks it already holds are restored instead of run. In a `world` of several
        processes, each runs batches rank, rank + size, ... and the passes reduce their statistics over all.
        With `memory.activations_gb`, the blocks' calibration inputs beyond it are spilled to a directory under
        `spill_parent` (the system's temporary directory if None), removed when this returns or fails."""
        if len(batches) < world.size:
            raise DataError(f"{world.size} processes share {len(batches)} calibration batches, and each needs one; "
                            "give more calibration samples (calibration.samples / calibration.batch_size) or fewer processes")
        ctx = Context(program, config, self.steps, report, world)
        budget = config.memory.activations_gb
        with contextlib.ExitStack() as cleanup:
            directory = None
            if budget is not None:
                directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="activations-", dir=spill_parent)))
            store = ActivationStore(None if budget is None else int(budget * GB), directory, ctx.device)
            cleanup.callback(lambda: ctx.inputs.close() if isinstance(ctx.inputs, ActivationStore) else None)
            self._run_stages(program, ctx, batches, journal, store)
        for step in self.steps:
            with report.timed(step.name):
                step.finish(program, ctx)
        return ctx

    def _run_stages(self, program: Program, ctx: Context, batches: list[dict[str, Any]], journal: Journal | None,
                    empty: ActivationStore) -> None:
        """Every stage's blocks, their calibration inputs held in stores like `empty`."""
        world, report = ctx.world, ctx.report
        batch_ids = list(range(world.rank, len(batches), world.size))
        batches = batches[world.rank::world.size]
        blocks_done = Progress("blocks", sum(len(stage.blocks) for stage in program.stages), "block")
        resumed_inputs = None
        if journal is not None and journal.committed:  # the passes prepare the model as loaded, before any block is restored
            resumed_inputs = self._prepare(program, ctx, journal)
        for stage in program.stages:
            committed = [block for block in stage.blocks if journal is not None and journal.has(block)]
            if len(committed) == len(stage.blocks):
                for block in committed:
                    journal.restore_block(program, block)
                blocks_done.skip(len(committed))
                continue
            ctx.inputs = empty.like()  # the stage's first block inputs, filled while the capture runs
            try:
                with (report.timed("capture"), program.executing_graphs(),
                      Progress(f"capture {stage.name}", len(batches), "batch", leave=False) as capturing):
                    stage_inputs = capture_stage(
                        [block.module for block in stage.blocks],
                        [capturing.counted(functools.partial(program.call, program.model, batch)) for batch in batches],
                        stage=f"stage {stage.name!r}", first=ctx.inputs,
                    )
            except StageNotReached as error:
                unreached, stage_inputs = error, None
            else:
                unreached = None
            if not self._share_stage(stage, ctx, stage_inputs, batch_ids):
                self._leave_unreached(stage, ctx, unreached, journal)
                blocks_done.skip(len(stage.blocks))
                continue
            ctx.stage_inputs = stage_inputs
            self._prepare(program, ctx, journal)
            ctx.stage_inputs = None
            for block in committed:  # after the capture, which runs the stage's blocks as loaded
                journal.restore_block(program, block)
            if committed:
                ctx.inputs.close()
                ctx.inputs = empty.like()
                ctx.inputs.extend(resumed_inputs)
                blocks_done.skip(len(committed))
            for position in range(len(committed), len(stage.blocks)):
                block = stage.blocks[position]
                last = position + 1 == len(stage.blocks)
                self._run_block(block, ctx, blocks_done,
                                None if last else functools.partial(stage_inputs.next_inputs, position + 1))
                self._finish_block(block, ctx, journal)
                blocks_done.advance()

    @staticmethod
    def _share_stage(stage: Stage, ctx: Context, stage_inputs: StageInputs | None, batch_ids: list[int]) -> bool:
        """Number the batches that reach the stage, over all processes, in batch order (what searches and observers
        go by); False where none does. Every process needs one."""
        local = [] if stage_inputs is None else [batch_ids[i] for i in stage_inputs.reached]
        per_process = ctx.world.gather(local)
        reached = sorted(index for indices in per_process for index in indices)
        if not reached:
            return False
        if not all(per_process):
            raise DataError(f"of the calibration batches that reach stage {stage.name!r}, none is process "
                            f"{per_process.index([])}'s ({ctx.world.size} processes take batches in turn); give more "
                            "calibration data that runs it, or use fewer processes")
        ctx.share_batches([reached.index(index) for index in local], len(reached))
        return True

    def _prepare(self, program: Program, ctx: Context, journal: Journal | None) -> list | None:
        """The passes' `prepare`, once: at the first stage that runs, or first thing when resuming, followed by the
        state the last committed block left (returned: its next block's calibration inputs)."""
        if not self._prepared:
            self._prepared = True
            for step in self.steps:
                with ctx.report.timed(step.name):
                    step.prepare(program, ctx)
        return journal.restore_state(self.steps, program, ctx.report) if journal is not None else None

    def _finish_block(self, block: Block, ctx: Context, journal: Journal | None) -> None:
        """The pipeline is done with the block: the program spills it (if streamed) and the journal commits it, with
        the state the next block starts from."""
        program = ctx.program
        program.finish_block(block)
        if journal is None:
            return
        report = ctx.report
        journal.commit(program, block, BlockState(
            steps=self.steps, quant_specs=program.quant_specs, rotations=program.rotations,
            config_updates=program.config_updates, tied_embeddings=program.tied_embeddings,
            ascend_metadata=program.ascend_metadata, layers=report.layers, notes=report.notes, details=report.details,
            metrics=report.metrics, seconds=report.seconds, cpu_seconds=report.cpu_seconds), ctx.inputs)

    def _leave_unreached(self, stage: Stage, ctx: Context, error: StageNotReached, journal: Journal | None) -> None:
        """A stage no calibration batch runs (text-only data and a vision tower) stays float if the config
        quantizes none of its layers; if it quantizes some, the data cannot calibrate them."""
        selected = [block.qualified(name) for block in stage.blocks for name, _ in block.module.named_modules()
                    if ctx.plan.scheme(block.qualified(name)) is not None]
        if selected:
            raise DataError(
                f"calibration.dataset {ctx.config.calibration.dataset!r} gives no input to stage {stage.name!r}, but the "
                f"config quantizes {len(selected)} of its layers (e.g. {selected[0]}): give calibration data that runs "
                "it (images for a vision tower: builtin:image-text or a .jsonl of {\"image\": ..., \"text\": ...} lines; "
                "see docs/calibration.md), or exclude those layers from the fake_quant rules"
            ) from error
        for block in stage.blocks:
            ctx.program.materialize(block)
            self._finish_block(block, ctx, journal)
        ctx.report.note(f"stage {stage.name!r}: no calibration batch runs it and the config quantizes none of its "
                        "layers, so it stays as loaded")

    def _run_block(self, block: Block, ctx: Context, progress: Progress,
                   next_inputs: Callable[[int, Any], BlockInput] | None) -> None:
        """Trace the block if needed, run every pass on it (saying which to `progress`), and replace its calibration
        inputs with the next block's: `next_inputs(batch, outputs)` of its outputs on each batch (none after the
        last block of a stage)."""
        ctx.program.materialize(block)
        moved = ctx.device.type != "cpu"
        if moved:
            block.module.to(ctx.device)
        if block.traced is None:
            with ctx.report.timed("trace"):
                args, kwargs = ctx.inputs[0]
                block.traced = trace_block(block.module, args, kwargs, name=block.name)
                propagate_shapes(block.traced.graph_module, block.traced.flatten_inputs(args, kwargs))
        if next_inputs is not None and ctx.config.calibration.propagate == "float":
            ctx.float_outputs = FloatOutputs(ctx.inputs.like(), next_inputs, len(ctx.inputs))
        for step in self.steps:
            if ctx.float_outputs is not None and not step.preserves_function:
                self._complete_float_outputs(block, ctx)
            progress.doing(f"{block.name}: {step.name}")
            checked = step.preserves_function and ctx.config.checks.equivalence
            reference = None
            if checked:  # the check's block runs are timed apart from the passes, so the report's profile covers them
                with ctx.report.timed("equivalence check"):
                    reference = self._reference(step, block, ctx)
            with ctx.report.timed(step.name):
                step.run_block(block, ctx)
            if reference is not None:
                with ctx.report.timed("equivalence check"):
                    self._check_equivalence(step, block, ctx, reference)
        if ctx.float_outputs is not None:
            self._complete_float_outputs(block, ctx)  # where every pass preserved the function
            ctx.inputs.close()
            ctx.inputs, ctx.float_outputs = ctx.float_outputs.store, None
        elif next_inputs is None:
            ctx.inputs.close()
        else:
            with torch.no_grad(), ctx.report.timed("block outputs"), reusing_within_runs(block.graph_module):
                following = ctx.inputs.like()
                for index, (args, kwargs) in enumerate(ctx.inputs.drain()):  # each batch released as the next is made
                    following.append(next_inputs(index, block.traced(*args, **kwargs)))
                ctx.inputs = following
        if moved:
            block.module.to("cpu")

    @staticmethod
    @torch.no_grad()
    def _complete_float_outputs(block: Block, ctx: Context) -> None:
        """Run the block, still as loaded, on the batches whose outputs no pass has offered to `ctx.float_outputs`."""
        missing = ctx.float_outputs.missing()
        if not missing:
            return
        with ctx.report.timed("block outputs"):
            for position in missing:
                args, kwargs = ctx.inputs[position]
                ctx.float_outputs.offer(position, block.traced(*args, **kwargs))

    @staticmethod
    def _check_rows(block: Block, ctx: Context) -> list[int] | None:
        """Which rows of the first batch the check runs: `checks.equivalence_tokens` worth, or None for the whole
        batch (also where the rows cannot be taken apart into a call the trace accepts). It compares the block before
        and after a pass on one and the same call, which any call the trace accepts serves; a subset of the rows
        is as strict and costs a fraction of the block runs."""
        batch = ctx.inputs[0]
        rows = spread_rows(row_count(batch), tokens_per_row(batch), ctx.config.checks.equivalence_tokens)
        if len(rows) == row_count(batch) or not block.traced.matches(*take_rows(batch, rows)):
            return None
        return rows

    @staticmethod
    def _check_call(ctx: Context, rows: list[int] | None) -> BlockInput:
        return ctx.inputs[0] if rows is None else take_rows(ctx.inputs[0], rows)

    def _reference(self, step: Pass, block: Block, ctx: Context) -> tuple[torch.Tensor, float, list[int] | None]:
        """What the block must still compute after `step`, on (rows of) the first calibration batch, how much that
        moves under a one-epsilon perturbation of the inputs (the sensitivity the tolerance scales with), and the rows."""
        rotation = step.stream_rotation()
        rows = self._check_rows(block, ctx)
        batch = self._check_call(ctx, rows)
        if rotation is not None:
            batch = rebind_hidden(batch, rotate_hidden(hidden_of(batch), rotation.T))
        calls = [batch] + [perturbed(batch, seed) for seed in range(PERTURBATION_SAMPLES)]
        with float_matmuls(block.graph_module):
            outputs = ctx.run(block, calls)
        if rotation is not None:
            outputs = [rotate_hidden(output, rotation) for output in outputs]
        reference = outputs[0]
        return reference, max(relative_error(output, reference) for output in outputs[1:]), rows

    def _check_equivalence(self, step: Pass, block: Block, ctx: Context,
                           reference: tuple[torch.Tensor, float, list[int] | None]) -> None:
        expected, sensitivity, rows = reference
        with float_matmuls(block.graph_module):  # the lowering is checked, not the integer matmul (modules.py)
            error = relative_error(ctx.run(block, [self._check_call(ctx, rows)])[0], expected)
        tolerance = equivalence_tolerance(ctx.config, ctx.program.dtype, sensitivity)
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
