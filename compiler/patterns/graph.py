"""A block's fx graph as a networkx DiGraph, built once per graph, and the walks the finders share.

Each node carries a `kind`: for `call_module` nodes the leaf kind of `slimc.ir.leaves` (linear, norm,
experts, attention, quantizer, module), for the rest weight (a parameter read), attention (diffusers'
`dispatch_attention_fn`, `F.scaled_dot_product_attention`) or op.

Quantizer nodes (the quantize-dequantize modules a pass puts on a layer's input) are seen through here
and nowhere else: they are not in the DiGraph, a quantizer's readers read its input, and `arg`/`back`
step over them, so a finder matches the same structure before and after fake quantization.

`block_graph(gm)` keeps the DiGraph in `gm.meta` together with what it was built from (every node, its
target and inputs, and the module a `call_module` node calls): a finder rebuilds it only when a pass
has changed the graph or swapped a leaf since.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from slimc.ir.leaves import leaf_kind

CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous"}
SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "flatten", "unflatten", "expand", "contiguous", "unsqueeze", "squeeze"}
SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unsqueeze, torch.squeeze, operator.getitem}
SHAPE_QUERY_METHODS = {"size", "dim", "numel"}
IDENTITY_FUNCTIONS = {F.dropout}
MUL_FUNCTIONS = {operator.mul, torch.mul}
ADD_FUNCTIONS = {operator.add, torch.add}
CAT_FUNCTIONS = {torch.cat, torch.concat}
CHUNK_FUNCTIONS = {torch.chunk}
ATTENTION_FUNCTION_NAMES = {"dispatch_attention_fn", "scaled_dot_product_attention"}
CACHE_KEY = "slimc.block_graph"

Passable = Callable[[fx.Node], bool]


@dataclass(frozen=True)
class Consumer:
    """A reader of a tensor whose input channels can absorb a per-channel scale."""

    kind: str  # "linear", "experts", or "weight" (a parameter used by F.linear, e.g. a MoE router)
    target: str


def propagate_shapes(gm: fx.GraphModule, flat_inputs: list[torch.Tensor]) -> None:
    """Record each node's output shape in `node.meta['tensor_meta']` (runs the graph once)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*flat_inputs)


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "get_attr":
        return "weight"
    if node.op == "call_function" and getattr(node.target, "__name__", None) in ATTENTION_FUNCTION_NAMES:
        return "attention"
    if node.op != "call_module":
        return "op"
    return leaf_kind(gm.get_submodule(node.target)) or "module"


class BlockGraph:
    """The DiGraph of a block's fx nodes, quantizers seen through; each node has its `kind` and `order`."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.digraph = nx.DiGraph()
        self.quantizers: set[fx.Node] = set()
        for order, node in enumerate(gm.graph.nodes):
            kind = node_kind(gm, node)
            if kind == "quantizer":
                self.quantizers.add(node)
            else:
                self.digraph.add_node(node, kind=kind, order=order)
        for node in self.digraph:
            for reader in self._readers(node):
                self.digraph.add_edge(node, reader)

    def _readers(self, node: fx.Node) -> Iterable[fx.Node]:
        for user in node.users:
            if user in self.quantizers:
                yield from self._readers(user)
            else:
                yield user

    @property
    def nodes(self) -> list[fx.Node]:
        """Every node except quantizers, in graph order."""
        return list(self.digraph)

    def nodes_after(self, node: fx.Node) -> list[fx.Node]:
        """The nodes after `node`, except quantizers, in graph order."""
        return [n for n in self.digraph if self.order(n) > self.order(node)]

    def kind(self, node: fx.Node) -> str:
        return self.digraph.nodes[node]["kind"]

    def order(self, node: fx.Node) -> int:
        return self.digraph.nodes[node]["order"]

    def of_kind(self, kind: str) -> list[fx.Node]:
        """The nodes of `kind`, in graph order."""
        return [node for node, data in self.digraph.nodes(data=True) if data["kind"] == kind]

    def users(self, node: fx.Node) -> list[fx.Node]:
        """The nodes reading `node`, those behind a quantizer included."""
        return list(self.digraph.successors(node))

    def behind(self, value: Any) -> Any:
        """`value`, or what the quantizers in front of it read when it is a quantizer's output."""
        while isinstance(value, fx.Node) and value in self.quantizers:
            value = value.args[0]
        return value

    def arg(self, node: fx.Node, index: int = 0) -> Any:
        """`node`'s positional argument `index`, behind any quantizer."""
        return self.behind(node.args[index])

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        """The nodes `node` reads, behind any quantizer, in argument order."""
        return [self.behind(n) for n in node.all_input_nodes]

    def first(self, nodes: Iterable[fx.Node]) -> fx.Node:
        return min(nodes, key=self.order)

    def through(self, start: fx.Node, passable: Passable) -> list[fx.Node]:
        """Nodes reached from `start` that are not passable, walking readers through passable ones; in graph
        order. A node read only for its shape or dtype is not reached."""
        reached, stack, seen = [], self.users(start), set()
        while stack:
            node = stack.pop()
            if node in seen or is_shape_query(node):
                continue
            seen.add(node)
            if passable(node):
                stack.extend(self.users(node))
            else:
                reached.append(node)
        return sorted(reached, key=self.order)

    def back(self, value: Any, passable: Passable) -> Any:
        """Walk up first arguments from `value` through passable nodes and quantizers."""
        node = self.behind(value)
        while isinstance(node, fx.Node) and passable(node) and node.args and isinstance(node.args[0], fx.Node):
            node = self.arg(node)
        return node

    def chunk_pick(self, node: fx.Node) -> tuple[fx.Node, int] | None:
        """If `node` is `t.chunk(n, dim)[k]` (through casts and unsqueezes), the chunk node and k."""
        node = self.back(node, is_chunk_path)
        if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
            return None
        chunk = node.args[0]
        if isinstance(chunk, fx.Node) and is_call(chunk, {"chunk"}, CHUNK_FUNCTIONS):
            return chunk, node.args[1]
        return None

    def describe_value(self, node: fx.Node) -> str:
        """Where a tensor comes from, shortly: sums of parameters, layer outputs and block inputs."""
        node = self.back(node, is_cast)
        if is_add(node) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return " + ".join(self.describe_value(a) for a in node.args[:2])
        if node.op in ("get_attr", "call_module"):
            return str(node.target)
        if node.op == "placeholder":
            return f"{node.name} (a block input)"
        return describe_node(node)


