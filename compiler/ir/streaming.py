"""Block weights read from the checkpoint when a block is needed, instead of the whole model at load.

A streamed model is loaded by its library (transformers) with every block offloaded to disk through a
`device_map`: the library converts each tensor as it loads it (fused MoE experts, renamed vision-language keys,
the omni `thinker.` prefix) and writes only the converted ones to the offload folder; the others it reads back
from the checkpoint's own shards. Everything outside the blocks (embeddings, final norm, head, rotary tables)
loads as usual. The blocks' parameters stay on the meta device until `BlockWeights.materialize` reads them, so
host memory holds the blocks the pipeline has worked on (lowered, so smaller) and the one it works on, not the
float model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from slimc.ir.hooks import temporary_hooks

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


def is_on_meta(module: nn.Module) -> bool:
    return any(tensor.is_meta for tensor in [*module.parameters(), *module.buffers()])


class BlockWeights:
    """The offloaded blocks' tensors by qualified name, read on demand (`loader`: the library's offload index)."""

    def __init__(self, loader: Mapping[str, torch.Tensor]) -> None:
        self.loader = loader

    @classmethod
    def detach_from(cls, model: nn.Module) -> BlockWeights:
        """The offloaded weights of a model the library dispatched with a disk device map; the dispatch hooks,
        which would read every block's weights at each forward and drop them after, are removed."""
        loader = next((hook.weights_map.dataset for module in model.modules()
                       if (hook := getattr(module, "_hf_hook", None)) is not None
                       and getattr(hook, "weights_map", None) is not None), None)
        remove_hook_from_module(model, recurse=True)
        if loader is None:
            raise ValueError("the model has no offloaded weights")
        return cls(loader)

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Read every tensor of `module` (qualified name `prefix`) still on the meta device."""
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                value = self.loader[f"{prefix}.{name}"]
                set_module_tensor_to_device(module, name, "cpu", value=value, dtype=value.dtype)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Drop the module's tensors (back to the meta device); `materialize` reads them again."""
        module.to("meta")

    @contextlib.contextmanager
    def streamed(self, blocks: Sequence[tuple[str, nn.Module]]) -> Iterator[None]:
        """Run forwards through blocks still on the meta device: each is read just before it runs and dropped
        just after (a forward that stops early leaves at most one block read)."""
        pending = [(prefix, module) for prefix, module in blocks if is_on_meta(module)]
        read: list[nn.Module] = []

        def before(prefix: str, module: nn.Module) -> None:
            self.materialize(module, prefix)
            read.append(module)

        def after(module: nn.Module) -> None:
            self.release(module)
            read.remove(module)

        try:
            with temporary_hooks() as hooks:
                for prefix, module in pending:
                    hooks.before(module, lambda m, args, prefix=prefix: before(prefix, m))
                    hooks.after(module, lambda m, args, output: after(m))
                yield
        finally:
            for module in read:
                self.release(module)
