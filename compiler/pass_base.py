"""The pass contract and Context.

A pass is a pipeline step (`slimc.config.steps.PassStep`: typed parameters, ordering declarations, the
schemes it assigns) that also works on blocks, one at a time. It is registered by name with `register_pass`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from slimc.config.steps import PassStep, register
from slimc.distributed import SINGLE, World
from slimc.ir.activations import FloatOutputs
from slimc.ir.calls import block_output, hidden_of, rebind_hidden, rotate_hidden
from slimc.ir.capture import BlockInput, StageInputs
from slimc.numerics.observers import observed_batch
from slimc.plan import QuantPlan
from slimc.report import RunReport

if TYPE_CHECKING:
    from slimc.config import SlimcConfig
    from slimc.ir import Block, Program

class Pass(PassStep):
    """Base class of passes: a `PassStep` (``requires``, ``runs_before``, ``check``, ``scheme_for``) and

    - ``preserves_function``: the pass changes weights but not what the block computes, so the
      pipeline checks the block's output before and after it (the equivalence check);
    - ``prepare`` / ``finish``: once, before the first block and after the last;
    - ``run_block``: the work, on one block whose calibration inputs are in ``ctx``.
    """

    preserves_function: ClassVar[bool] = False

    def prepare(self, program: Program, ctx: Context) -> None:
        """Once, before the first block."""

    def run_block(self, block: Block, ctx: Context) -> None:
        raise NotImplementedError

    def finish(self, program: Program, ctx: Context) -> None:
        """Once, after the last block."""

    def stream_rotation(self) -> torch.Tensor | None:
        """The orthogonal matrix R this pass applies to the hidden states passed between blocks, if any.

        Such a pass rotates the calibration inputs in `prepare`; the equivalence check then
        expects block(x) == block_before(x Rᵀ) R.
        """
        return None


def register_pass(name: str):
    """Class decorator: make a pass available to YAML pipelines under `name`."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass({name!r}) must decorate a subclass of slimc.passes.Pass")
        register(name, cls)
        return cls

    return decorate


class Context:
    """What a pass sees while working on a block: the program, the config, the quantization plan (resolved
    from the steps before any block runs), the block's inputs: this process's share of the stage's calibration
    batches (`batch_ids`: their positions among all `batch_count` batches that reach the stage, over every process),
    whose statistics `world` reduces over the processes."""

    def __init__(self, program: Program, config: SlimcConfig, steps: Sequence[Pass], report: RunReport,
                 world: World = SINGLE) -> None:
        self.program = program
        self.world = world
        self.batch_count = 0
        self._batch_ids: list[int] | None = None
        self.config = config
        self.steps = steps
        self.report = report
        self.plan = QuantPlan.resolve(program, config, steps)
        self.device = torch.device(config.model.device)
        # a list, or an ActivationStore that keeps some of them on disk (memory.activations_gb): read them in order
        self.inputs: Sequence[BlockInput] = []
        # How the stage's later blocks are called, from the block before's outputs (`next_inputs`), while the passes
        # prepare: for a pass that runs the whole stage itself (rotate's learning); None when resuming.
        self.stage_inputs: StageInputs | None = None
        # With calibration.propagate "float", while a block runs: the next block's inputs, from the block as loaded
        self.float_outputs: FloatOutputs | None = None

    @torch.no_grad()
    def run(self, block: Block, batches: Sequence[BlockInput] | None = None, keep: int | None = None) -> list[torch.Tensor]:
        """The block graph's outputs (see `block_output`) on (some of) its calibration inputs, of the first `keep`
        batches only if given (a run for what hooks record need not hold every output); on all of them, observers
        draw their samples as for each batch's index (`observed_batch`), the same in any number of processes."""
        outputs = []
        if batches is not None:
            for args, kwargs in batches:
                output = block_output(block.traced(*args, **kwargs))
                if keep is None or len(outputs) < keep:
                    outputs.append(output)
            return outputs
        for index, (args, kwargs) in zip(self.batch_ids, self.inputs, strict=True):
            with observed_batch(index):
                output = block_output(block.traced(*args, **kwargs))
            if keep is None or len(outputs) < keep:
                outputs.append(output)
        return outputs

    @property
    def batch_ids(self) -> list[int]:
        if self._batch_ids is None:  # a Context made for the inputs it holds (one process)
            return list(range(len(self.inputs)))
        return self._batch_ids

    def share_batches(self, ids: list[int], count: int) -> None:
        """The stage's inputs are the batches at positions `ids` of the `count` batches that reach it."""
        self._batch_ids, self.batch_count = ids, count

    def leading(self, count: int) -> list[BlockInput]:
        """This process's inputs among the first `count` calibration batches (what a search or an error measure
        runs on; reduce what they give with `world.worst`)."""
        return [self.inputs[position] for position, index in enumerate(self.batch_ids) if index < count]  # reads only those

    def rotate_stream(self, rotation: torch.Tensor) -> None:
        """Rotate the hidden states of the current calibration inputs: x -> x R."""
        for index, batch in enumerate(self.inputs):  # in place, one batch at a time (a store keeps its spilled ones so)
            self.inputs[index] = rebind_hidden(batch, rotate_hidden(hidden_of(batch), rotation))
