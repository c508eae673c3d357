"""The block tracer: graphs that equal the real decoder layers, with the leaves passes match on."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import torch
from tiny_models import FAMILIES, capture_layer_inputs, tiny_batch, tiny_causal_lm
from torch import fx, nn
from transformers import PreTrainedModel

from slimc.errors import TraceError
from slimc.ir.tracer import AttentionKernel, TracedBlock, is_leaf_module, trace_block


@dataclass
class Traced:
    family: str
    model: PreTrainedModel
    inputs: list[tuple[tuple, dict]]  # per layer, from a (2, 16) batch
    other_inputs: list[tuple[tuple, dict]]  # per layer, from a (2, 11) batch with other padding
    blocks: list[TracedBlock]

    def layers(self):
        return zip(self.model.model.layers, self.blocks, self.inputs, self.other_inputs)


@pytest.fixture(scope="module", params=FAMILIES)
def traced(request) -> Traced:
    model = tiny_causal_lm(request.param)
    inputs = capture_layer_inputs(model, *tiny_batch(16, pad=3))
    other_inputs = capture_layer_inputs(model, *tiny_batch(11, pad=5, seed=1))
    blocks = [
        trace_block(layer, args, kwargs, name=f"model.layers.{i}")
        for i, (layer, (args, kwargs)) in enumerate(zip(model.model.layers, inputs))
    ]
    return Traced(request.param, model, inputs, other_inputs, blocks)


def call_targets(block: TracedBlock) -> list[str]:
    return [node.target for node in block.graph_module.graph.nodes if node.op == "call_module"]


# --- equality with the real layers ---


def test_graph_equals_layer_exactly_on_captured_inputs(traced):
    for layer, block, (args, kwargs), _ in traced.layers():
        with torch.no_grad():
            assert torch.equal(block(*args, **kwargs), layer(*args, **kwargs))


def test_graph_equals_layer_on_inputs_of_another_sequence_length(traced):
    for layer, block, _, (args, kwargs) in traced.layers():
        assert block.matches(args, kwargs)
        with torch.no_grad():
            assert torch.equal(block(*args, **kwargs), layer(*args, **kwargs))


def test_run_flat_equals_forward(traced):
    layer, block, (args, kwargs), _ = next(iter(traced.layers()))
    with torch.no_grad():
        assert torch.equal(block.run_flat(block.flatten_inputs(args, kwargs)), block(*args, **kwargs))


def test_model_with_traced_layers_in_place_gives_the_same_logits():
    model = tiny_causal_lm("qwen2")
    input_ids, attention_mask = tiny_batch(16)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    layers = model.model.layers
    inputs = capture_layer_inputs(model, input_ids, attention_mask)
    for i, (args, kwargs) in enumerate(inputs):
        layers[i] = trace_block(layers[i], args, kwargs, name=f"model.layers.{i}")
    with torch.no_grad():
        actual = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    assert torch.equal(actual, expected)


# --- graph structure ---


def test_every_linear_is_a_call_module_node_under_its_dotted_name(traced):
    for layer, block, _, _ in traced.layers():
        linears = sorted(name for name, module in layer.named_modules() if isinstance(module, nn.Linear))
        assert linears
        assert sorted(t for t in call_targets(block) if t in linears) == linears


def test_leaf_modules_are_the_layers_own_modules(traced):
    for layer, block, _, _ in traced.layers():
        for target in call_targets(block):
            assert block.graph_module.get_submodule(target) is layer.get_submodule(target)


def test_norms_are_call_module_nodes(traced):
    for _, block, _, _ in traced.layers():
        assert {"input_layernorm", "post_attention_layernorm"} <= set(call_targets(block))


def test_attention_is_one_call_module_node(traced):
    inlined = {torch.nn.functional.scaled_dot_product_attention, torch.matmul, torch.nn.functional.softmax}
    for _, block, _, _ in traced.layers():
        graph_module = block.graph_module
        kernels = [t for t in call_targets(block) if isinstance(graph_module.get_submodule(t), AttentionKernel)]
        assert kernels == ["self_attn.attention_kernel"]
        in_attention = [n for n in graph_module.graph.nodes if "self_attn" in n.meta.get("nn_module_stack", {})]
        assert in_attention
        assert not [n for n in in_attention if n.target in inlined]


def test_residual_adds_and_activation_are_call_function_nodes(traced):
    for layer, block, _, _ in traced.layers():
        functions = {node.target for node in block.graph_module.graph.nodes if node.op == "call_function"}
        assert {operator.add, operator.mul} <= functions
        assert hasattr(layer.mlp, "experts") or torch.nn.functional.silu in functions


def test_moe_experts_are_one_call_module_leaf(traced):
    moe_layers = [(layer, block) for layer, block, _, _ in traced.layers() if hasattr(layer.mlp, "experts")]
    if traced.family not in ("qwen3_moe", "glm4_moe"):
        assert not moe_layers
        return
    assert moe_layers
    for _, block in moe_layers:
        targets = call_targets(block)
        assert targets.count("mlp.experts") == 1
        assert not [t for t in targets if t.startswith("mlp.experts.")]


def test_graph_runs_with_eager_attention_after_tracing_with_sdpa():
    model = tiny_causal_lm("llama")
    args, kwargs = capture_layer_inputs(model, *tiny_batch(16))[0]
    layer = model.model.layers[0]
    block = trace_block(layer, args, kwargs, name="model.layers.0")
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        assert torch.equal(block(*args, **kwargs), layer(*args, **kwargs))


def test_tracing_adds_no_weights_to_the_model(traced):
    assert traced.model.state_dict().keys() == tiny_causal_lm(traced.family).state_dict().keys()


def test_traced_block_reads_other_attributes_through_to_the_layer(traced):
    layer, block, _, _ = next(iter(traced.layers()))
    assert block.hidden_size == layer.hidden_size


# --- refusing inputs that do not fit the specialisation ---


def first_layer_inputs(traced: Traced) -> tuple[TracedBlock, tuple, dict]:
    _, block, (args, kwargs), _ = next(iter(traced.layers()))
    return block, args, kwargs


def test_input_of_another_rank_does_not_match(traced):
    block, (hidden, *rest), kwargs = first_layer_inputs(traced)
    args = (hidden.reshape(-1, hidden.shape[-1]), *rest)
    assert not block.matches(args, kwargs)
    with pytest.raises(TraceError, match=r"model\.layers\.0.*hidden_states.*rank 2.*rank 3"):
        block(*args, **kwargs)


def test_input_of_another_dtype_does_not_match(traced):
    block, (hidden, *rest), kwargs = first_layer_inputs(traced)
    args = (hidden.double(), *rest)
    assert not block.matches(args, kwargs)
    with pytest.raises(TraceError, match="hidden_states has dtype torch.float64"):
        block(*args, **kwargs)


def test_inputs_of_another_structure_do_not_match(traced):
    block, args, kwargs = first_layer_inputs(traced)
    kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
    assert not block.matches(args, kwargs)
    with pytest.raises(TraceError, match="traced with .*position_ids"):
        block(*args, **kwargs)


def test_another_constant_does_not_match(traced):
    block, args, kwargs = first_layer_inputs(traced)
    kwargs = {**kwargs, "use_cache": True}
    assert not block.matches(args, kwargs)
    with pytest.raises(TraceError, match="use_cache is True, traced with False"):
        block(*args, **kwargs)


# --- value-carrying proxies on small blocks ---


class BranchOnSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 4:
            return self.proj(x) * 2
        return self.proj(x)


class UnpackAndChunk(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, width = x.shape
        total = x.new_zeros(())
        for i, part in enumerate(x.chunk(2, dim=-1)):
            total = total + part * (i + 1)
        return total.reshape(*lead, width // 2)


class SetItem(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[..., 0::2] = x[..., 1::2]
        return out


class IntOfSize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * int(x.shape[0])


class NeedsARealTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError("expected a tensor")
        return x


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class IgnoresExtras(nn.Module):
    """Like HunyuanVideo's dual/single blocks: extra arguments are swallowed and never read."""

    def forward(self, x: torch.Tensor, scale: float | None = None, *args, **kwargs) -> torch.Tensor:
        return x * 2 if scale is None else x * scale


