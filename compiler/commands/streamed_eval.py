"""Perplexity computed block by block, for models larger than memory (docs/scale.md, "Evaluating").

The evaluation batches run through the embeddings once; then each block in turn is read (from the
checkpoint's shards for the float model, from the written files for a quantized one), run on every batch, and
dropped, the hidden states of all batches kept between blocks in the model's dtype; the model's own code after
the blocks (final norm, head) then gives the logits. So memory holds one block, what lies outside the blocks
and the batches' activations, whatever the depth. Each block computes what it computes inside the whole
model, on the same inputs, so the perplexity is `perplexity`'s on the whole model.

Where the model's forward goes from one block to the next, stand-ins sit in the blocks' places: they return
their input's hidden states (so a capture learns which block inputs come from the previous block's output and
which from before the first, as the compile's capture does), or, for the head, the last block's outputs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc.commands.compile import load_streamed, model_dtype
from slimc.config import SlimcConfig
from slimc.errors import DataError
from slimc.frontends import Frontend
from slimc.ir import Block, Program
from slimc.ir.calls import hidden_of
from slimc.ir.capture import capture_stage
from slimc.ir.source import ModelSource
from slimc.progress import tracked

ReadBlock = Callable[[Block], contextlib.AbstractContextManager[nn.Module]]


class StandIn(nn.Module):
    """Sits in a block's place: returns the hidden states it is given, or `output` once set."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output if self.output is not None else hidden_of((args, kwargs))


@contextlib.contextmanager
def standing_in(blocks: list[Block]) -> Iterator[list[StandIn]]:
    """Stand-ins in the blocks' places while inside."""
    stand_ins = [StandIn() for _ in blocks]
    try:
        for block, stand_in in zip(blocks, stand_ins, strict=True):
            block.container[block.index] = stand_in
        yield stand_ins
    finally:
        for block in blocks:
            block.container[block.index] = block.module


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """The summed next-token negative log-likelihood of windows `input_ids` (n, seq_len) under `logits`
    (n, seq_len, vocab), in float32, and the number of tokens it sums over."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll.item(), targets.numel()


def streamed_perplexity(program: Program, read: ReadBlock, input_ids: torch.LongTensor, *, batch_size: int = 4,
                        progress: bool = False) -> float:
    """`perplexity` of the program's model on the windows `input_ids` (n, seq_len), its blocks (on the meta
    device) run one at a time: `read(block)` gives the block's module, with its weights, while inside."""
    return perplexity_of(streamed_nlls(program, read, list(input_ids.split(batch_size)), progress=progress))


def perplexity_of(nlls: list[tuple[float, int]]) -> float:
    """exp of the mean negative log-likelihood of (summed NLL, tokens) pairs: every token weighs the same."""
    return math.exp(sum(nll for nll, _ in nlls) / sum(tokens for _, tokens in nlls))


@torch.no_grad()
def streamed_nlls(program: Program, read: ReadBlock, batches: list[torch.LongTensor], *,
                  progress: bool = False) -> list[tuple[float, int]]:
    """`next_token_nll` of each batch of windows, the program's blocks (on the meta device) run one at a time:
    `read(block)` gives the block's module, with its weights, while inside."""
    if len(program.stages) != 1:
        raise DataError(f"streamed evaluation runs models of one stage of blocks; this one has {len(program.stages)}: "
                        "set memory.stream_blocks: false to evaluate it whole")
    blocks = program.blocks
    batches = [{"input_ids": ids} for ids in batches]
    model = program.model
    with standing_in(blocks) as stand_ins:
        stage = capture_stage(stand_ins, [functools.partial(program.call, model, batch) for batch in batches])
    if not stage.uniform:
        raise DataError("streamed evaluation needs every block to take the previous block's hidden states and inputs "
                        "shared by all blocks; this model gives its blocks inputs of their own: set "
                        "memory.stream_blocks: false to evaluate it whole")
    inputs = list(stage.first)
    for position, block in enumerate(tracked(blocks, "perplexity", "block", shown=progress)):
        with read(block) as module:
            for b, (args, kwargs) in enumerate(inputs):
                output = module(*args, **kwargs)
                if not isinstance(output, torch.Tensor):
                    raise DataError(f"block {block.name} returns {type(output).__name__}, not its hidden states: "
                                    "set memory.stream_blocks: false to evaluate the model whole")
                inputs[b] = stage.next_inputs(position + 1, b, output) if position + 1 < len(blocks) else output
    nlls = []
    with standing_in(blocks) as stand_ins:
        for batch, hidden in zip(batches, inputs, strict=True):
            for stand_in in stand_ins:
                stand_in.output = hidden
            output = program.call(model, batch)
            nlls.append(next_token_nll(getattr(output, "logits", output), batch["input_ids"]))
    return nlls


@contextlib.contextmanager
def streamed_float_program(config: SlimcConfig, source: ModelSource, frontend: Frontend) -> Iterator[Program]:
    """The float model in the compile's dtype, its blocks left on the meta device and read from the checkpoint's
    shards when `Program.reading` asks (slimc.ir.streaming); what the loader converts is kept in a temporary
    folder while inside."""
    with tempfile.TemporaryDirectory(prefix="slimc-eval-") as scratch:
        model, weights = load_streamed(config, source, frontend, model_dtype(config, source), Path(scratch))
        program = frontend.build(source, model)
        program.weights = weights
        yield program


def reading_float(program: Program) -> ReadBlock:
    """`read` for a program whose blocks stream from the checkpoint."""

    @contextlib.contextmanager
    def read(block: Block) -> Iterator[nn.Module]:
        with program.reading(block):
            yield block.module

    return read
