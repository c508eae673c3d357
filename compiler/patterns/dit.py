"""Diffusion-transformer patterns: AdaLN modulation and inputs that only an explicit multiply can scale.

- modulated norm → Linears: readers of `norm(x) * (1 + scale) + shift` where scale and shift are chunks
  of one tensor, foldable when that tensor is a Linear's output in the block;
- explicit-multiply groups: Linears reading one tensor that no layer before them can absorb a scale
  into (a block input, a modulation that cannot be folded).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from slimc.patterns.graph import (
    CAT_FUNCTIONS,
    BlockGraph,
    Consumer,
    block_graph,
    describe_node,
    is_add,
    is_call,
    is_cast,
    is_chunk_path,
    is_mul,
    is_shape_query,
    joins_tokens,
    keeps_channels,
    selects_tokens,
    shape_of,
)


@dataclass
class ModulationGroup:
    """Linears reading `norm(x) * (1 + scale) + shift` (AdaLN modulation), scale and shift being chunks
    `scale_chunk` and `shift_chunk` of one tensor split into `chunks` along its channels.

    When that tensor is the output of `linear` (a Linear in the block, with a bias) and nothing else
    reads those chunks or the modulated output, a per-channel scale of the modulated output folds
    exactly into that Linear's chunk rows; otherwise `problem` says why not (e.g. Wan's
    `scale_shift_table + temb`, temb being a block input).
    """

    norm: str
    readers: list[Consumer]
    source: str  # what the chunks are taken from: the modulation Linear's target, or a description
    linear: str | None  # the modulation Linear, when foldable
    chunks: int
    scale_chunk: int
    shift_chunk: int
    problem: str | None = None

    @property
    def foldable(self) -> bool:
        return self.problem is None

    def rows(self, chunk: int, out_features: int) -> slice:
        """The output rows of the modulation Linear that chunk `chunk` holds."""
        size = out_features // self.chunks
        return slice(chunk * size, (chunk + 1) * size)


@dataclass
class MultiplyGroup:
    """Linears reading one tensor that no layer before them can absorb a per-channel scale into:
    smoothing them needs an explicit multiply before each (msModelSlim's non-fusion smoothing)."""

    source: str  # what they read
    readers: list[Consumer]
    reason: str


def _carries_channels(graph: BlockGraph, node: fx.Node, carriers: set[fx.Node]) -> bool:
    """Whether `node` passes a carrier's channels on unchanged, only moving or selecting tokens."""
    if node.op == "call_function" and node.target in CAT_FUNCTIONS:
        return joins_tokens(node) and all(isinstance(t, fx.Node) and graph.behind(t) in carriers for t in node.args[0])
    source = graph.arg(node) if node.args else None
    if source not in carriers:
        return False
    if keeps_channels(node) or selects_tokens(node) or (node.op == "call_method" and node.target == "clone"):
        return True
    in_shape, out_shape = shape_of(source), shape_of(node)
    same_channels = in_shape is not None and out_shape is not None and in_shape[-1:] == out_shape[-1:]
    return same_channels and is_call(node, {"unsqueeze", "squeeze"}, {torch.unsqueeze, torch.squeeze})


def _channel_readers(graph: BlockGraph, start: fx.Node) -> tuple[list[Consumer], list[fx.Node]]:
    """Who reads `start`'s channels, through ops that only move or select tokens (casts, views keeping the
    last dimension, token slices, concatenations of its own pieces): (Linear readers, other readers),
    in graph order. A tensor used only for its shape or dtype is not read."""
    carriers, linears, others = {start}, [], []
    for node in graph.nodes_after(start):
        if not any(a in carriers for a in graph.inputs(node)) or is_shape_query(node):
            continue
        if is_cast(node) and node.args and graph.arg(node) not in carriers:
            continue  # `y.type_as(x)`, `y.to(x)`: x only gives a dtype
        if _carries_channels(graph, node, carriers):
            carriers.add(node)
        elif graph.kind(node) == "linear" and graph.arg(node) in carriers:
            linears.append(Consumer("linear", node.target))
        else:
            others.append(node)
    return linears, others


def _is_one(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 1


@dataclass
class _Modulation:
    norm: fx.Node
    chunk: fx.Node
    scale_chunk: int
    shift_chunk: int
    factor: fx.Node  # 1 + scale
    product: fx.Node  # norm(x) * (1 + scale)
    output: fx.Node  # ... + shift


def _match_modulation(graph: BlockGraph, node: fx.Node) -> _Modulation | None:
    """`node` = norm(x) * (1 + scale) + shift, either operand order, through casts, with scale and shift
    chunks of one tensor."""
    if not (is_add(node) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)):
        return None
    for product, shift in (node.args, node.args[::-1]):
        product, shift_pick = graph.back(product, is_cast), graph.chunk_pick(shift)
        if shift_pick is None or not is_mul(product):
            continue
        for normed, factor in (product.args, product.args[::-1]):
            if not (isinstance(normed, fx.Node) and isinstance(factor, fx.Node)):
                continue
            norm, factor = graph.back(normed, is_cast), graph.back(factor, is_cast)
            if graph.kind(norm) != "norm" or not (is_add(factor) and len(factor.args) == 2):
                continue
            scale = [a for a in factor.args if isinstance(a, fx.Node)]
            if len(scale) != 1 or not any(_is_one(a) for a in factor.args):
                continue
            scale_pick = graph.chunk_pick(scale[0])
            if scale_pick is not None and scale_pick[0] is shift_pick[0]:
                return _Modulation(norm, shift_pick[0], scale_pick[1], shift_pick[1], factor, product, node)
    return None


def _fold_problem(gm: fx.GraphModule, graph: BlockGraph, mod: _Modulation, others: list[fx.Node]) -> str | None:
    """Why a per-channel scale of the modulated output cannot fold into the modulation's rows, or None."""
    chunk = mod.chunk
    source = graph.back(chunk.args[0], is_cast)
    if graph.kind(source) != "linear" or not isinstance(gm.get_submodule(source.target), nn.Linear):
        return f"scale and shift are chunks of {graph.describe_value(chunk.args[0])}, not rows of a Linear in the block"
    linear, shape = gm.get_submodule(source.target), shape_of(source)
    dim = chunk.kwargs.get("dim", chunk.args[2] if len(chunk.args) > 2 else 0)
    chunks = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or linear.out_features % chunks:
        return f"the chunks of {source.target} are not equal groups of its output rows"
    if linear.bias is None:
        return f"{source.target} has no bias to absorb the 1 in 1 + scale"
    expected = {mod.scale_chunk: {mod.factor}, mod.shift_chunk: {mod.output}}
    for pick in (n for n in graph.users(chunk) if n.target is operator.getitem and n.args[1] in expected):
        outside = set(graph.through(pick, is_chunk_path)) - expected[pick.args[1]]
        if outside:
            return f"chunk {pick.args[1]} of {source.target} is also read by {describe_node(graph.first(outside))}"
    for node, reader in ((mod.factor, mod.product), (mod.product, mod.output)):
        outside = set(graph.through(node, is_cast)) - {reader}
        if outside:
            return f"{describe_node(node)} is also read by {describe_node(graph.first(outside))}"
    if others:
        return f"the modulated output is also read by {describe_node(others[0])}"
    return None


def find_modulation_groups(gm: fx.GraphModule) -> list[ModulationGroup]:
    """Linears reading an AdaLN-modulated norm output, `norm(x) * (1 + scale) + shift`, with where scale
    and shift come from and whether a scale of the output folds into their Linear's chunk rows."""
    graph = block_graph(gm)
    groups = []
    for node in graph.nodes:
        mod = _match_modulation(graph, node)
        if mod is None:
            continue
        readers, others = _channel_readers(graph, node)
        if not readers:
            continue
        problem = _fold_problem(gm, graph, mod, others)
        source = graph.back(mod.chunk.args[0], is_cast)
        chunks = mod.chunk.args[1] if len(mod.chunk.args) > 1 else mod.chunk.kwargs.get("chunks")
        groups.append(ModulationGroup(
            norm=mod.norm.target, readers=readers,
            source=source.target if problem is None else graph.describe_value(mod.chunk.args[0]),
            linear=source.target if problem is None else None, chunks=int(chunks),
            scale_chunk=mod.scale_chunk, shift_chunk=mod.shift_chunk, problem=problem,
        ))
    return groups


def find_multiply_groups(gm: fx.GraphModule) -> list[MultiplyGroup]:
    """Groups of Linears reading one tensor with no layer before them to fold a scale into: a block input
    read directly (through casts and views), or a modulated norm output whose modulation cannot be
    folded (see find_modulation_groups)."""
    graph = block_graph(gm)
    groups = []
    for node in (n for n in graph.nodes if n.op == "placeholder"):
        readers, _ = _channel_readers(graph, node)
        if readers:
            groups.append(MultiplyGroup(f"block input {node.name}", readers, "they read a block input, with no layer before them"))
    for group in find_modulation_groups(gm):
        if not group.foldable:
            groups.append(MultiplyGroup(f"{group.norm}·(1 + scale) + shift", group.readers, group.problem))
    return groups
