"""Structure found in a block's fx graph, not in layer names.

`graph` turns a block's graph into a networkx DiGraph, built once per graph and kept until the graph
changes, whose nodes carry a `kind` (the leaf kinds shared with the tracer, `slimc.ir.leaves`) and in
which quantizer nodes are seen through. The finders match one shape each:

- `llm`: norm → consumers, the residual stream, v → o around the attention kernel, up → down, the k/v inputs
  of the attention kernel and their projections, and from these each Linear's role (q, k, v, o, gate, up, down);
- `dit`: AdaLN-modulated norm → Linears, and Linears only an explicit multiply can scale;
- `graph`: the Linears and the fused MoE experts a block calls, and which of them read the same tensor.

Shape ops are judged by the channel (last) dimension, from the shapes recorded by `propagate_shapes`.
The attention kernel is a `call_module` leaf (transformers) or a call of diffusers'
`dispatch_attention_fn` / `F.scaled_dot_product_attention`.
"""

from slimc.ir.leaves import is_experts_module
from slimc.patterns.dit import ModulationGroup, MultiplyGroup, find_modulation_groups, find_multiply_groups
from slimc.patterns.graph import (
    BlockGraph,
    Consumer,
    block_graph,
    dependency_levels,
    find_experts,
    find_linears,
    find_shared_inputs,
    node_kind,
    propagate_shapes,
    sublayer_output,
)
from slimc.patterns.llm import (
    KVInputs,
    NormGroup,
    OVPair,
    ResidualStream,
    UpDownPair,
    find_kv_inputs,
    find_norm_linear_groups,
    find_ov_pairs,
    find_residual_stream,
    find_up_down_pairs,
    linear_roles,
)

__all__ = [
    "BlockGraph",
    "Consumer",
    "KVInputs",
    "ModulationGroup",
    "MultiplyGroup",
    "NormGroup",
    "OVPair",
    "ResidualStream",
    "UpDownPair",
    "block_graph",
    "dependency_levels",
    "find_experts",
    "find_kv_inputs",
    "find_linears",
    "find_modulation_groups",
    "find_multiply_groups",
    "find_norm_linear_groups",
    "find_ov_pairs",
    "find_residual_stream",
    "find_shared_inputs",
    "find_up_down_pairs",
    "is_experts_module",
    "linear_roles",
    "node_kind",
    "propagate_shapes",
    "sublayer_output",
]
