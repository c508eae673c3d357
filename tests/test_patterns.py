"""Structure is found from each block's graph, for every family, and not from layer names."""

import pytest
import torch
from programs import run_pipeline
from tiny_models import FAMILIES, tiny_causal_lm
from torch import nn

from slimc.ir import Block
from slimc.ir.leaves import leaf_kind
from slimc.ir.tracer import is_leaf_module, trace_block
from slimc.numerics.modules import ChannelScale, FakeQuantize
from slimc.patterns import (
    block_graph,
    dependency_levels,
    find_experts,
    find_linears,
    find_modulation_groups,
    find_multiply_groups,
    find_norm_linear_groups,
    find_ov_pairs,
    find_residual_stream,
    find_shared_inputs,
    find_up_down_pairs,
    propagate_shapes,
    sublayer_output,
)
from slimc.patterns import graph as block_graphs
from slimc.schemes import TensorScheme


def traced_blocks(family):
    program, _ = run_pipeline(tiny_causal_lm(family), [])
    return program.blocks


def groups_by_norm(gm):
    return {g.norm: sorted((c.kind, c.target) for c in g.consumers) for g in find_norm_linear_groups(gm)}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dense_layers_have_the_three_groups(family):
    gm = traced_blocks(family)[0].graph_module
    assert groups_by_norm(gm) == {
        "input_layernorm": [("linear", "self_attn.k_proj"), ("linear", "self_attn.q_proj"), ("linear", "self_attn.v_proj")],
        "post_attention_layernorm": [("linear", "mlp.gate_proj"), ("linear", "mlp.up_proj")],
    }
    (ov,) = find_ov_pairs(gm)
    assert (ov.v, ov.o, ov.head_dim) == ("self_attn.v_proj", "self_attn.o_proj", 16)
    (ud,) = find_up_down_pairs(gm)
    assert (ud.gate, ud.up, ud.down) == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert find_experts(gm) == []


def calls_of(gm, *targets):
    return [node for node in gm.graph.nodes if node.op == "call_module" and node.target in targets]


