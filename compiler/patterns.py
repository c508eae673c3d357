"""Structure found in a block's fx graph, not in layer names.

The graph becomes a networkx DiGraph whose nodes carry a `kind`: linear, norm, attention,
experts, quantizer, weight (a parameter read), or op. Each finder matches one shape:

- norm → consumers: a norm whose output reaches only Linears / experts / `F.linear` with a
  parameter (MoE routers), through casts and views that keep the channel dimension;
- v → o: a Linear feeding the attention kernel's value input through shape ops, and the
  Linear reading the kernel's output;
- up → down: a Linear whose output is multiplied by act(gate) and then read by another Linear;
- experts: fused MoE experts modules (3-D `gate_up_proj` / `down_proj`).
Shape ops are judged by the channel (last) dimension, from the shapes recorded by `propagate_shapes`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimc.modules import FakeQuantExperts, FakeQuantize, QuantizedExperts, QuantizedLinear

CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous"}
SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "flatten", "unflatten", "expand", "contiguous", "unsqueeze", "squeeze"}
SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unsqueeze, torch.squeeze, operator.getitem}
SHAPE_QUERY_METHODS = {"size", "dim", "numel"}
IDENTITY_FUNCTIONS = {F.dropout}
MUL_FUNCTIONS = {operator.mul, torch.mul}
ADD_FUNCTIONS = {operator.add, torch.add}


@dataclass(frozen=True)
class Consumer:
    """A reader of a norm's output whose input channels can absorb a per-channel scale."""

    kind: str  # "linear", "experts", or "weight" (a parameter used by F.linear, e.g. a MoE router)
    target: str


@dataclass
class NormGroup:
    norm: str
    consumers: list[Consumer] = field(default_factory=list)


@dataclass(frozen=True)
class OVPair:
    v: str
    o: str
    head_dim: int


@dataclass
class ResidualStream:
    """How a block reads and writes the hidden states it passes on (the residual stream).

    `norms` read the stream and feed `readers` (their NormGroup consumers); `direct_readers` read it
    with no norm between; `writers` produce what is added into it. `problem` says why the stream
    cannot be followed (an op that is neither), or is None.
    """

    norms: list[NormGroup] = field(default_factory=list)
    direct_readers: list[Consumer] = field(default_factory=list)
    writers: list[Consumer] = field(default_factory=list)
    problem: str | None = None


@dataclass(frozen=True)
class UpDownPair:
    gate: str | None
    up: str
    down: str


def propagate_shapes(gm: fx.GraphModule, flat_inputs: list[torch.Tensor]) -> None:
    """Record each node's output shape in `node.meta['tensor_meta']` (runs the graph once)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*flat_inputs)


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "get_attr":
        return "weight"
    if node.op != "call_module":
        return "op"
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.Linear | QuantizedLinear):
        return "linear"
    if isinstance(module, FakeQuantize):
        return "quantizer"
    if is_experts_module(module):
        return "experts"
    name = type(module).__name__
    if "Norm" in name:
        return "norm"
    if "Attention" in name or "attention" in node.target.rsplit(".", 1)[-1]:
        return "attention"
    return "module"


def is_experts_module(module: nn.Module) -> bool:
    if isinstance(module, FakeQuantExperts | QuantizedExperts):
        return True
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The block graph as a DiGraph of fx nodes, each with its `kind`."""
    graph = nx.DiGraph()
    for order, node in enumerate(gm.graph.nodes):
        graph.add_node(node, kind=node_kind(gm, node), order=order)
        for user in node.users:
            graph.add_edge(node, user)
    return graph


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_cast(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in CAST_METHODS:
        return True
    return node.op == "call_function" and node.target in IDENTITY_FUNCTIONS


def _keeps_channels(node: fx.Node) -> bool:
    """A cast, or a view-like op whose last dimension equals its input's (channels untouched)."""
    if _is_cast(node):
        return True
    is_shape_op = (node.op == "call_method" and node.target in {"view", "reshape", "flatten"}) or (
        node.op == "call_function" and node.target in {torch.reshape, torch.flatten}
    )
    if not is_shape_op:
        return False
    source = node.args[0] if node.args else None
    out_shape, in_shape = _shape(node), _shape(source) if isinstance(source, fx.Node) else None
    return out_shape is not None and in_shape is not None and out_shape[-1:] == in_shape[-1:]


def _is_shape_op(node: fx.Node) -> bool:
    if _is_cast(node):
        return True
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    return node.op == "call_function" and node.target in SHAPE_FUNCTIONS


def _is_shape_query(node: fx.Node) -> bool:
    """`x.shape`, `x.size()`, `x.dim()`: reads no values, so it is no reader of the tensor."""
    if node.op == "call_method":
        return node.target in SHAPE_QUERY_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("dtype",), ("device",))


