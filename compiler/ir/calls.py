"""What a block call takes and returns: its hidden states in and out, rotated, rebound, moved, perturbed."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._pytree import tree_map

from slimc.ir.capture import BlockInput


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


def row_count(inputs: BlockInput) -> int:
    """How many rows (sequences, samples) the call's hidden states hold: their first dimension, when they also
    have positions and channels; 1 when they are one sequence of tokens (a vision tower's patches)."""
    hidden = hidden_of(inputs)
    return hidden.shape[0] if hidden.dim() >= 3 else 1


def tokens_per_row(inputs: BlockInput) -> int:
    """The positions in one row of the call: the hidden states' elements over their channels and rows."""
    hidden = hidden_of(inputs)
    return hidden.numel() // hidden.shape[-1] // row_count(inputs)


def spread_rows(rows: int, tokens_per_row: int, tokens: int | None) -> list[int]:
    """Which of a batch's `rows` to run for `tokens` tokens: as many whole rows as they fill (at least one; all of
    them for None), evenly spread over the batch, the same every time."""
    keep = rows if tokens is None else min(rows, max(1, tokens // tokens_per_row))
    return [i * rows // keep for i in range(keep)]


def take_rows(inputs: BlockInput, rows: list[int]) -> BlockInput:
    """The call on some rows of its batch: every tensor whose first dimension is the row count taken at `rows`,
    the others (rotary tables and position ids shared by the rows) kept. A tensor that holds something else
    along a first dimension of the same size would be cut too: callers check the result (`TracedBlock.matches`,
    and the rows' outputs against the whole call's)."""
    size = row_count(inputs)
    index = torch.tensor(rows, device=hidden_of(inputs).device)
    return tree_map(lambda x: x.index_select(0, index) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == size else x,
                    inputs)