def _built_from(gm: fx.GraphModule) -> list[tuple]:
    """What a BlockGraph is built from: each node in order, its target, its inputs and the module it calls. The
    module by weak reference: a cache must not keep a leaf alive after a pass replaced it (lowering swaps every
    float Linear for its integer one, and the float weights would stay in memory until the compile ends)."""
    return [(node, node.target, node.all_input_nodes,
             weakref.ref(gm.get_submodule(node.target)) if node.op == "call_module" else None)
            for node in gm.graph.nodes]


class _Cache:
    """Where `block_graph` keeps a graph module's BlockGraph, in `gm.meta`. A copy or a pickle of the module
    gets an empty one: its nodes are new objects."""

    def __init__(self) -> None:
        self.built_from: list[tuple] | None = None
        self.graph: BlockGraph | None = None

    def __reduce__(self) -> tuple:
        return (_Cache, ())


def block_graph(gm: fx.GraphModule) -> BlockGraph:
    """The BlockGraph of `gm`, built again only if the graph or its leaves changed since it was last built."""
    cache = gm.meta.setdefault(CACHE_KEY, _Cache())
    built_from = _built_from(gm)
    if cache.built_from != built_from:
        cache.graph, cache.built_from = BlockGraph(gm), built_from
    return cache.graph


def find_linears(gm: fx.GraphModule) -> list[str]:
    """Targets of the Linear layers the graph calls, in graph order."""
    return [node.target for node in block_graph(gm).of_kind("linear")]


def find_experts(gm: fx.GraphModule) -> list[str]:
    """Targets of fused MoE experts modules."""
    return [node.target for node in block_graph(gm).of_kind("experts")]


