"""Structure found in a block's fx graph, not in layer names.

The graph becomes a networkx DiGraph whose nodes carry a `kind`: linear, norm, attention,
experts, quantizer, weight (a parameter read), or op. Each finder matches one shape:

- norm → consumers: a norm whose output reaches only Linears / experts / `F.linear` with a
  parameter (MoE routers), through casts and views that keep the channel dimension;
- v → o: a Linear feeding the attention kernel's value input through shape ops, and the
  Linear reading the kernel's output;
- up → down: a Linear whose output is multiplied by act(gate) and then read by another Linear;
- experts: fused MoE experts modules (3-D `gate_up_proj` / `down_proj`);
- modulated norm → Linears (DiT blocks): readers of `norm(x) * (1 + scale) + shift` where scale and
  shift are chunks of one tensor, foldable when that tensor is a Linear's output in the block;
- explicit-multiply groups: Linears reading one tensor that no layer before them can absorb a
  scale into (a block input, a modulation that cannot be folded).
Shape ops are judged by the channel (last) dimension, from the shapes recorded by `propagate_shapes`.
The attention kernel is a `call_module` leaf (transformers) or a call of diffusers'
`dispatch_attention_fn` / `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimc.numerics.modules import FakeQuantExperts, FakeQuantize, QuantizedExperts, QuantizedLinear

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
    if node.op == "call_function" and getattr(node.target, "__name__", None) in ATTENTION_FUNCTION_NAMES:
        return "attention"
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


def _stream_problem(node: fx.Node) -> str:
    """Why the residual stream cannot be followed through `node` (which is neither an add nor a layer)."""
    if node.op == "call_function" and node.target in MUL_FUNCTIONS and all(isinstance(a, fx.Node) for a in node.args):
        for factor in node.args:
            pick = _chunk_pick(factor)
            if pick is not None:
                return (f"the block output is scaled per channel by chunk {pick[1]} of {_describe_value(pick[0].args[0])} "
                        f"at {_describe_node(node)} (an AdaLN gate); a rotation of the stream does not commute with a "
                        "per-channel scale")
    return f"the block output is computed by {_describe_node(node)}, which is neither an add nor a layer"


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
        elif _selects_tokens(node) or _joins_tokens(node):
            stack.extend(a for a in node.all_input_nodes if _shape(a) is not None)
        else:
            stream.problem = _stream_problem(node)
            return stream
    groups = {group.norm: group for group in find_norm_linear_groups(gm)}
    for node in sorted(carriers, key=lambda n: graph.nodes[n]["order"]):
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



# --- DiT blocks: AdaLN modulation and inputs that only an explicit multiply can scale ---------------


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


def _is_call(node: fx.Node, methods: set[str], functions: set) -> bool:
    return (node.op == "call_method" and node.target in methods) or (node.op == "call_function" and node.target in functions)


def _touches_last_dim(index, ndim: int) -> bool:
    """Whether `x[index]` on a tensor of rank `ndim` selects along the last dimension."""
    entries = [e for e in (index if isinstance(index, tuple) else (index,)) if e is not None]
    if Ellipsis in entries:
        trailing = entries[entries.index(Ellipsis) + 1:]
        last = trailing[-1] if trailing else None
    else:
        last = entries[ndim - 1] if len(entries) >= ndim else None
    return last is not None and last != slice(None)


def _selects_tokens(node: fx.Node) -> bool:
    """`x[index]` that leaves the last (channel) dimension whole."""
    source = node.args[0] if node.args else None
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(source, fx.Node)):
        return False
    shape = _shape(source)
    return shape is not None and not _touches_last_dim(node.args[1], len(shape))


def _joins_tokens(node: fx.Node) -> bool:
    """`torch.cat` along a dimension other than the last (channels)."""
    if not (node.op == "call_function" and node.target in CAT_FUNCTIONS):
        return False
    shape, dim = _shape(node), node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return shape is not None and isinstance(dim, int) and dim % len(shape) != len(shape) - 1


def _is_unsqueeze(node: fx.Node) -> bool:
    return _is_call(node, {"unsqueeze"}, {torch.unsqueeze})


def _carries_channels(node: fx.Node, carriers: set[fx.Node]) -> bool:
    """Whether `node` passes a carrier's channels on unchanged, only moving or selecting tokens."""
    if node.op == "call_function" and node.target in CAT_FUNCTIONS:
        return _joins_tokens(node) and all(isinstance(t, fx.Node) and t in carriers for t in node.args[0])
    source = node.args[0] if node.args else None
    if source not in carriers:
        return False
    if _keeps_channels(node) or _selects_tokens(node) or (node.op == "call_method" and node.target == "clone"):
        return True
    in_shape, out_shape = _shape(source), _shape(node)
    same_channels = in_shape is not None and out_shape is not None and in_shape[-1:] == out_shape[-1:]
    return same_channels and _is_call(node, {"unsqueeze", "squeeze"}, {torch.unsqueeze, torch.squeeze})


