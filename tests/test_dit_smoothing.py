"""Smoothing DiT blocks: AdaLN modulation folds, explicit multiplies where nothing folds, and their Ascend layout.

The tiny Flux / HunyuanVideo / Wan transformers of tiny_diffusion run their real diffusers blocks; each
distinct block kind is traced once and copied for every test that changes weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_diffusion import BLOCK_LISTS, capture_block_calls, tiny_transformer, tiny_transformer_inputs
from torch import nn

from slimc.backends.mindie import MindieBackend
from slimc.backends.mindie_reader import load_ascend_model
from slimc.commands.explain import describe_block
from slimc.config import config_from_data
from slimc.errors import ExportError
from slimc.ir import Block, Program, Stage
from slimc.ir.calls import block_output
from slimc.ir.source import resolve_model_source
from slimc.ir.tracer import trace_block
from slimc.numerics.fidelity import relative_error
from slimc.numerics.modules import ChannelScale
from slimc.pass_base import Context
from slimc.passes.smooth import Smooth
from slimc.patterns import (
    find_modulation_groups,
    find_multiply_groups,
    find_norm_linear_groups,
    find_ov_pairs,
    propagate_shapes,
)
from slimc.pipeline import Pipeline
from slimc.report import RunReport

W8A8_DYNAMIC = {"weight": {"dtype": "int8", "granularity": "per_channel"},
                "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}}
W4A4_DYNAMIC = {"weight": {"dtype": "int4", "granularity": "per_channel"},
                "act": {"dtype": "int4", "granularity": "per_token", "dynamic": True}}
BLOCKS = {  # (kind, block): the first block of every block list
    "flux double": ("flux", "transformer_blocks.0"),
    "flux single": ("flux", "single_transformer_blocks.0"),
    "hunyuan refiner": ("hunyuan_video", "context_embedder.token_refiner.refiner_blocks.0"),
    "hunyuan dual": ("hunyuan_video", "transformer_blocks.0"),
    "hunyuan single": ("hunyuan_video", "single_transformer_blocks.0"),
    "wan": ("wan", "blocks.0"),
}


@pytest.fixture(scope="module")
def traced() -> dict[str, tuple[Block, tuple, dict]]:
    """Each block of BLOCKS traced on the inputs its transformer gives it: (block, args, kwargs)."""
    found = {}
    for kind in ("flux", "hunyuan_video", "wan"):
        model = tiny_transformer(kind)
        calls = {name: (args, kwargs) for name, args, kwargs, _ in capture_block_calls(model, kind, tiny_transformer_inputs(model, kind))}
        for label, (block_kind, name) in BLOCKS.items():
            if block_kind != kind:
                continue
            args, kwargs = calls[name]
            list_name, _, index = name.rpartition(".")
            block = Block(name, model.get_submodule(name), model.get_submodule(list_name), int(index), role="dit")
            block.traced = trace_block(block.module, args, kwargs, name=name)
            propagate_shapes(block.traced.graph_module, block.traced.flatten_inputs(args, kwargs))
            found[label] = (block, args, kwargs)
    return found


def fresh(traced, label: str) -> tuple[Block, tuple, dict]:
    """A copy of a traced block (module and graph together) that a test may change."""
    block, args, kwargs = traced[label]
    module, graph = copy.deepcopy((block.module, block.traced))
    return Block(block.name, module, block.container, block.index, role="dit", traced=graph), args, kwargs


def context(block: Block, args: tuple, kwargs: dict, pipeline: list[dict] | None = None, schemes: dict | None = None) -> Context:
    config = config_from_data({"schemes": schemes or {}, "pipeline": pipeline or []})
    program = Program(model=block.module, family="dit", source=None, stages=[Stage("blocks", [block])])
    ctx = Context(program, config, Pipeline.from_config(config).steps, RunReport())
    ctx.inputs = [(args, kwargs)]
    return ctx


@torch.no_grad()
def output(block: Block, args: tuple, kwargs: dict) -> torch.Tensor:
    return block_output(block.traced(*args, **kwargs))


def modulations(gm) -> dict[str, tuple]:
    return {g.norm: (sorted(c.target for c in g.readers), g.linear, g.chunks, g.scale_chunk, g.shift_chunk)
            for g in find_modulation_groups(gm)}


def multiplies(gm) -> dict[str, list[str]]:
    return {g.source: sorted(c.target for c in g.readers) for g in find_multiply_groups(gm)}


def scale_nodes(block: Block) -> dict[str, list[str]]:
    """Explicit multiply node -> the Linears reading it."""
    gm = block.graph_module
    return {n.target: sorted(u.target for u in n.users) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChannelScale)}


# --- patterns ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["flux double", "hunyuan dual"])
def test_double_block_modulations_fold_into_their_adaln_linear_chunks(traced, label):
    gm = traced[label][0].graph_module
    qkv = ["attn.to_k", "attn.to_q", "attn.to_v"]
    added = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj"]
    assert modulations(gm) == {  # (readers, modulation Linear, chunks, scale chunk, shift chunk)
        "norm1.norm": (qkv, "norm1.linear", 6, 1, 0),
        "norm1_context.norm": (added, "norm1_context.linear", 6, 1, 0),
        "norm2": (["ff.net.0.proj"], "norm1.linear", 6, 4, 3),
        "norm2_context": (["ff_context.net.0.proj"], "norm1_context.linear", 6, 4, 3),
    }
    assert multiplies(gm) == {}
    assert find_ov_pairs(gm) == []  # joint attention (streams concatenated on the sequence) is left out


@pytest.mark.parametrize("label", ["flux single", "hunyuan single"])
def test_single_block_modulation_reaches_mlp_and_qkv_through_token_slices(traced, label):
    gm = traced[label][0].graph_module
    readers = ["attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp"]
    assert modulations(gm) == {"norm.norm": (readers, "norm.linear", 3, 1, 0)}
    assert multiplies(gm) == {}


def test_refiner_block_has_plain_norms_and_sdpa_attention(traced):
    gm = traced["hunyuan refiner"][0].graph_module
    assert {g.norm: [c.target for c in g.consumers] for g in find_norm_linear_groups(gm)} == {
        "norm1": ["attn.to_q", "attn.to_k", "attn.to_v"], "norm2": ["ff.net.0.proj"]}
    assert [(p.v, p.o, p.head_dim) for p in find_ov_pairs(gm)] == [("attn.to_v", "attn.to_out.0", 16)]
    assert modulations(gm) == {} and multiplies(gm) == {}


def test_wan_modulation_cannot_fold_so_its_readers_and_the_text_readers_need_a_multiply(traced):
    gm = traced["wan"][0].graph_module
    groups = find_modulation_groups(gm)
    assert [(g.norm, g.scale_chunk, g.shift_chunk, g.foldable) for g in groups] == [("norm1", 1, 0, False), ("norm3", 4, 3, False)]
    assert all("scale_shift_table + temb" in g.problem and "not rows of a Linear" in g.problem for g in groups)
    assert multiplies(gm) == {
        "block input encoder_hidden_states": ["attn2.to_k", "attn2.to_v"],
        "norm1·(1 + scale) + shift": ["attn1.to_k", "attn1.to_q", "attn1.to_v"],
        "norm3·(1 + scale) + shift": ["ffn.net.0.proj"],
    }
    assert [(g.norm, [c.target for c in g.consumers]) for g in find_norm_linear_groups(gm)] == [("norm2", ["attn2.to_q"])]
    assert [(p.v, p.o) for p in find_ov_pairs(gm)] == [("attn1.to_v", "attn1.to_out.0"), ("attn2.to_v", "attn2.to_out.0")]


class AdaLNBlock(nn.Module):
    """A DiT-style block: AdaLN modulation from `temb`, read by q/k/v. `bias` on the modulation Linear;
    `leak` also adds the modulated output to the result (a non-Linear reader)."""

    def __init__(self, dim: int = 16, *, bias: bool = True, leak: bool = False) -> None:
        super().__init__()
        self.leak = leak
        self.mod = nn.Linear(dim, 3 * dim, bias=bias)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(torch.nn.functional.silu(temb)).chunk(3, dim=-1)
        h = (1 + scale[:, None]) * self.norm(x) + shift[:, None]  # operands in the other order than diffusers
        y = self.out(torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), dim=-1) @ self.v(h))
        return x + gate[:, None] * y + (h if self.leak else 0)


@pytest.mark.parametrize(("bias", "leak", "why"), [
    (True, False, None),
    (False, False, "mod has no bias"),
    (True, True, "the modulated output is also read by"),
])
def test_fold_or_multiply_is_decided_by_the_modulation_pattern(bias, leak, why):
    torch.manual_seed(0)
    module = AdaLNBlock(bias=bias, leak=leak).eval().requires_grad_(False)
    x, temb = torch.randn(2, 5, 16), torch.randn(2, 16)
    x[..., 3] *= 30  # an outlier channel for smoothing to move
    block = Block("block", module, nn.ModuleList([module]), 0, role="dit")
    block.traced = trace_block(module, (x, temb), {}, name="block")
    propagate_shapes(block.graph_module, [x, temb])
    (group,) = find_modulation_groups(block.graph_module)
    assert ([c.target for c in group.readers], group.scale_chunk, group.shift_chunk) == (["q", "k", "v"], 1, 0)
    assert group.foldable == (why is None) and (why is None or why in group.problem)
    ctx = context(block, (x, temb), {})
    before = output(block, (x, temb), {})
    mod_weight = module.mod.weight.detach().clone()
    Smooth().run_block(block, ctx)
    assert relative_error(output(block, (x, temb), {}), before) < 1e-5
    if why is None:  # folded: scale and shift rows of mod changed, the gate rows not, no multiply node
        assert scale_nodes(block) == {}
        assert not torch.equal(module.mod.weight[:32], mod_weight[:32]) and torch.equal(module.mod.weight[32:], mod_weight[32:])
    else:
        assert scale_nodes(block) == {"channel_scale.q": ["k", "q", "v"]} and torch.equal(module.mod.weight, mod_weight)


# --- smoothing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(BLOCKS))
def test_smoothing_each_dit_block_keeps_its_output_and_moves_scales(traced, label):
    block, args, kwargs = fresh(traced, label)
    before = {n: p.detach().clone() for n, p in block.module.named_parameters()}
    reference = output(block, args, kwargs)
    Smooth(alpha=0.5).run_block(block, context(block, args, kwargs))
    assert relative_error(output(block, args, kwargs), reference) < 1e-5
    changed = {n.removesuffix(".weight") for n, p in block.module.named_parameters() if not torch.equal(p, before[n])}
    nodes = scale_nodes(block)
    if label == "wan":  # nothing folds: one shared multiply per tensor read, the modulation table untouched
        assert nodes == {"channel_scale.attn1_to_q": ["attn1.to_k", "attn1.to_q", "attn1.to_v"],
                         "channel_scale.attn2_to_k": ["attn2.to_k", "attn2.to_v"],
                         "channel_scale.ffn_net_0_proj": ["ffn.net.0.proj"]}
        assert "scale_shift_table" not in changed and {"attn2.to_k", "attn2.to_v", "ffn.net.0.proj"} <= changed
    elif label == "hunyuan refiner":
        assert nodes == {} and {"norm1", "norm2", "attn.to_out.0"} <= changed
    else:
        linear = "norm.linear" if "single" in label else "norm1.linear"
        assert nodes == {} and {linear, "attn.to_q", "attn.to_k", "attn.to_v"} <= changed
        rows = block.module.get_submodule(linear).weight.shape[0] // (3 if "single" in label else 6)
        gate = slice(2 * rows, 3 * rows)  # chunk 2 (gate_msa) is no modulation input: unchanged
        assert torch.equal(block.module.get_submodule(linear).weight[gate], before[f"{linear}.weight"][gate])


def test_alpha_search_works_on_modulation_folds_and_explicit_multiplies(traced):
    pipeline = [{"pass": "smooth", "search": True, "search_grid": [0.3, 0.8]},
                {"pass": "fake_quant", "rules": [{"scheme": "w4", "include": ["*"], "exclude": ["*attn2.to_v"]}]}]
    for label in ("flux single", "wan"):
        block, args, kwargs = fresh(traced, label)
        reference = output(block, args, kwargs)
        ctx = context(block, args, kwargs, pipeline, {"w4": W4A4_DYNAMIC})
        smooth = ctx.steps[0]
        smooth.run_block(block, ctx)
        smooth.finish(ctx.program, ctx)
        assert relative_error(output(block, args, kwargs), reference) < 1e-5
        chosen = {name.removeprefix(block.name + "."): a for name, a in ctx.report.details["smooth_alpha"].items()}
        assert all(a in (None, 0.3, 0.8) for a in chosen.values())
        if label == "flux single":
            assert set(chosen) == {"proj_mlp"}  # the modulation group, observed at its first reader
        else:
            assert {"attn1.to_q", "attn2.to_k", "ffn.net.0.proj"} <= set(chosen)
            # attn2.to_v is left float by the rules: no multiply before it; groups left unsmoothed have none
            readers = {r for users in scale_nodes(block).values() for r in users}
            assert "attn2.to_v" not in readers
            assert ("attn2.to_k" in readers) == (chosen["attn2.to_k"] is not None)


def test_llm_blocks_keep_their_migrations():
    from programs import run_pipeline
    from tiny_models import tiny_causal_lm

    program, _ = run_pipeline(tiny_causal_lm("qwen3"), [])
    for block in program.blocks:
        assert [m.kind for m in Smooth().migrations(block)] == ["norm-linear", "norm-linear", "v-o", "up-down"]


# --- trace -----------------------------------------------------------------------------------------


def test_trace_shows_where_each_dit_linear_is_smoothed_and_why_the_stream_is_not_rotated(traced):
    flux = describe_block(traced["flux double"][0])
    assert ("  modulation       norm1.norm·(1 + scale) + shift → attn.to_q, attn.to_k, attn.to_v: smoothing folds into "
            "norm1.linear rows [32:64) (scale, chunk 1 of 6) and [0:32) (shift, chunk 0)") in flux
    assert ("  modulation       norm2·(1 + scale) + shift → ff.net.0.proj: smoothing folds into norm1.linear rows "
            "[128:160) (scale, chunk 4 of 6) and [96:128) (shift, chunk 3)") in flux
    wan = describe_block(traced["wan"][0])
    assert ("  explicit multiply block input encoder_hidden_states → attn2.to_k, attn2.to_v: x·(1/s) before them "
            "(they read a block input, with no layer before them)") in wan
    assert any(line.startswith("  explicit multiply norm1·(1 + scale) + shift → attn1.to_q, attn1.to_k, attn1.to_v: x·(1/s)")
               and "scale_shift_table + temb" in line for line in wan)
    (stream,) = [line for line in flux if line.startswith("  residual stream")]
    assert "not rotatable: the block output is scaled per channel by chunk 5 of norm1_context.linear" in stream
    assert "AdaLN gate" in stream and "rotate_inputs" in stream


# --- Ascend export -------------------------------------------------------------------------------


def test_explicit_multiplies_export_as_div_mul_scale_and_read_back(tmp_path: Path):
    model = tiny_transformer("wan")
    model.save_pretrained(tmp_path / "model")
    source = resolve_model_source(tmp_path / "model")
    stages = [Stage(name, [Block(f"{name}.{i}", b, model.get_submodule(name), i, role="dit")
                           for i, b in enumerate(model.get_submodule(name))]) for name in BLOCK_LISTS["wan"]]
    program = Program(model=model, family="dit", source=source, stages=stages)
    pipeline = [{"pass": "smooth"}, {"pass": "fake_quant", "rules": [{"scheme": "w8", "include": ["*attn1.*", "*attn2.*", "*ffn*"]}]},
                {"pass": "calibrate"}, {"pass": "lower"}]
    config = config_from_data({"schemes": {"w8": W8A8_DYNAMIC}, "pipeline": pipeline})
    batches = [tiny_transformer_inputs(model, "wan", seed=seed) for seed in range(2)]
    Pipeline.from_config(config).run(program, config, batches, RunReport())
    with torch.no_grad(), program.executing_graphs():
        expected = model(**batches[0])[0]
    out = tmp_path / "out"
    out.mkdir()
    backend = MindieBackend()
    backend.export(program, out)
    backend.verify(program, out)

    types = json.loads((out / "quant_model_description.json").read_text())
    for linear in ("blocks.0.attn2.to_k", "blocks.1.attn1.to_v", "blocks.0.ffn.net.0.proj"):
        assert types[f"{linear}.div.mul_scale"] == "FLOAT"
        assert types[f"{linear}.linear.weight"] == "W8A8_DYNAMIC" and types[f"{linear}.linear.bias"] == "FLOAT"
        assert f"{linear}.weight" not in types
    assert "blocks.0.attn2.to_q.weight" in types and "blocks.0.attn2.to_q.div.mul_scale" not in types  # folded into norm2
    loaded = load_ascend_model(out)
    with torch.no_grad():
        actual = loaded(**batches[0])[0]
    assert relative_error(actual, expected) < 1e-5

    # a mul_scale that does not match its Linear's input fails verify
    from safetensors.torch import load_file, save_file
    weights = out / "quant_model_weights.safetensors"
    tensors = load_file(weights)
    tensors["blocks.0.attn2.to_k.div.mul_scale"] = tensors["blocks.0.attn2.to_k.div.mul_scale"][:-1].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="blocks.0.attn2.to_k.div.mul_scale"):
        backend.verify(program, out)