def sublayer_output(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> fx.Node | None:
    """The nearest Linear call that every path from `nodes` to the block's output passes through (one of `nodes`
    where it is such a Linear): the output projection of the sublayer they compute (o_proj for a norm and the
    q/k/v reading it, or for v; down_proj for gate/up, or for up). None where no Linear is (fused MoE experts
    and their router meet the shared expert in a sum), or some node does not reach the output. Shape queries carry
    no values and are no paths."""
    graph, nodes = block_graph(gm), list(nodes)
    output = next(node for node in graph.nodes if node.op == "output")
    backwards = graph.digraph.subgraph(n for n in graph.nodes if not is_shape_query(n)).reverse(copy=False)
    after = nx.immediate_dominators(backwards, output)  # dominators of the reversed graph: post-dominators
    if not nodes or any(node not in after for node in nodes):
        return None
    chains = []
    for node in nodes:
        chain = [node]
        while chain[-1] is not output:
            chain.append(after[chain[-1]])
        chains.append(chain)
    on_every_path = set.intersection(*(set(chain) for chain in chains))
    return next((node for node in chains[0] if node in on_every_path and graph.kind(node) == "linear"), None)


def find_shared_inputs(gm: fx.GraphModule, targets: Iterable[str]) -> list[list[str]]:
    """`targets` (modules the graph calls) grouped by the tensor they read, in graph order: modules called once
    whose first argument, behind any quantizer, is the same node (q/k/v after one norm, gate/up) form one group;
    a module called more than once, or not at all, is a group of its own."""
    graph = block_graph(gm)
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    groups: dict[Any, list[str]] = {}
    for target in targets:
        nodes = calls.get(target, [])
        key = graph.arg(nodes[0]) if len(nodes) == 1 and nodes[0].args else target
        groups.setdefault(key, []).append(target)
    return list(groups.values())


def dependency_levels(gm: fx.GraphModule, targets: Iterable[str]) -> list[list[str]]:
    """`targets` (modules the graph calls) in levels, in graph order within each: a module is one level after the
    deepest of the others whose output reaches one of its calls (q/k/v, then o, then gate/up, then down in a
    decoder layer); one the graph does not call is in the first."""
    graph, targets = block_graph(gm), list(targets)
    wanted = set(targets)
    level: dict[str, int] = dict.fromkeys(targets, 0)
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target in wanted]
    for node in calls:  # graph order: every call before it already has its level
        before = {ancestor.target for ancestor in nx.ancestors(graph.digraph, node)
                  if ancestor.op == "call_module" and ancestor.target in wanted and ancestor.target != node.target}
        level[node.target] = max(level[node.target], 1 + max((level[t] for t in before), default=-1))
    return [[t for t in targets if level[t] == depth] for depth in sorted(set(level.values()))]


# --- what one node does to the channel (last) dimension, judged from the shapes `propagate_shapes` records


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_call(node: fx.Node, methods: set[str], functions: set) -> bool:
    return (node.op == "call_method" and node.target in methods) or (node.op == "call_function" and node.target in functions)


def is_cast(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in CAST_METHODS:
        return True
    return node.op == "call_function" and node.target in IDENTITY_FUNCTIONS


def keeps_channels(node: fx.Node) -> bool:
    """A cast, or a view-like op whose last dimension equals its input's (channels untouched)."""
    if is_cast(node):
        return True
    if not is_call(node, {"view", "reshape", "flatten"}, {torch.reshape, torch.flatten}):
        return False
    source = node.args[0] if node.args else None
    out_shape, in_shape = shape_of(node), shape_of(source) if isinstance(source, fx.Node) else None
    return out_shape is not None and in_shape is not None and out_shape[-1:] == in_shape[-1:]


def is_shape_op(node: fx.Node) -> bool:
    return is_cast(node) or is_call(node, SHAPE_METHODS, SHAPE_FUNCTIONS)


def is_shape_query(node: fx.Node) -> bool:
    """`x.shape`, `x.size()`, `x.dim()`: reads no values, so it is no reader of the tensor."""
    if node.op == "call_method":
        return node.target in SHAPE_QUERY_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("dtype",), ("device",))


def is_add(node: fx.Node) -> bool:
    return is_call(node, {"add"}, ADD_FUNCTIONS)


def is_mul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in MUL_FUNCTIONS


def _touches_last_dim(index, ndim: int) -> bool:
    """Whether `x[index]` on a tensor of rank `ndim` selects along the last dimension."""
    entries = [e for e in (index if isinstance(index, tuple) else (index,)) if e is not None]
    if Ellipsis in entries:
        trailing = entries[entries.index(Ellipsis) + 1:]
        last = trailing[-1] if trailing else None
    else:
        last = entries[ndim - 1] if len(entries) >= ndim else None
    return last is not None and last != slice(None)


def selects_tokens(node: fx.Node) -> bool:
    """`x[index]` that leaves the last (channel) dimension whole."""
    source = node.args[0] if node.args else None
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(source, fx.Node)):
        return False
    shape = shape_of(source)
    return shape is not None and not _touches_last_dim(node.args[1], len(shape))


def joins_tokens(node: fx.Node) -> bool:
    """`torch.cat` along a dimension other than the last (channels)."""
    if not (node.op == "call_function" and node.target in CAT_FUNCTIONS):
        return False
    shape, dim = shape_of(node), node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return shape is not None and isinstance(dim, int) and dim % len(shape) != len(shape) - 1


def is_chunk_path(node: fx.Node) -> bool:
    """Ops between a chunk of a modulation tensor and its use: casts, unsqueezes, `x[:, None]`."""
    return is_cast(node) or is_call(node, {"unsqueeze"}, {torch.unsqueeze}) or selects_tokens(node)


def describe_node(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target} ({node.name})"