def _channel_readers(gm: fx.GraphModule, graph: nx.DiGraph, start: fx.Node) -> tuple[list[Consumer], list[fx.Node]]:
    """Who reads `start`'s channels, through ops that only move or select tokens (casts, views keeping the
    last dimension, token slices, concatenations of its own pieces): (Linear readers, other readers),
    in graph order. A quantizer in front of a Linear counts as the Linear; a tensor used only for
    its shape or dtype is not read."""
    carriers, linears, others = {start}, [], []
    for node in list(gm.graph.nodes)[graph.nodes[start]["order"] + 1:]:
        if not any(a in carriers for a in node.all_input_nodes) or _is_shape_query(node):
            continue
        if _is_cast(node) and node.args and node.args[0] not in carriers:
            continue  # `y.type_as(x)`, `y.to(x)`: x only gives a dtype
        if _carries_channels(node, carriers):
            carriers.add(node)
            continue
        kind = graph.nodes[node]["kind"]
        user = next(iter(node.users), None)
        if kind == "quantizer" and len(node.users) == 1 and graph.nodes[user]["kind"] == "linear":
            linears.append(Consumer("linear", user.target))
        elif kind == "linear" and node.args[0] in carriers:
            linears.append(Consumer("linear", node.target))
        else:
            others.append(node)
    return linears, others


def _chunk_path(node: fx.Node) -> bool:
    """Ops between a chunk of the modulation tensor and its use: casts, unsqueezes, `x[:, None]`."""
    return _is_cast(node) or _is_unsqueeze(node) or _selects_tokens(node)


def _chunk_pick(node: fx.Node) -> tuple[fx.Node, int] | None:
    """If `node` is `t.chunk(n, dim)[k]` (through casts and unsqueezes), the chunk node and k."""
    node = _back(node, _chunk_path)
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
        return None
    chunk = node.args[0]
    if isinstance(chunk, fx.Node) and _is_call(chunk, {"chunk"}, CHUNK_FUNCTIONS):
        return chunk, node.args[1]
    return None


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


def _match_modulation(graph: nx.DiGraph, node: fx.Node) -> _Modulation | None:
    """`node` = norm(x) * (1 + scale) + shift, either operand order, through casts, with scale and shift
    chunks of one tensor."""
    if not (_is_add(node) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)):
        return None
    for product, shift in (node.args, node.args[::-1]):
        product, shift_pick = _back(product, _is_cast), _chunk_pick(shift)
        if shift_pick is None or not (product.op == "call_function" and product.target in MUL_FUNCTIONS):
            continue
        for normed, factor in (product.args, product.args[::-1]):
            if not (isinstance(normed, fx.Node) and isinstance(factor, fx.Node)):
                continue
            norm, factor = _back(normed, _is_cast), _back(factor, _is_cast)
            if graph.nodes[norm]["kind"] != "norm" or not (_is_add(factor) and len(factor.args) == 2):
                continue
            scale = [a for a in factor.args if isinstance(a, fx.Node)]
            if len(scale) != 1 or not any(_is_one(a) for a in factor.args):
                continue
            scale_pick = _chunk_pick(scale[0])
            if scale_pick is not None and scale_pick[0] is shift_pick[0]:
                return _Modulation(norm, shift_pick[0], scale_pick[1], shift_pick[1], factor, product, node)
    return None


