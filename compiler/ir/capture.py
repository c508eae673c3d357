"""A stage's block inputs: captured from forwards of the model, then carried from block to block.

A stage is a list of blocks the model calls in order (decoder layers, vision blocks, DiT double
blocks). The pipeline needs each block's `(args, kwargs)` on every calibration batch, computed
from the previous block's *quantized* outputs, so it cannot simply record them from a float
forward. Instead one forward with hooks on every block of the stage learns, for each input leaf
of block i+1, where it comes from:

- `Carried(k)`: the same object as leaf k of block i's output (hidden states; both streams of a
  Flux double block, whatever their order);
- `Injected(k, delta)`: leaf k of block i's output plus something the model adds between the
  blocks (Qwen3-VL deepstack features); `delta` is recorded per batch;
- `FromFirst(j)`: the same object as leaf j of the stage's first block inputs (position
  embeddings, masks shared by every layer);
- anything else is kept as recorded (per-block inputs such as windowed-attention `cu_seqlens`).

Where every later block needs only `Carried` and `FromFirst` leaves (a uniform stage, e.g. every
decoder LLM), later batches stop at the first block and its inputs are all that is kept.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from slimc.errors import TraceError
from slimc.ir.hooks import temporary_hooks
from slimc.ir.traced_block import normalise_inputs

BlockInput = tuple[tuple, dict[str, Any]]
HIDDEN_KEYS = ("hidden_states", "x")


@dataclass(frozen=True)
class Carried:
    index: int


@dataclass(frozen=True)
class FromFirst:
    index: int


@dataclass(frozen=True)
class Injected:
    index: int
    delta: torch.Tensor


@dataclass
class Template:
    """One block call with its leaves replaced by where they come from."""

    spec: pytree.TreeSpec
    leaves: list[Any]

    def fill(self, outputs: list[Any], first: list[Any]) -> BlockInput:
        values = []
        for leaf in self.leaves:
            if isinstance(leaf, Carried):
                values.append(outputs[leaf.index])
            elif isinstance(leaf, FromFirst):
                values.append(first[leaf.index])
            elif isinstance(leaf, Injected):
                base = outputs[leaf.index]
                values.append(base + leaf.delta.to(base.device, base.dtype))
            else:
                values.append(leaf)
        return pytree.tree_unflatten(values, self.spec)

    @property
    def uniform(self) -> bool:
        return all(isinstance(leaf, Carried | FromFirst) or not isinstance(leaf, torch.Tensor | Injected) for leaf in self.leaves)


class StageNotReached(TraceError):
    """No calibration batch runs the stage (text-only data and a vision tower)."""


class _StopForward(Exception):
    """Raised by a capture hook once the stage has given everything it needs."""


def _is_hidden_path(path: tuple) -> bool:
    top, first = path[0], path[1]
    return (top.idx == 0 and getattr(first, "idx", None) == 0) or getattr(first, "key", None) in HIDDEN_KEYS


def _template(call: BlockInput, previous: list[Any], first: list[Any]) -> Template:
    """Where each leaf of `call` comes from: the previous block's output leaves, the first block's inputs, or itself."""
    with_paths, spec = pytree.tree_flatten_with_path(normalise_inputs(*call))
    by_output = {id(v): k for k, v in enumerate(previous) if isinstance(v, torch.Tensor)}
    by_first = {id(v): j for j, v in enumerate(first) if isinstance(v, torch.Tensor)}
    leaves: list[Any] = []
    for path, leaf in with_paths:
        if not isinstance(leaf, torch.Tensor):
            leaves.append(leaf)
        elif id(leaf) in by_output:
            leaves.append(Carried(by_output[id(leaf)]))
        elif id(leaf) in by_first:
            leaves.append(FromFirst(by_first[id(leaf)]))
        elif _is_hidden_path(path) and (k := _same_shape(previous, leaf)) is not None:
            leaves.append(Injected(k, (leaf - previous[k]).detach()))
        else:
            leaves.append(leaf.detach())
    return Template(spec, leaves)


def _same_shape(outputs: list[Any], leaf: torch.Tensor) -> int | None:
    return next((k for k, v in enumerate(outputs) if isinstance(v, torch.Tensor) and v.shape == leaf.shape), None)


def flat_leaves(value: Any) -> list[Any]:
    return pytree.tree_leaves(value)


class StageInputs:
    """Every block's inputs of one stage, on every batch: the first block's as captured (`first`: a list, or an
    `ActivationStore` that the pipeline hands on as the first block's inputs), later ones rebuilt from the previous
    block's outputs by `next_inputs`, with the leaves they take from the first block's inputs (`shared`: per batch,
    those leaves; None where no later block takes one). `reached`: which of the runs these batches are."""

    def __init__(self, first: Sequence[BlockInput], templates: list[list[Template]] | list[Template], uniform: bool,
                 reached: list[int], shared: list[list[Any]]) -> None:
        self.first = first
        self.reached = reached
        self._templates = templates  # uniform: one per block (from batch 0); else per batch, per block
        self.uniform = uniform
        self._shared = shared

    def next_inputs(self, block_index: int, batch: int, outputs: Any) -> BlockInput:
        """The inputs of block `block_index` (>= 1) on `batch`, given block_index-1's outputs on it."""
        return self._batch_templates(batch)[block_index - 1].fill(flat_leaves(outputs), self._shared[batch])

    def _batch_templates(self, batch: int) -> list[Template]:
        return self._templates if self.uniform else self._templates[batch]


def _shared_leaves(call: BlockInput, templates: list[Template]) -> list[Any]:
    """The leaves of the first block's `call` that later blocks take (`FromFirst`), the others None: kept apart, so
    that the first block's inputs can be released (or spilled) while the stage still needs these."""
    taken = {leaf.index for template in templates for leaf in template.leaves if isinstance(leaf, FromFirst)}
    return [leaf if index in taken else None for index, leaf in enumerate(pytree.tree_leaves(normalise_inputs(*call)))]


def _record(blocks: list[nn.Module], run: Callable[[], Any], full: bool) -> tuple[BlockInput, list[Template]] | None:
    """One forward: the first block's inputs and, if `full`, the templates of the later blocks;
    None if the batch never reaches the stage (a text-only batch and a vision tower)."""
    calls: list[BlockInput | None] = [None] * len(blocks)
    templates: list[Template] = []
    state: dict[str, Any] = {}

    def on_input(index: int, args: tuple, kwargs: dict) -> None:
        if calls[index] is not None:
            raise TraceError(f"block {index} of the stage ran twice in one forward; blocks must run once, in order")
        calls[index] = (tuple(args), dict(kwargs))
        if index == 0:
            state["first"] = pytree.tree_leaves(normalise_inputs(*calls[0]))
            if not full:
                raise _StopForward
        else:
            if "previous" not in state or state["previous_index"] != index - 1:
                raise TraceError(f"block {index} of the stage ran before block {index - 1} finished; "
                                 "blocks must run in the order of the stage")
            templates.append(_template(calls[index], state.pop("previous"), state["first"]))
            calls[index] = ((), {})  # its template holds what is needed

    def on_output(index: int, output: Any) -> None:
        state["previous"], state["previous_index"] = flat_leaves(output), index
        if index == len(blocks) - 1:
            raise _StopForward

    with temporary_hooks() as hooks, torch.no_grad():
        for index, block in enumerate(blocks):
            hooks.before(block, lambda m, a, k, i=index: on_input(i, a, k), with_kwargs=True)
            hooks.after(block, lambda m, a, o, i=index: on_output(i, o))
        try:
            run()
        except _StopForward:
            pass
    if calls[0] is None:
        return None
    if full and len(templates) != len(blocks) - 1:
        ran = sum(c is not None for c in calls)
        raise TraceError(f"a calibration batch reached {ran} of the stage's {len(blocks)} blocks; "
                         "the inputs must run the whole stage (e.g. include an image for the vision tower)")
    return calls[0], templates


def capture_stage(blocks: list[nn.Module], runs: list[Callable[[], Any]], *, stage: str = "stage",
                  first: MutableSequence[BlockInput] | None = None) -> StageInputs:
    """Run the model once per batch (`runs[b]()`), recording what the stage's blocks need; the first block's inputs
    are appended to `first` as each batch gives them (a new list if None).

    Batches that never reach the stage are left out of it (`StageInputs.first` lists the others)."""
    firsts: MutableSequence[BlockInput] = [] if first is None else first
    per_batch: list[list[Template]] = []
    shared: list[list[Any]] = []
    reached: list[int] = []
    uniform = None
    for index, run in enumerate(runs):
        recorded = _record(blocks, run, full=len(blocks) > 1 and not uniform)
        if recorded is None:
            continue
        reached.append(index)
        per_batch.append(recorded[1])
        if uniform is None:
            uniform = all(t.uniform for t in recorded[1])
        shared.append(_shared_leaves(recorded[0], per_batch[0] if uniform else recorded[1]))
        firsts.append(recorded[0])
    if not firsts:
        raise StageNotReached(f"no calibration batch reaches {stage}; give calibration data that runs it "
                         "(e.g. images for a vision tower, audio for an audio encoder)")
    return StageInputs(firsts, per_batch[0] if uniform else per_batch, bool(uniform), reached, shared)
