"""rotate_inputs: online Hadamard rotations of Linear inputs keep DiT blocks' function and shrink int4 error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_diffusion import BLOCK_LISTS, tiny_transformer, tiny_transformer_inputs

from slimc.config import config_from_data
from slimc.errors import ConfigError
from slimc.ir import Block, Program, Stage
from slimc.ir.source import ModelSource
from slimc.numerics.hadamard import OnlineHadamard
from slimc.numerics.modules import FakeQuantize
from slimc.pipeline import Pipeline
from slimc.report import RunReport

W4A4 = {"weight": {"dtype": "int4", "granularity": "per_channel"},
        "act": {"dtype": "int4", "granularity": "per_token", "dynamic": True}}
W8A4 = {"weight": {"dtype": "int8", "granularity": "per_channel"}, "act": W4A4["act"]}  # the activation error dominates


def dit_program(kind: str) -> Program:
    model = tiny_transformer(kind)
    stages = []
    for name in BLOCK_LISTS[kind]:
        container = model.get_submodule(name)
        stages.append(Stage(name, [Block(f"{name}.{i}", block, container, i, role="dit") for i, block in enumerate(container)]))
    source = ModelSource(Path("."), None, dict(model.config), type(model).__name__, "diffusers")
    return Program(model=model, family="dit", source=source, stages=stages)


def run(program: Program, pipeline: list[dict], batches: list[dict]) -> RunReport:
    config = config_from_data({"schemes": {"w4a4": W4A4, "w8a4": W8A4}, "pipeline": pipeline})
    report = RunReport()
    Pipeline.from_config(config).run(program, config, batches, report)
    return report


@torch.no_grad()
def sample(program: Program, batch: dict) -> torch.Tensor:
    with program.executing_graphs():
        return program.model(**batch)[0]


@pytest.mark.parametrize("kind", ["flux", "hunyuan_video", "wan"])
@torch.no_grad()
def test_rotated_inputs_keep_the_transformer_output(kind):
    program = dit_program(kind)
    batches = [tiny_transformer_inputs(program.model, kind, seed=seed) for seed in range(2)]
    reference = program.model(**batches[1])[0]
    report = run(program, [{"pass": "rotate_inputs"}], batches)
    rotated = sample(program, batches[1])
    assert float((rotated - reference).norm() / reference.norm()) < 1e-5
    assert any("rotate_inputs: online Hadamard before" in note for note in report.notes)


@torch.no_grad()
def test_linears_reading_one_tensor_share_one_rotation_node():
    program = dit_program("flux")
    run(program, [{"pass": "rotate_inputs", "exclude": ["*norm*.linear"]}], [tiny_transformer_inputs(program.model, "flux")])
    gm = program.blocks[0].graph_module
    rotations = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OnlineHadamard)]
    readers = {n.target for r in rotations for n in r.users}
    assert {"attn.to_q", "attn.to_k", "attn.to_v"} <= readers
    q_rotation = next(r for r in rotations if "attn.to_q" in {n.target for n in r.users})
    assert {n.target for n in q_rotation.users} == {"attn.to_q", "attn.to_k", "attn.to_v"}
    assert "norm1.linear" not in readers  # excluded: reads silu(temb) unrotated


def test_rotation_shrinks_the_int4_error_of_an_outlier_channel():
    """The same int4-activation pipeline with and without rotation, on a Wan model whose text embedding has an
    outlier channel: the cross-attention key/value projections' output errors (measured by calibrate)."""
    errors = {}
    for rotated in (False, True):
        program = dit_program("wan")
        projection = program.model.condition_embedder.text_embedder.linear_2
        with torch.no_grad():
            projection.weight[3] *= 40.0
            projection.bias[3] *= 40.0
        batches = [tiny_transformer_inputs(program.model, "wan", seed=seed) for seed in range(2)]
        steps = [{"pass": "fake_quant", "rules": [{"scheme": "w8a4", "include": ["*attn2.to_k", "*attn2.to_v"]}]},
                 {"pass": "calibrate"}]
        run(program, ([{"pass": "rotate_inputs", "include": ["*attn2.to_k", "*attn2.to_v"]}] if rotated else []) + steps, batches)
        errors[rotated] = max(spec.output_error for spec in program.quant_specs.values())
    assert errors[True] < 0.5 * errors[False]


def test_rotate_inputs_after_fake_quant_is_a_config_error():
    with pytest.raises(ConfigError, match="rotate_inputs must come before fake_quant"):
        Pipeline.from_config(config_from_data({
            "schemes": {"w4a4": W4A4},
            "pipeline": [{"pass": "fake_quant", "rules": [{"scheme": "w4a4"}]}, {"pass": "rotate_inputs"}],
        }))


@torch.no_grad()
def test_the_search_keeps_a_rotation_that_helps_drops_one_that_hurts_and_keeps_the_function():
    """A Wan model with two kinds of int4 input, searched block by block: the cross-attention key/value read a
    text embedding with one outlier channel, which a rotation spreads out; the MLP's down projection reads a
    GELU output whose channels share a large mean, which a rotation gathers into one huge channel."""
    program = dit_program("wan")
    outlier = program.model.condition_embedder.text_embedder.linear_2
    outlier.weight[3] *= 40.0
    outlier.bias[3] *= 40.0
    for block in program.model.blocks:
        block.ffn.net[0].proj.weight *= 10.0  # GELU(x + 4) ~ x + 4 with x of order one: mean 4 in every channel
        block.ffn.net[0].proj.bias += 4.0
    batches = [tiny_transformer_inputs(program.model, "wan", seed=seed) for seed in range(2)]
    reference = program.model(**batches[1])[0]
    searched = ["*attn2.to_k", "*attn2.to_v", "*ffn.net.2"]
    report = run(program, [{"pass": "rotate_inputs", "search": True, "include": searched},
                           {"pass": "fake_quant", "rules": [{"scheme": "w8a4", "include": searched}]}], batches)
    kept = report.details["rotate_inputs_kept"]
    blocks = range(len(program.model.blocks))
    assert kept == {**{f"blocks.{i}.attn2.to_k": True for i in blocks}, **{f"blocks.{i}.ffn.net.2": False for i in blocks}}
    rotated = set(program.rotations.online)
    assert rotated == {f"blocks.{i}.attn2.{p}" for i in blocks for p in ("to_k", "to_v")}
    for block in program.blocks:  # the function alone: the planned activation quantizers pass through
        for module in block.graph_module.modules():
            if isinstance(module, FakeQuantize):
                module.mode = "off"
    assert float((sample(program, batches[1]) - reference).norm() / reference.norm()) < 1e-5