class ReadsExtras(nn.Module):
    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return x * args[0]


class FunctionAsModule(nn.Module):
    """What transformers' kernel-hub decorator makes of a function such as `apply_rotary_pos_emb`: a module
    instance called like the function, owned by no model."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * y, x - y


class SharedScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.5, 2.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


PAIRWISE = FunctionAsModule()
SHARED_SCALE = SharedScale()


class CallsModulesItDoesNotOwn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product, difference = PAIRWISE(self.proj(x), x)
        return SHARED_SCALE(product) + difference


def test_modules_called_but_not_owned_by_the_block_are_traced_through_as_functions():
    block_module = CallsModulesItDoesNotOwn()
    block = trace_block(block_module, (torch.randn(2, 4, 3),), {}, name="toy")
    assert call_targets(block) == ["proj"]  # the block's own leaf only; the helpers became graph nodes
    x = torch.randn(5, 7, 3)
    with torch.no_grad():
        assert torch.equal(block(x), block_module(x))
    owned = {id(p) for p in block_module.parameters()}
    assert all(id(p) in owned for p in block.graph_module.parameters())  # the helper's parameter became a constant


def test_constants_a_block_never_reads_from_its_star_args_match_any_value_of_their_type():
    block = trace_block(IgnoresExtras(), (torch.randn(2, 3), None, 4), {"flag": 7}, name="toy")
    x = torch.randn(2, 3)
    assert block.matches((x, None, 12), {"flag": 9})
    assert torch.equal(block(x, None, 12, flag=9), x * 2)
    assert not block.matches((x, None, "12"), {"flag": 9})  # another type
    assert not block.matches((x, 3.0, 12), {"flag": 9})  # a named parameter stays a constant


def test_constants_a_block_reads_from_its_star_args_stay_baked_in():
    block = trace_block(ReadsExtras(), (torch.randn(2, 3), 4), {}, name="toy")
    x = torch.randn(2, 3)
    assert torch.equal(block(x, 4), x * 4)
    with pytest.raises(TraceError, match="input arg1 is 5, traced with 4"):
        block(x, 5)


def test_shape_unpacking_and_chunk_iteration_stay_symbolic_in_sizes():
    block = trace_block(UnpackAndChunk(), (torch.randn(2, 5, 8),), {}, name="toy")
    x = torch.randn(3, 7, 6)
    assert block.matches((x,), {})
    assert torch.equal(block(x), UnpackAndChunk()(x))


def test_branch_on_a_size_is_guarded():
    module = BranchOnSize()
    block = trace_block(module, (torch.randn(2, 6, 8),), {}, name="toy")
    assert block.matches((torch.randn(3, 9, 8),), {})
    assert not block.matches((torch.randn(2, 3, 8),), {})
    with pytest.raises(TraceError, match=r"guard bool\(gt\(x\.shape\[1\], 4\)\) == True fails"):
        block(torch.randn(2, 3, 8))


def test_int_of_a_size_is_guarded():
    block = trace_block(IntOfSize(), (torch.randn(2, 3),), {}, name="toy")
    assert block.matches((torch.randn(2, 5),), {})
    assert not block.matches((torch.randn(4, 3),), {})


def test_setitem_is_a_graph_node():
    block = trace_block(SetItem(), (torch.randn(2, 6),), {}, name="toy")
    assert operator.setitem in {n.target for n in block.graph_module.graph.nodes}
    x = torch.randn(3, 10)
    assert torch.equal(block(x), SetItem()(x))


def test_tuple_inputs_become_one_placeholder_per_tensor(traced):
    block, args, kwargs = first_layer_inputs(traced)
    placeholders = [n.name for n in block.graph_module.graph.nodes if n.op == "placeholder"]
    assert {"hidden_states", "position_embeddings_0", "position_embeddings_1"} <= set(placeholders)
    assert len(placeholders) == len(block.flatten_inputs(args, kwargs))


def test_untraceable_block_raises_trace_error_naming_the_block():
    with pytest.raises(TraceError, match=r"cannot trace block 'toy'.*expected a tensor"):
        trace_block(NeedsARealTensor(), (torch.randn(2, 3),), {}, name="toy")


def test_block_whose_graph_differs_raises_trace_error():
    with pytest.raises(TraceError, match=r"block 'toy': the traced graph differs.*max abs"):
        trace_block(Noisy(), (torch.randn(2, 3),), {}, name="toy")


# --- the leaf rule ---


def test_leaf_rule(traced):
    layer = traced.model.model.layers[-1]
    assert is_leaf_module(nn.Linear(2, 2))
    assert is_leaf_module(layer.input_layernorm)
    assert not is_leaf_module(layer)
    assert not is_leaf_module(layer.self_attn)
    assert not is_leaf_module(nn.SiLU())
    if hasattr(layer.mlp, "experts"):
        assert is_leaf_module(layer.mlp.experts)


def test_norm_holding_a_linear_is_traced_through():
    class AdaNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 8)
            self.norm = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shift, scale = self.linear(x).chunk(2, dim=-1)
            return self.norm(x) * (1 + scale) + shift

    assert not is_leaf_module(AdaNorm())
    block = trace_block(AdaNorm(), (torch.randn(2, 4),), {}, name="toy")
    assert isinstance(block.graph_module, fx.GraphModule)
    assert {"linear", "norm"} <= {n.target for n in block.graph_module.graph.nodes if n.op == "call_module"}