def _through(graph: nx.DiGraph, start: fx.Node, passable) -> list[fx.Node]:
    """Nodes reached from `start` that are not passable, walking users through passable ones; in graph order."""
    reached, stack, seen = [], list(graph.successors(start)), set()
    while stack:
        node = stack.pop()
        if node in seen or _is_shape_query(node):
            continue
        seen.add(node)
        if passable(node):
            stack.extend(graph.successors(node))
        else:
            reached.append(node)
    return sorted(reached, key=lambda n: graph.nodes[n]["order"])


def _back(node: fx.Node, passable) -> fx.Node:
    """Walk up first arguments through passable nodes."""
    while passable(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _router_weight(gm: fx.GraphModule, graph: nx.DiGraph, node: fx.Node, source: fx.Node) -> str | None:
    """If `node` is F.linear(source-path, parameter), the parameter's name."""
    if node.op != "call_function" or node.target is not F.linear or len(node.args) < 2:
        return None
    weight = _back(node.args[1], _is_cast) if isinstance(node.args[1], fx.Node) else None
    if weight is None or weight.op != "get_attr" or weight is source:
        return None
    return weight.target


def find_norm_linear_groups(gm: fx.GraphModule) -> list[NormGroup]:
    """Norms whose output is read only by layers that can absorb a per-input-channel scale."""
    graph = to_networkx(gm)
    groups = []
    for norm in (n for n, kind in graph.nodes(data="kind") if kind == "norm"):
        group = NormGroup(norm=norm.target)
        for reader in _through(graph, norm, _keeps_channels):
            kind = graph.nodes[reader]["kind"]
            if kind in ("linear", "experts") and _back(reader.args[0], _keeps_channels) is norm:
                group.consumers.append(Consumer(kind, reader.target))
            elif kind == "quantizer":
                linear = next(iter(reader.users), None)
                if linear is None or graph.nodes[linear]["kind"] != "linear":
                    break
                group.consumers.append(Consumer("linear", linear.target))
            elif (weight := _router_weight(gm, graph, reader, norm)) is not None:
                group.consumers.append(Consumer("weight", weight))
            else:
                break
        else:
            if group.consumers:
                groups.append(group)
    return groups


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (node.op == "call_method" and node.target == "add")


def _per_token_factor(node: fx.Node) -> fx.Node | None:
    """If `node` multiplies a tensor by a per-token (last dim 1) or scalar factor, that tensor."""
    if not (node.op == "call_function" and node.target in MUL_FUNCTIONS and len(node.args) == 2):
        return None
    a, b = node.args
    for tensor, factor in ((a, b), (b, a)):
        if isinstance(tensor, fx.Node) and (not isinstance(factor, fx.Node) or (_shape(factor) or (0,))[-1:] == (1,)):
            return tensor
    return None


def _describe_node(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target} ({node.name})"


def find_residual_stream(gm: fx.GraphModule) -> ResidualStream:
    """Follow the block's hidden-state output back to its input: adds, casts and per-token scalings
    carry the stream; the Linears and experts they reach write into it. Then every reader of the
    stream must be a norm whose readers absorb a scale (see find_norm_linear_groups) or a layer."""
    graph = to_networkx(gm)
    stream = ResidualStream()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    primary = output.args[0]
    while isinstance(primary, tuple | list):
        primary = primary[0]
    carriers, stack = set(), [primary]
    while stack:
        node = stack.pop()
        if node in carriers:
            continue
        kind = graph.nodes[node]["kind"]
        if kind in ("linear", "experts"):
            stream.writers.append(Consumer(kind, node.target))
            continue
        carriers.add(node)
        if node.op == "placeholder":
            continue
        if _is_add(node):
            stack.extend(a for a in node.args if isinstance(a, fx.Node))
        elif _keeps_channels(node):
            stack.append(node.args[0])
        elif (scaled := _per_token_factor(node)) is not None:
            stack.append(scaled)
        else:
            stream.problem = f"the block output is computed by {_describe_node(node)}, which is neither an add nor a layer"
            return stream
    groups = {group.norm: group for group in find_norm_linear_groups(gm)}
    for node in carriers:
        for reader in _through(graph, node, _keeps_channels):
            kind = graph.nodes[reader]["kind"]
            if reader in carriers or reader.op == "output":
                continue
            if kind == "norm" and reader.target in groups:
                if groups[reader.target] not in stream.norms:
                    stream.norms.append(groups[reader.target])
            elif kind in ("linear", "experts") and _back(reader.args[0], _keeps_channels) in carriers:
                stream.direct_readers.append(Consumer(kind, reader.target))
            else:
                stream.problem = f"the residual stream is read by {_describe_node(reader)}, which is neither a norm feeding layers nor a layer"
                return stream
    return stream


def find_ov_pairs(gm: fx.GraphModule) -> list[OVPair]:
    """(v, o) Linear pairs around the attention kernel: v feeds the value input, o reads the output."""
    graph = to_networkx(gm)
    pairs = []
    for kernel in (n for n, kind in graph.nodes(data="kind") if kind == "attention"):
        value = kernel.args[2] if len(kernel.args) > 2 else kernel.kwargs.get("value")
        if not isinstance(value, fx.Node):
            continue
        v = _back(value, _is_shape_op)
        readers = _through(graph, kernel, _is_shape_op)
        value_shape = _shape(value)
        if graph.nodes.get(v, {}).get("kind") != "linear" or len(readers) != 1 or value_shape is None:
            continue
        o = readers[0]
        if graph.nodes[o]["kind"] == "quantizer":
            o = next(iter(o.users))
        if graph.nodes[o]["kind"] == "linear":
            pairs.append(OVPair(v=v.target, o=o.target, head_dim=value_shape[-1]))
    return pairs


def _linear_behind(graph: nx.DiGraph, node: fx.Node) -> fx.Node | None:
    node = _back(node, _is_cast)
    if graph.nodes[node]["kind"] == "quantizer":
        node = _back(node.args[0], _is_cast)
    return node if graph.nodes[node]["kind"] == "linear" else None


def find_up_down_pairs(gm: fx.GraphModule) -> list[UpDownPair]:
    """Linears `down(act(gate) * up)`: a scale on up's output rows moves exactly into down's input columns."""
    graph = to_networkx(gm)
    pairs = []
    for down in (n for n, kind in graph.nodes(data="kind") if kind == "linear"):
        source = down.args[0]
        if graph.nodes[source]["kind"] == "quantizer":
            source = source.args[0]
        product = _back(source, _is_cast)
        if not (product.op == "call_function" and product.target in MUL_FUNCTIONS and len(product.args) == 2):
            continue
        if not all(isinstance(a, fx.Node) for a in product.args) or len(_through(graph, product, _is_cast)) != 1:
            continue
        for up_side, act_side in (product.args, product.args[::-1]):
            up = _linear_behind(graph, up_side)
            if up is None or len(up.users) != 1:
                continue
            activation = _back(act_side, _is_cast)
            if graph.nodes[activation]["kind"] not in ("op", "module"):
                continue
            gate = _linear_behind(graph, activation.args[0]) if activation.args and isinstance(activation.args[0], fx.Node) else None
            if gate is not None and gate is not up:
                pairs.append(UpDownPair(gate=gate.target, up=up.target, down=down.target))
                break
    return pairs


def find_experts(gm: fx.GraphModule) -> list[str]:
    """Targets of fused MoE experts modules."""
    graph = to_networkx(gm)
    return [n.target for n, kind in graph.nodes(data="kind") if kind == "experts"]


def find_linears(gm: fx.GraphModule) -> list[str]:
    """Targets of the Linear layers the graph calls, in graph order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and node_kind(gm, n) == "linear"]