@pytest.mark.parametrize("family", ["llama", "qwen3", "glm4_moe"])
def test_a_sublayer_ends_at_the_linear_every_path_from_its_inputs_passes(family):
    """The attention's norm with q/k/v, and v, end at o_proj; the MLP's norm with gate/up, and up, at down_proj."""
    gm = traced_blocks(family)[0].graph_module
    (o_proj,), (down_proj,) = calls_of(gm, "self_attn.o_proj"), calls_of(gm, "mlp.down_proj")
    assert sublayer_output(gm, calls_of(gm, "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) is o_proj
    assert sublayer_output(gm, calls_of(gm, "self_attn.v_proj", "self_attn.o_proj")) is o_proj
    assert sublayer_output(gm, calls_of(gm, "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj")) is down_proj
    assert sublayer_output(gm, calls_of(gm, "mlp.up_proj", "mlp.down_proj")) is down_proj


def test_fused_experts_beside_a_router_close_no_sublayer_before_the_block_output():
    """Qwen3-MoE's MLP norm feeds the router and the experts, which meet in the routing's sum: no Linear is on every
    path, so a search measures the block's output there; the attention still ends at o_proj."""
    gm = traced_blocks("qwen3_moe")[0].graph_module
    norm = calls_of(gm, "post_attention_layernorm")
    assert len(norm) == 1 and sublayer_output(gm, norm + calls_of(gm, "mlp.experts")) is None
    attention = calls_of(gm, "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert sublayer_output(gm, attention) is calls_of(gm, "self_attn.o_proj")[0]


def test_qwen3_q_and_k_norms_after_the_projections_are_not_foldable_groups():
    gm = traced_blocks("qwen3")[0].graph_module
    assert "self_attn.q_norm" not in groups_by_norm(gm)
    assert "self_attn.k_norm" not in groups_by_norm(gm)


def test_qwen3_moe_norm_feeds_the_router_weight_and_the_fused_experts():
    gm = traced_blocks("qwen3_moe")[0].graph_module
    assert groups_by_norm(gm)["post_attention_layernorm"] == [("experts", "mlp.experts"), ("weight", "mlp.gate.weight")]
    assert find_experts(gm) == ["mlp.experts"]
    assert find_up_down_pairs(gm) == []
    assert [p.v for p in find_ov_pairs(gm)] == ["self_attn.v_proj"]


def test_glm4_moe_has_a_dense_first_layer_then_router_experts_and_shared_experts():
    dense, moe = traced_blocks("glm4_moe")
    assert find_experts(dense.graph_module) == []
    assert groups_by_norm(moe.graph_module)["post_attention_layernorm"] == [
        ("experts", "mlp.experts"),
        ("linear", "mlp.shared_experts.gate_proj"),
        ("linear", "mlp.shared_experts.up_proj"),
        ("weight", "mlp.gate.weight"),
    ]
    assert [(p.up, p.down) for p in find_up_down_pairs(moe.graph_module)] == [("mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")]


class OddlyNamedBlock(nn.Module):
    """A pre-norm transformer block with none of the usual names: the patterns must still find it."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.pre = nn.LayerNorm(dim)
        self.a, self.b, self.c, self.d = (nn.Linear(dim, dim) for _ in range(4))
        self.post = nn.RMSNorm(dim)
        self.w1, self.w3 = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim)
        self.w2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        batch, seq, dim = x.shape
        h = self.pre(x)
        q, k, v = (lin(h).view(batch, seq, self.heads, -1).transpose(1, 2) for lin in (self.a, self.b, self.c))
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.d(attn.transpose(1, 2).reshape(batch, seq, dim))
        h = self.post(x)
        return x + self.w2(nn.functional.silu(self.w1(h)) * self.w3(h))


def test_patterns_do_not_depend_on_layer_names():
    block = OddlyNamedBlock().eval()
    x = torch.randn(2, 5, 32)
    traced = trace_block(block, (x,), {}, name="odd")
    gm = traced.graph_module
    propagate_shapes(gm, traced.flatten_inputs((x,), {}))
    assert groups_by_norm(gm) == {
        "pre": [("linear", "a"), ("linear", "b"), ("linear", "c")],
        "post": [("linear", "w1"), ("linear", "w3")],
    }
    assert [(p.up, p.down, p.gate) for p in find_up_down_pairs(gm)] == [("w3", "w2", "w1")]
    assert find_linears(gm) == ["a", "b", "c", "d", "w1", "w3", "w2"]


def test_a_norm_read_by_something_other_than_linears_is_not_a_group():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            h = self.norm(x)
            return self.proj(h) + h  # h is also read directly: no scale can fold into the norm

    traced = trace_block(Block().eval(), (torch.randn(2, 8),), {}, name="b")
    propagate_shapes(traced.graph_module, traced.flatten_inputs((torch.randn(2, 8),), {}))
    assert find_norm_linear_groups(traced.graph_module) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_of_every_block_is_in_the_graph(family):
    for block in traced_blocks(family):
        in_module = {n for n, m in block.module.named_modules() if isinstance(m, nn.Linear)}
        assert set(find_linears(block.graph_module)) == in_module


def structure(gm):
    """What every LLM finder reports on a block graph."""
    ov, ud, stream = find_ov_pairs(gm), find_up_down_pairs(gm), find_residual_stream(gm)
    return (groups_by_norm(gm), [(p.v, p.o, p.head_dim) for p in ov], [(p.gate, p.up, p.down) for p in ud],
            find_linears(gm), find_experts(gm), sorted(g.norm for g in stream.norms),
            [(c.kind, c.target) for c in stream.writers], stream.problem)


def count_graph_builds(monkeypatch) -> list:
    builds = []

    class CountedBlockGraph(block_graphs.BlockGraph):
        def __init__(self, gm):
            builds.append(gm)
            super().__init__(gm)

    monkeypatch.setattr(block_graphs, "BlockGraph", CountedBlockGraph)
    return builds


def test_the_block_graph_is_built_once_for_every_finder(monkeypatch):
    gm = traced_blocks("llama")[0].graph_module
    builds = count_graph_builds(monkeypatch)
    structure(gm)
    find_modulation_groups(gm)
    find_multiply_groups(gm)
    assert builds == [gm]
    assert block_graph(gm) is block_graph(gm)


def test_the_block_graph_is_built_again_when_the_graph_changes(monkeypatch):
    block = traced_blocks("llama")[0]
    before = block_graph(block.graph_module)
    builds = count_graph_builds(monkeypatch)
    block.insert_input_quantizer("mlp.down_proj", FakeQuantize(TensorScheme()))
    find_up_down_pairs(block.graph_module)
    find_linears(block.graph_module)
    assert builds == [block.graph_module] and block_graph(block.graph_module) is not before


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_quantizers_between_layers_are_seen_through(family):
    block = traced_blocks(family)[0]
    gm = block.graph_module
    expected = structure(gm)
    for target in find_linears(gm):
        block.insert_input_quantizer(target, FakeQuantize(TensorScheme()))
    quantizers = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize)]
    assert len(quantizers) == len(expected[3])
    assert structure(gm) == expected


def test_a_quantizer_before_a_linear_reading_a_block_input_is_seen_through():
    module = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    traced = trace_block(module, (x,), {}, name="b")
    propagate_shapes(traced.graph_module, traced.flatten_inputs((x,), {}))
    block = Block("b", module, nn.ModuleList([module]), 0, traced=traced)
    block.insert_input_quantizer("0", FakeQuantize(TensorScheme()))
    assert [[c.target for c in g.readers] for g in find_multiply_groups(block.graph_module)] == [["0"]]


def test_slimc_modules_put_into_graphs_declare_their_leaf_kind():
    assert leaf_kind(FakeQuantize(TensorScheme())) == "quantizer"
    assert leaf_kind(ChannelScale(torch.ones(4))) == "module"
    assert is_leaf_module(ChannelScale(torch.ones(4)))


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_every_call_module_node_is_a_leaf_of_the_tracers_table(family):
    gm = traced_blocks(family)[0].graph_module
    kinds = {n.target: leaf_kind(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert None not in kinds.values()
    assert [t for t, k in kinds.items() if k == "linear"] == find_linears(gm)
    assert [t for t, k in kinds.items() if k == "experts"] == find_experts(gm)


def test_linears_reading_one_node_behind_their_quantizers_share_an_input_and_a_rotated_one_does_not():
    block = traced_blocks("llama")[0]
    linears = find_linears(block.graph_module)
    for target in linears:
        block.insert_input_quantizer(target, FakeQuantize(TensorScheme()))
    assert find_shared_inputs(block.graph_module, linears) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    block.insert_input_node("self_attn.q_proj", block.rotation_target("self_attn.q_proj"), nn.Identity())
    assert find_shared_inputs(block.graph_module, linears)[:2] == [["self_attn.q_proj"], ["self_attn.k_proj", "self_attn.v_proj"]]


def test_dependency_levels_order_a_decoder_layers_linears_by_what_reaches_them():
    block = traced_blocks("llama")[0]
    linears = find_linears(block.graph_module)
    for target in linears:  # seen through, as when calibrate asks
        block.insert_input_quantizer(target, FakeQuantize(TensorScheme()))
    assert dependency_levels(block.graph_module, linears) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_dependency_levels_put_fused_experts_beside_the_shared_experts_gate_and_up():
    _, moe = traced_blocks("glm4_moe")
    gm = moe.graph_module
    levels = dependency_levels(gm, [*find_linears(gm), *find_experts(gm)])
    assert levels[:2] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    assert sorted(levels[2]) == ["mlp.experts", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"]
    assert levels[3:] == [["mlp.shared_experts.down_proj"]]
