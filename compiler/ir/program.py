"""The IR: a Program is the model cut into Blocks, each with its traced fx graph.

The Program owns the model (and so every weight); each Block's graph module shares the
block's leaf modules, so a weight edited through one is edited in both. A pass that swaps a
leaf (e.g. lowering a Linear) goes through `Block.replace_leaf`, which keeps both trees in step.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from slimc.ir.streaming import is_on_meta
from slimc.schemes import QuantScheme

if TYPE_CHECKING:
    from slimc.ir.source import ModelSource
    from slimc.ir.streaming import BlockWeights
    from slimc.ir.traced_block import TracedBlock

@dataclass
class QuantSpec:
    """The quantization annotation of one Linear (or fused experts module), keyed by its qualified name."""

    scheme_name: str
    scheme: QuantScheme
    weight_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    output_error: float | None = None

    @property
    def calibrated(self) -> bool:
        """Whether weight scales exist: per parameter, "weight" for a Linear, one per fused experts weight."""
        return bool(self.weight_qparams)


@dataclass
class Block:
    """One repeated unit of the model (a decoder layer, a vision block, a DiT block).

    `role` says which part of the model it belongs to: text, vision, audio, dit or expert.
    """

    name: str
    module: nn.Module
    container: nn.ModuleList
    index: int
    role: str = "text"
    traced: TracedBlock | None = None

    @property
    def graph_module(self) -> fx.GraphModule:
        if self.traced is None:
            raise RuntimeError(f"block {self.name} has not been traced yet")
        return self.traced.graph_module

    def qualified(self, target: str) -> str:
        """The model-level name of a submodule path inside this block."""
        return f"{self.name}.{target}" if target else self.name

    def leaf(self, target: str) -> nn.Module:
        return self.module.get_submodule(target)

    def replace_leaf(self, target: str, new: nn.Module) -> None:
        """Swap a leaf module in the block and in its graph module."""
        self.module.set_submodule(target, new)
        if self.traced is not None:
            self.traced.graph_module.set_submodule(target, new)

    @staticmethod
    def quantizer_target(layer_target: str) -> str:
        """Where the input quantizer of a layer lives in the graph module."""
        return "act_quant." + re.sub(r"\W", "_", layer_target)

    @staticmethod
    def rotation_target(layer_target: str) -> str:
        """Where the online rotation of a layer's input lives in the graph module."""
        return "rotation." + re.sub(r"\W", "_", layer_target)

    @staticmethod
    def scale_target(layer_target: str) -> str:
        """Where the explicit smoothing multiply before a layer (shared by the layers reading its input) lives
        in the graph module."""
        return "channel_scale." + re.sub(r"\W", "_", layer_target)

    @staticmethod
    def qk_rotation_target(kernel: str) -> str:
        """Where the online Hadamard on an attention kernel node's query and key inputs lives in the graph module."""
        return "qk_rotation." + re.sub(r"\W", "_", kernel)

    @staticmethod
    def kv_quantizer_target(kernel: str, projection: str) -> str:
        """Where the KV cache quantizer of an attention kernel node's key or value input (computed by the Linear
        `projection`) lives in the graph module."""
        return "kv_cache." + re.sub(r"\W", "_", f"{kernel}_{projection}")

    def input_quantizer(self, layer_target: str) -> nn.Module | None:
        """The quantize-dequantize node module on a layer's input, if one was inserted."""
        return self._graph_submodule(self.quantizer_target(layer_target))

    def input_rotation(self, layer_target: str) -> nn.Module | None:
        """The online rotation node module on a layer's input, if one was inserted."""
        return self._graph_submodule(self.rotation_target(layer_target))

    def _graph_submodule(self, target: str) -> nn.Module | None:
        try:
            return self.graph_module.get_submodule(target)
        except AttributeError:
            return None

    def insert_input_quantizer(self, layer_target: str, quantizer: nn.Module) -> None:
        """Put `quantizer` on the first input of every call of the layer, as a call_module node."""
        self.insert_input_node(layer_target, self.quantizer_target(layer_target), quantizer)

    def insert_input_node(self, layer_target: str, node_target: str, module: nn.Module) -> None:
        """Put `module` (registered in the graph module as `node_target`) on the first input of every
        call of the layer, as a call_module node."""
        gm = self.graph_module
        gm.add_submodule(node_target, module)
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer_target]:
            with gm.graph.inserting_before(node):
                inserted = gm.graph.call_module(node_target, (node.args[0],))
            node.args = (inserted, *node.args[1:])
        gm.recompile()

    def insert_argument_node(self, node: fx.Node, index: int, node_target: str, module: nn.Module) -> None:
        """Put `module` (registered in the graph module as `node_target`) on positional argument `index` of `node`.
        The module keeps its input's shape (a quantizer, a rotation): the node gets the argument's recorded shape."""
        gm = self.graph_module
        gm.add_submodule(node_target, module)
        with gm.graph.inserting_before(node):
            inserted = gm.graph.call_module(node_target, (node.args[index],))
        if "tensor_meta" in node.args[index].meta:
            inserted.meta["tensor_meta"] = node.args[index].meta["tensor_meta"]
        node.args = (*node.args[:index], inserted, *node.args[index + 1:])
        gm.recompile()

    def remove_input_quantizer(self, layer_target: str) -> None:
        """Take a layer's input quantizer node out of the graph (its input goes straight to the layer)."""
        self.remove_input_node(self.quantizer_target(layer_target))

    def remove_input_node(self, target: str) -> None:
        """Take the nodes calling the graph module's submodule `target` out of the graph, and the submodule."""
        gm = self.graph_module
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        gm.delete_submodule(target)
        gm.recompile()


