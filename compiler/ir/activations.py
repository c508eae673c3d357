"""A block's calibration batches, held in memory up to a budget and spilled to disk beyond it (`memory.activations_gb`).

The pipeline keeps every calibration batch's block inputs (`BlockInput`: args and kwargs) while it works on a block,
and builds the next block's from that block's outputs. For a long calibration set on a wide model these are many
gigabytes; an `ActivationStore` keeps batches in memory while their tensors fit in its budget and writes the others
to a safetensors file each, read back whenever a pass or the block-output run reaches them. A batch read back is the
batch that was written: the same dtypes, shapes, strides and devices, and a tensor that two of its leaves share is
one tensor again, so everything computed from it is the same to the bit.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

from slimc.ir.capture import BlockInput
from slimc.ir.source import storable_tensors

GB = 2**30


@dataclass(frozen=True)
class _Slot:
    """Where a tensor leaf of a spilled batch went: key `key` of its file, as a flat span of its storage that
    `as_strided` turns back into the tensor (an expanded mask stays expanded, its stride-0 dimensions unstored)."""

    key: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    device: torch.device


@dataclass
class _Spilled:
    path: Path
    spec: pytree.TreeSpec
    leaves: list[Any]  # non-tensor leaves as they were; tensors as `_Slot`s


def batch_bytes(batch: Any) -> int:
    """What the batch's tensors hold in memory: each storage once (views of one tensor are not counted twice)."""
    storages = {}
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            storages[(leaf.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _span(tensor: torch.Tensor) -> torch.Tensor:
    """The part of the tensor's storage its elements lie in, as a 1-D tensor from its first element."""
    if tensor.numel() == 0:
        return tensor.new_empty(0)
    length = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.as_strided((length,), (1,), tensor.storage_offset())


class ActivationStore(Sequence[BlockInput]):
    """Calibration batches in order, at most `budget_bytes` of their tensors in memory (None: all), the rest in
    files under `directory` (one a batch, removed when the batch is replaced or the store closed). Batches given
    back are on `device` (None: where they were)."""

    def __init__(self, budget_bytes: int | None = None, directory: Path | None = None,
                 device: torch.device | None = None) -> None:
        if budget_bytes is not None and directory is None:
            raise ValueError("a store with a budget needs a directory to spill into")
        self.budget_bytes = budget_bytes
        self.directory = directory
        self.device = device
        self.resident_bytes = 0  # what the batches kept in memory hold
        self.spilled_bytes = 0  # what the files hold
        self._entries: list[BlockInput | _Spilled] = []
        self._sizes: list[int] = []

    def like(self) -> ActivationStore:
        """An empty store with this one's budget, directory and device (for the next block's batches)."""
        return ActivationStore(self.budget_bytes, self.directory, self.device)

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> BlockInput: ...
    @overload
    def __getitem__(self, index: slice) -> list[BlockInput]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry = self._entries[index]
        return _read(entry) if isinstance(entry, _Spilled) else entry

    def __iter__(self) -> Iterator[BlockInput]:
        # by index, so at most one spilled batch is read in at a time, and a batch replaced while iterating is fine
        return (self[index] for index in range(len(self)))

    def append(self, batch: BlockInput) -> None:
        self._entries.append(None)
        self._sizes.append(0)
        self[len(self) - 1] = batch

    def extend(self, batches: Iterable[BlockInput]) -> None:
        for batch in batches:
            self.append(batch)

    def __setitem__(self, index: int, batch: BlockInput) -> None:
        """Replace batch `index`: kept in memory if it fits in what the budget has left, else written to its file."""
        self._drop(index)
        if self.device is not None:
            batch = pytree.tree_map(lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x, batch)
        size = batch_bytes(batch)
        if self.budget_bytes is None or self.resident_bytes + size <= self.budget_bytes:
            self._entries[index] = batch
            self.resident_bytes += size
        else:
            self._entries[index] = self._write(batch)
            self.spilled_bytes += size
        self._sizes[index] = size

    def map_each(self, function: Callable[[int, BlockInput], BlockInput]) -> None:
        """Replace each batch i by function(i, batch), one batch at a time."""
        for index, batch in enumerate(self):
            self[index] = function(index, batch)

    def drain(self) -> Iterator[BlockInput]:
        """Each batch in order, released once the next is asked for (its memory and its file): what the block-output
        run reads while it fills the next block's store, so the two together stay within about one budget."""
        for index in range(len(self)):
            batch = self[index]
            self._drop(index)
            yield batch
        self.close()

    def close(self) -> None:
        """Release every batch and remove the files."""
        for index in range(len(self)):
            self._drop(index)
        self._entries, self._sizes = [], []

    @property
    def spilled(self) -> int:
        """How many batches are on disk."""
        return sum(isinstance(entry, _Spilled) for entry in self._entries)

    def _drop(self, index: int) -> None:
        entry = self._entries[index]
        if isinstance(entry, _Spilled):
            entry.path.unlink(missing_ok=True)
            self.spilled_bytes -= self._sizes[index]
        elif entry is not None:
            self.resident_bytes -= self._sizes[index]
        self._entries[index] = None
        self._sizes[index] = 0

    def _write(self, batch: BlockInput) -> _Spilled:
        leaves, spec = pytree.tree_flatten(batch)
        tensors: dict[str, torch.Tensor] = {}
        slots: dict[int, _Slot] = {}  # a tensor two leaves share is written once
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and id(leaf) not in slots:
                key = str(len(slots))
                tensors[key] = _span(leaf.detach())
                slots[id(leaf)] = _Slot(key, tuple(leaf.shape), leaf.stride(), leaf.device)
        # a name no other store in the directory holds (the next block's store fills while this one is read)
        handle, name = tempfile.mkstemp(prefix="batch-", suffix=".safetensors", dir=self.directory)
        os.close(handle)
        path = Path(name)
        save_file(storable_tensors(tensors), path)
        return _Spilled(path, spec, [slots[id(leaf)] if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])


def _read(entry: _Spilled) -> BlockInput:
    flat = load_file(entry.path)
    tensors: dict[str, torch.Tensor] = {}

    def restore(leaf: Any) -> Any:
        if not isinstance(leaf, _Slot):
            return leaf
        if leaf.key not in tensors:
            tensors[leaf.key] = flat[leaf.key].to(leaf.device).as_strided(leaf.shape, leaf.stride)
        return tensors[leaf.key]

    return pytree.tree_unflatten([restore(leaf) for leaf in entry.leaves], entry.spec)


class FloatOutputs:
    """With `calibration.propagate: float`, the next block's calibration inputs: made by `next_inputs(position,
    outputs)` from the outputs of the block as loaded (before any pass changes what it computes) on each of its
    `count` batches, in order. A pass that runs the unchanged block whole over the batches anyway (smoothing's
    statistics) offers its outputs, which spares the pipeline a run of its own; the pipeline runs what is missing."""

    def __init__(self, store: ActivationStore, next_inputs: Callable[[int, Any], BlockInput], count: int) -> None:
        self.store = store
        self._next_inputs = next_inputs
        self._count = count

    def wants(self, position: int) -> bool:
        return position == len(self.store) < self._count

    def offer(self, position: int, outputs: Any) -> None:
        """The block graph's outputs on batch `position`: taken if it is the next one wanted, else ignored."""
        if self.wants(position):
            self.store.append(self._next_inputs(position, outputs))

    def missing(self) -> range:
        return range(len(self.store), self._count)
