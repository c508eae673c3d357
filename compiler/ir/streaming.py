"""Block weights read from the checkpoint when a block is needed, instead of the whole model at load.

A streamed model is loaded by its library (transformers) with every block offloaded to disk through a
`device_map`: the library converts each tensor as it loads it (fused MoE experts, renamed vision-language keys,
the omni `thinker.` prefix) and writes only the converted ones to the offload folder; the others it reads back
from the checkpoint's own shards. Everything outside the blocks (embeddings, final norm, head, rotary tables)
loads as usual. The blocks' parameters stay on the meta device until `BlockWeights.materialize` reads them.

Once the pipeline is done with a block, its lowered tensors are spilled to a file of their own (`spill`) and the
block goes back to the meta device; later forwards and the exports read it from there, one block at a time. So
host memory holds the block being worked on and what lies outside the blocks, whatever the depth of the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import load_file, save_file
from torch import nn

from slimc.ir.hooks import temporary_hooks
from slimc.ir.source import storable_tensors

OFFLOADED = "disk"


def offload_device_map(model: nn.Module, blocks: Sequence[str]) -> dict[str, str]:
    """A device map placing each block (a qualified module name) on disk and everything else on the CPU, with
    no two entries nested (the loader's dispatch needs a partition of the model)."""
    blocks = set(blocks)
    device_map: dict[str, str] = {}

    def place(prefix: str, module: nn.Module) -> None:
        if prefix in blocks:
            device_map[prefix] = OFFLOADED
            return
        if not any(prefix == "" or block.startswith(prefix + ".") for block in blocks):
            device_map[prefix] = "cpu"
            return
        own = [name for name, _ in module.named_parameters(recurse=False)] + \
              [name for name, _ in module.named_buffers(recurse=False)]
        for name in own:
            device_map[f"{prefix}.{name}" if prefix else name] = "cpu"
        for name, child in module.named_children():
            place(f"{prefix}.{name}" if prefix else name, child)

    place("", model)
    return device_map


def _keep() -> None:
    """What discarding a spill directory these weights do not own does."""


def drop_own_forward(module: nn.Module) -> None:
    """Remove what removing the dispatch hooks leaves behind: `forward` set on the instance to the module's own
    bound class method. That is a reference cycle (module -> bound method -> module), so a module the pipeline
    replaces (a float Linear, once lowered) would hold its weights until a garbage collection happens to run,
    and memory grew by about one float block per block."""
    own = module.__dict__.get("forward")
    if getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> None:
    """Give the memory freed with a block back to the system. glibc keeps freed chunks below its mmap threshold
    (which rises to 32 MiB as large tensors are freed) in its heaps for reuse; interleaved with what stays
    allocated, a block's working copies then leave holes the next block does not always fit, and the process
    grew a little with each block."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def is_on_meta(module: nn.Module) -> bool:
    return any(tensor.is_meta for tensor in [*module.parameters(), *module.buffers()])


class BlockWeights:
    """The offloaded blocks' tensors by qualified name, read on demand (`loader`: the library's offload index)."""

    def __init__(self, loader: Mapping[str, torch.Tensor]) -> None:
        self.loader = loader
        self.spill_directory: Path | None = None
        self.spilled: dict[str, Path] = {}  # block name -> the file of its tensors, once the pipeline is done with it

    def spill_into(self, directory: Path, *, owned: bool = True) -> None:
        """Spill finished blocks into `directory` (existing). If `owned`, these weights own it: it is removed when
        they are garbage-collected or the process ends, since a compiled Program reads its blocks from there;
        a compile's journal (slimc.journal) is not owned, since it must outlive a killed process."""
        self.spill_directory = directory
        self.discard_spill = weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True) if owned else _keep

    def adopt(self, prefix: str, path: Path) -> None:
        """Read the block `prefix` from `path`, a spill file an earlier process wrote (a resumed compile)."""
        self.spilled[prefix] = path

    def move_spill(self, directory: Path) -> None:
        """Move the spill files into `directory` (existing, on the same file system), which these weights then own."""
        for prefix, path in self.spilled.items():
            self.spilled[prefix] = directory / path.name
            os.replace(path, self.spilled[prefix])
        self.spill_into(directory)

    @classmethod
    def detach_from(cls, model: nn.Module) -> BlockWeights:
        """The offloaded weights of a model the library dispatched with a disk device map; the dispatch hooks,
        which would read every block's weights at each forward and drop them after, are removed."""
        loader = next((hook.weights_map.dataset for module in model.modules()
                       if (hook := getattr(module, "_hf_hook", None)) is not None
                       and getattr(hook, "weights_map", None) is not None), None)
        remove_hook_from_module(model, recurse=True)
        for module in model.modules():
            drop_own_forward(module)
        if loader is None:
            raise ValueError("the model has no offloaded weights")
        return cls(loader)

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Read every tensor of `module` (qualified name `prefix`) still on the meta device: from its spill file
        once spilled, else from the checkpoint."""
        spilled = load_file(self.spilled[prefix]) if prefix in self.spilled else None
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                value = spilled[name] if spilled is not None else self.loader[f"{prefix}.{name}"]
                set_module_tensor_to_device(module, name, "cpu", value=value, dtype=value.dtype)

    def spill(self, module: nn.Module, prefix: str) -> None:
        """Write the finished block's tensors (lowered and float, buffers included) to its spill file and drop them."""
        if self.spill_directory is None:
            raise RuntimeError("BlockWeights.spill_into was not called")
        path = self.spill_directory / f"{prefix}.safetensors"
        save_file(storable_tensors(dict([*module.named_parameters(), *module.named_buffers()])), path)
        self.spilled[prefix] = path
        self.release(module)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Drop the module's tensors (back to the meta device); `materialize` reads them again."""
        module.to("meta")
        return_freed_memory()

    @contextlib.contextmanager
    def streamed(self, blocks: Sequence[tuple[str, nn.Module, nn.Module | None]]) -> Iterator[None]:
        """Run forwards through blocks on the meta device, each given as (name, module, the module that may run in
        its place, e.g. its graph module, sharing its leaves): each is read just before it runs and dropped just
        after (a forward that stops early leaves at most one block read)."""
        pending = [(prefix, module, stand_in) for prefix, module, stand_in in blocks if is_on_meta(module)]
        read: list[nn.Module] = []

        def before(prefix: str, module: nn.Module) -> None:
            self.materialize(module, prefix)
            read.append(module)

        def after(module: nn.Module) -> None:
            self.release(module)
            read.remove(module)

        try:
            with temporary_hooks() as hooks:
                for prefix, module, stand_in in pending:
                    for runner in (module, stand_in) if stand_in is not None else (module,):
                        hooks.before(runner, lambda m, args, prefix=prefix, module=module: before(prefix, module))
                        hooks.after(runner, lambda m, args, output, module=module: after(module))
                yield
        finally:
            for module in read:
                self.release(module)