@dataclass
class Rotations:
    """The rotations passes applied, described for the report (e.g. "Hadamard 12⊗8 (Paley I, q=11)"): the residual
    stream's, and each online rotation by the qualified name of the Linear (or experts' down projection) it feeds."""

    residual: str | None = None
    online: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    """Blocks the model calls one after another (a vision tower, a text decoder, DiT double blocks).

    The pipeline captures a stage's inputs from a forward of the model (after the stages before it
    were quantized) and carries each block's outputs into the next block.
    """

    name: str
    blocks: list[Block]


def call_with_kwargs(model: nn.Module, batch: dict[str, Any]) -> Any:
    return model(**batch)


@dataclass
class Program:
    """A model cut into stages of blocks, with the quantization annotations of its layers.

    `call(model, batch)` runs the model on one calibration batch (a dict of forward arguments).
    """

    model: nn.Module
    family: str
    source: ModelSource
    stages: list[Stage]
    call: Callable[[nn.Module, dict[str, Any]], Any] = field(default=call_with_kwargs, repr=False)
    quant_specs: dict[str, QuantSpec] = field(default_factory=dict)
    rotations: Rotations = field(default_factory=Rotations)
    # Keys the exported config.json sets (a pass that unties the embedding and the head sets tie_word_embeddings).
    config_updates: dict[str, Any] = field(default_factory=dict)
    tied_embeddings: bool = False  # the head's weight is the embedding's (set by frontends that have both)
    device: str = "cpu"  # where a frontend may run the model to make calibration data
    # The checkpoint's other tensors, {name: safetensors file}, that exports copy unchanged beside the program's own
    # (a frontend that quantizes one part of a larger checkpoint, an Omni thinker beside its talker, sets them).
    source_tensors: dict[str, Path] = field(default_factory=dict)
    ascend_metadata: dict[str, Any] = field(default_factory=dict)  # the MindIE description's `metadata`, as a pass gives it
    # The residual stream outside the blocks (set by frontends that have one): the modules that
    # write it before the first block, the head reading it after the last, and how to find the norm
    # between them (a forward pass, so only when a pass asks for `head_norm`).
    embeddings: list[str] = field(default_factory=list)
    head: str | None = None
    find_head_norm: Callable[[], str | None] | None = field(default=None, repr=False)
    # Models inside the program that are exported separately (Wan2.2's two experts): set by the frontend,
    # it gives a Program of each, by output subdirectory.
    parts: Callable[[], dict[str, Program]] | None = field(default=None, repr=False)
    # The blocks' weights when they are read from the checkpoint block by block (slimc.ir.streaming): blocks
    # not yet worked on, and blocks finished and spilled, are on the meta device.
    weights: BlockWeights | None = field(default=None, repr=False)

    def export_parts(self) -> dict[str, Program]:
        """What backends write, by subdirectory of their output: {"": self}, or one Program per part."""
        return {"": self} if self.parts is None else self.parts()

    @property
    def blocks(self) -> list[Block]:
        """Every block, in the order the stages run."""
        return [block for stage in self.stages for block in stage.blocks]

    @functools.cached_property
    def head_norm(self) -> str | None:
        """The norm between the last block and the head, found on first use; None if there is none."""
        if self.find_head_norm is None:
            return None
        with self.streamed():
            return self.find_head_norm()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def streamed(self) -> contextlib.AbstractContextManager:
        """Forwards of the model read the blocks on the meta device as they run, whether the block or its graph
        module sits in the model (a no-op unless streamed)."""
        if self.weights is None:
            return contextlib.nullcontext()
        return self.weights.streamed([(block.name, block.module, block.traced) for block in self.blocks])

    def materialize(self, block: Block) -> None:
        """Read the block's weights if they are on the meta device."""
        if self.weights is not None and is_on_meta(block.module):
            self.weights.materialize(block.module, block.name)

    def finish_block(self, block: Block) -> None:
        """The pipeline is done with the block: a streamed program spills it and drops its tensors."""
        if self.weights is not None and self.weights.spill_directory is not None:
            self.weights.spill(block.module, block.name)

    @contextlib.contextmanager
    def reading(self, *blocks: Block) -> Iterator[None]:
        """The blocks' tensors while inside (all of them: for what needs the whole model at once, an ONNX graph);
        blocks that were on the meta device go back to it after."""
        released = [block for block in blocks if self.weights is not None and is_on_meta(block.module)]
        try:
            for block in blocks:
                self.materialize(block)
            yield
        finally:
            for block in released:
                self.weights.release(block.module)

    def position(self, block: Block) -> int:
        """The block's place among all the program's blocks, over its stages (its `index` counts in its container)."""
        return next(i for i, candidate in enumerate(self.blocks) if candidate is block)

    def block_of(self, name: str) -> Block | None:
        """The block holding the qualified module or tensor name, None for one outside every block."""
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            block = self._blocks_by_name.get(".".join(parts[:end]))
            if block is not None:
                return block
        return None

    @functools.cached_property
    def _blocks_by_name(self) -> dict[str, Block]:
        return {block.name: block for block in self.blocks}

    @contextlib.contextmanager
    def executing_graphs(self) -> Iterator[None]:
        """Run the model through the blocks' graph modules (so inserted nodes take effect); blocks on the meta
        device are read as they run."""
        swapped = [block for block in self.blocks if block.traced is not None]
        try:
            for block in swapped:
                block.container[block.index] = block.traced
            with self.streamed():
                yield
        finally:
            for block in swapped:
                block.container[block.index] = block.module
