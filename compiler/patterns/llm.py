"""Transformer-block patterns first met in decoder LLMs (and found in any block that has them):

- norm → consumers: a norm whose output reaches only Linears / experts / `F.linear` with a
  parameter (MoE routers), through casts and views that keep the channel dimension;
- the residual stream: what reads the hidden states a block passes on, and what writes into them;
- v → o: a Linear feeding the attention kernel's value input through shape ops, and the
  Linear reading the kernel's output;
- up → down: a Linear whose output is multiplied by act(gate) and then read by another Linear;
- k, v → the attention kernel: the key and value tensors the kernel reads (the keys after RoPE), and the one
  Linear each is computed from, which a KV cache quantizer is named after;
- each Linear's role (q, k, v, o, gate, up, down), from the patterns above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx

from slimc.numerics.hadamard import OnlineHadamard
from slimc.patterns.graph import (
    BlockGraph,
    Consumer,
    block_graph,
    describe_node,
    find_linears,
    find_shared_inputs,
    is_add,
    is_cast,
    is_mul,
    is_shape_op,
    joins_tokens,
    keeps_channels,
    selects_tokens,
    shape_of,
)


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
class KVInputs:
    """The key and value inputs (args 1 and 2, shaped (batch, kv_heads, tokens, head_dim)) of an attention kernel
    node, and the Linears they are computed from."""

    kernel: fx.Node
    k: str
    v: str
    heads: int
    head_dim: int


@dataclass(frozen=True)
class UpDownPair:
    gate: str | None
    up: str
    down: str
    rotation: str | None = None  # the online rotation before the down projection (rotate's), which the pair spans


def _router_weight(graph: BlockGraph, node: fx.Node, source: fx.Node) -> str | None:
    """If `node` is F.linear(source-path, parameter), the parameter's name."""
    if node.op != "call_function" or node.target is not F.linear or len(node.args) < 2:
        return None
    weight = graph.back(node.args[1], is_cast) if isinstance(node.args[1], fx.Node) else None
    if weight is None or weight.op != "get_attr" or weight is source:
        return None
    return weight.target


def find_norm_linear_groups(gm: fx.GraphModule) -> list[NormGroup]:
    """Norms whose output is read only by layers that can absorb a per-input-channel scale."""
    graph = block_graph(gm)
    groups = []
    for norm in graph.of_kind("norm"):
        group = NormGroup(norm=norm.target)
        for reader in graph.through(norm, keeps_channels):
            kind = graph.kind(reader)
            if kind in ("linear", "experts") and graph.back(reader.args[0], keeps_channels) is norm:
                group.consumers.append(Consumer(kind, reader.target))
            elif (weight := _router_weight(graph, reader, norm)) is not None:
                group.consumers.append(Consumer("weight", weight))
            else:
                break
        else:
            if group.consumers:
                groups.append(group)
    return groups


def _per_token_factor(node: fx.Node) -> fx.Node | None:
    """If `node` multiplies a tensor by a per-token (last dim 1) or scalar factor, that tensor."""
    if not (is_mul(node) and len(node.args) == 2):
        return None
    a, b = node.args
    for tensor, factor in ((a, b), (b, a)):
        if isinstance(tensor, fx.Node) and (not isinstance(factor, fx.Node) or (shape_of(factor) or (0,))[-1:] == (1,)):
            return tensor
    return None


def _stream_problem(graph: BlockGraph, node: fx.Node) -> str:
    """Why the residual stream cannot be followed through `node` (which is neither an add nor a layer)."""
    if is_mul(node) and all(isinstance(a, fx.Node) for a in node.args):
        for factor in node.args:
            pick = graph.chunk_pick(factor)
            if pick is not None:
                return (f"the block output is scaled per channel by chunk {pick[1]} of {graph.describe_value(pick[0].args[0])} "
                        f"at {describe_node(node)} (an AdaLN gate); a rotation of the stream does not commute with a "
                        "per-channel scale")
    return f"the block output is computed by {describe_node(node)}, which is neither an add nor a layer"


def find_residual_stream(gm: fx.GraphModule) -> ResidualStream:
    """Follow the block's hidden-state output back to its input: adds, casts and per-token scalings
    carry the stream; the Linears and experts they reach write into it. Then every reader of the
    stream must be a norm whose readers absorb a scale (see find_norm_linear_groups) or a layer."""
    graph = block_graph(gm)
    stream = ResidualStream()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    primary = output.args[0]
    while isinstance(primary, tuple | list):
        primary = primary[0]
    carriers, stack = set(), [graph.behind(primary)]
    while stack:
        node = stack.pop()
        if node in carriers:
            continue
        kind = graph.kind(node)
        if kind in ("linear", "experts"):
            stream.writers.append(Consumer(kind, node.target))
            continue
        carriers.add(node)
        if node.op == "placeholder":
            continue
        if is_add(node):
            stack.extend(graph.behind(a) for a in node.args if isinstance(a, fx.Node))
        elif keeps_channels(node):
            stack.append(graph.arg(node))
        elif (scaled := _per_token_factor(node)) is not None:
            stack.append(graph.behind(scaled))
        elif selects_tokens(node) or joins_tokens(node):
            stack.extend(a for a in graph.inputs(node) if shape_of(a) is not None)
        else:
            stream.problem = _stream_problem(graph, node)
            return stream
    groups = {group.norm: group for group in find_norm_linear_groups(gm)}
    for node in sorted(carriers, key=graph.order):
        for reader in graph.through(node, keeps_channels):
            kind = graph.kind(reader)
            if reader in carriers or reader.op == "output":
                continue
            if kind == "norm" and reader.target in groups:
                if groups[reader.target] not in stream.norms:
                    stream.norms.append(groups[reader.target])
            elif kind in ("linear", "experts") and graph.back(reader.args[0], keeps_channels) in carriers:
                stream.direct_readers.append(Consumer(kind, reader.target))
            else:
                stream.problem = f"the residual stream is read by {describe_node(reader)}, which is neither a norm feeding layers nor a layer"
                return stream
    return stream