def _describe_value(node: fx.Node) -> str:
    """Where a tensor comes from, shortly: sums of parameters, layer outputs and block inputs."""
    node = _back(node, _is_cast)
    if _is_add(node) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return " + ".join(_describe_value(a) for a in node.args[:2])
    if node.op in ("get_attr", "call_module"):
        return str(node.target)
    if node.op == "placeholder":
        return f"{node.name} (a block input)"
    return _describe_node(node)


def _first(graph: nx.DiGraph, nodes) -> fx.Node:
    return min(nodes, key=lambda n: graph.nodes[n]["order"])


def _fold_problem(gm: fx.GraphModule, graph: nx.DiGraph, mod: _Modulation, others: list[fx.Node]) -> str | None:
    """Why a per-channel scale of the modulated output cannot fold into the modulation's rows, or None."""
    chunk = mod.chunk
    source = _back(chunk.args[0], _is_cast)
    if graph.nodes[source]["kind"] != "linear" or not isinstance(gm.get_submodule(source.target), nn.Linear):
        return f"scale and shift are chunks of {_describe_value(chunk.args[0])}, not rows of a Linear in the block"
    linear, shape = gm.get_submodule(source.target), _shape(source)
    dim = chunk.kwargs.get("dim", chunk.args[2] if len(chunk.args) > 2 else 0)
    chunks = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or linear.out_features % chunks:
        return f"the chunks of {source.target} are not equal groups of its output rows"
    if linear.bias is None:
        return f"{source.target} has no bias to absorb the 1 in 1 + scale"
    expected = {mod.scale_chunk: {mod.factor}, mod.shift_chunk: {mod.output}}
    for pick in (n for n in chunk.users if n.target is operator.getitem and n.args[1] in expected):
        outside = set(_through(graph, pick, _chunk_path)) - expected[pick.args[1]]
        if outside:
            return f"chunk {pick.args[1]} of {source.target} is also read by {_describe_node(_first(graph, outside))}"
    for node, reader in ((mod.factor, mod.product), (mod.product, mod.output)):
        outside = set(_through(graph, node, _is_cast)) - {reader}
        if outside:
            return f"{_describe_node(node)} is also read by {_describe_node(_first(graph, outside))}"
    if others:
        return f"the modulated output is also read by {_describe_node(others[0])}"
    return None


def find_modulation_groups(gm: fx.GraphModule) -> list[ModulationGroup]:
    """Linears reading an AdaLN-modulated norm output, `norm(x) * (1 + scale) + shift`, with where scale
    and shift come from and whether a scale of the output folds into their Linear's chunk rows."""
    graph = to_networkx(gm)
    groups = []
    for node in gm.graph.nodes:
        mod = _match_modulation(graph, node)
        if mod is None:
            continue
        readers, others = _channel_readers(gm, graph, node)
        if not readers:
            continue
        problem = _fold_problem(gm, graph, mod, others)
        source = _back(mod.chunk.args[0], _is_cast)
        chunks = mod.chunk.args[1] if len(mod.chunk.args) > 1 else mod.chunk.kwargs.get("chunks")
        groups.append(ModulationGroup(
            norm=mod.norm.target, readers=readers,
            source=source.target if problem is None else _describe_value(mod.chunk.args[0]),
            linear=source.target if problem is None else None, chunks=int(chunks),
            scale_chunk=mod.scale_chunk, shift_chunk=mod.shift_chunk, problem=problem,
        ))
    return groups


def find_multiply_groups(gm: fx.GraphModule) -> list[MultiplyGroup]:
    """Groups of Linears reading one tensor with no layer before them to fold a scale into: a block input
    read directly (through casts and views), or a modulated norm output whose modulation cannot be
    folded (see find_modulation_groups)."""
    graph = to_networkx(gm)
    groups = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        readers, _ = _channel_readers(gm, graph, node)
        if readers:
            groups.append(MultiplyGroup(f"block input {node.name}", readers, "they read a block input, with no layer before them"))
    for group in find_modulation_groups(gm):
        if not group.foldable:
            groups.append(MultiplyGroup(f"{group.norm}·(1 + scale) + shift", group.readers, group.problem))
    return groups