def find_ov_pairs(gm: fx.GraphModule) -> list[OVPair]:
    """(v, o) Linear pairs around the attention kernel: v feeds the value input, o reads the output."""
    graph = block_graph(gm)
    pairs = []
    for kernel in graph.of_kind("attention"):
        value = kernel.args[2] if len(kernel.args) > 2 else kernel.kwargs.get("value")
        if not isinstance(value, fx.Node):
            continue
        v = graph.back(value, is_shape_op)
        readers = graph.through(kernel, is_shape_op)
        value_shape = shape_of(value)
        if graph.kind(v) != "linear" or len(readers) != 1 or value_shape is None:
            continue
        if graph.kind(readers[0]) == "linear":
            pairs.append(OVPair(v=v.target, o=readers[0].target, head_dim=value_shape[-1]))
    return pairs


def _linear_behind(graph: BlockGraph, node: fx.Node) -> fx.Node | None:
    node = graph.back(node, is_cast)
    return node if graph.kind(node) == "linear" else None


def find_up_down_pairs(gm: fx.GraphModule) -> list[UpDownPair]:
    """Linears `down(act(gate) * up)`, or `down(rotation(act(gate) * up))` with an online rotation between: a scale on
    up's output rows moves exactly into down's input columns (taken back through the rotation)."""
    graph = block_graph(gm)
    pairs = []
    for down in graph.of_kind("linear"):
        source, rotation = graph.arg(down), None
        if _is_online_rotation(gm, source) and len(graph.users(source)) == 1:
            source, rotation = graph.arg(source), source.target
        product = graph.back(source, is_cast)
        if not (is_mul(product) and len(product.args) == 2):
            continue
        if not all(isinstance(a, fx.Node) for a in product.args) or len(graph.through(product, is_cast)) != 1:
            continue
        for up_side, act_side in (product.args, product.args[::-1]):
            up = _linear_behind(graph, up_side)
            if up is None or len(graph.users(up)) != 1:
                continue
            activation = graph.back(act_side, is_cast)
            if graph.kind(activation) not in ("op", "module"):
                continue
            gate = _linear_behind(graph, activation.args[0]) if activation.args and isinstance(activation.args[0], fx.Node) else None
            if gate is not None and gate is not up:
                pairs.append(UpDownPair(gate=gate.target, up=up.target, down=down.target, rotation=rotation))
                break
    return pairs


def _is_online_rotation(gm: fx.GraphModule, value: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "call_module" and isinstance(gm.get_submodule(value.target), OnlineHadamard)


def _source_linear(graph: BlockGraph, value: fx.Node) -> fx.Node | None:
    """The one Linear a tensor is computed from (through any ops: views, norms, RoPE's products with cos and sin
    read from block inputs); None when it is computed from none or several."""
    found, stack, seen = set(), [graph.behind(value)], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = graph.kind(node)
        if kind == "linear":
            found.add(node)
        elif kind not in ("experts", "attention"):
            stack.extend(graph.inputs(node))
    return found.pop() if len(found) == 1 else None


def find_kv_inputs(gm: fx.GraphModule) -> list[KVInputs]:
    """Attention kernels whose key and value inputs (positional, as transformers' kernels take them) are
    (batch, kv_heads, tokens, head_dim) tensors each computed from one Linear (k_proj, v_proj), in graph order."""
    graph = block_graph(gm)
    found = []
    for kernel in graph.of_kind("attention"):
        inputs = kernel.args[1:3]
        if len(inputs) != 2 or not all(isinstance(x, fx.Node) for x in inputs):
            continue
        shapes = [shape_of(graph.behind(x)) for x in inputs]
        if any(shape is None or len(shape) != 4 for shape in shapes) or shapes[0][1] != shapes[1][1]:
            continue
        k, v = (_source_linear(graph, x) for x in inputs)
        if k is not None and v is not None and k is not v:
            found.append(KVInputs(kernel, k.target, v.target, heads=shapes[1][1], head_dim=shapes[1][3]))
    return found


def linear_roles(gm: fx.GraphModule) -> dict[str, str]:
    """Each Linear's role, from the patterns found in the block's graph (not from its name): the projections
    reaching the attention kernel (k, v) and the one reading its output (o), the Linears sharing k's input (q),
    the MLP's gate, up and down; any other is `linear`."""
    kinds: dict[str, str] = {}
    for pair in find_up_down_pairs(gm):
        kinds.update({pair.up: "up", pair.down: "down"} | ({pair.gate: "gate"} if pair.gate else {}))
    for pair in find_ov_pairs(gm):
        kinds.update({pair.v: "v", pair.o: "o"})
    for kv in find_kv_inputs(gm):
        kinds.update({kv.k: "k", kv.v: "v"})
    linears = find_linears(gm)
    for group in find_shared_inputs(gm, linears):
        if any(kinds.get(target) in ("k", "v") for target in group):
            for target in group:
                kinds.setdefault(target, "q")
    return {target: kinds.get(target, "linear") for target in linears}
