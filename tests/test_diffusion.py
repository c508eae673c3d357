"""The diffusion frontend: blocks found from the module structure, calibration recorded from pipeline
runs (every step, each expert), recorded-input files, and the errors users can hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_diffusion import (
    BLOCK_LISTS,
    DIFFUSION_KINDS,
    WAN22_BOUNDARY_RATIO,
    capture_block_calls,
    save_tiny_pipeline,
    tiny_transformer,
    tiny_transformer_inputs,
)
from torch.utils import _pytree as pytree

from slimc.commands.cli import main
from slimc.config import config_from_data
from slimc.errors import DataError
from slimc.frontends import frontend_for
from slimc.frontends.diffusion import EXPERT_KEY, DiffusionTransformer, PipelineTransformers
from slimc.frontends.diffusion_data import (
    PROMPT_SPECS,
    RecordedCall,
    check_uniform,
    load_prompts,
    load_recorded_calls,
    save_recorded_calls,
)
from slimc.ir.source import ModelSource, resolve_model_source
from slimc.ir.tracer import trace_block

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"dataset": "builtin:prompts", "samples": 2, "batch_size": 1,
        "diffusion": {"steps": 3, "height": 32, "width": 32, "frames": 5, "max_sequence_length": 16}}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {"flux": save_tiny_pipeline("flux", root / "flux"), "wan2": save_tiny_pipeline("wan", root / "wan2", two_experts=True)}


def calibration(**settings):
    return config_from_data({"calibration": {**TINY, **settings}}).calibration


def loaded(path: Path):
    """(source, frontend, program) of a model directory, as compile builds them."""
    source = resolve_model_source(path)
    frontend = frontend_for(source)
    return source, frontend, frontend.build(source, frontend.load(source, dtype=torch.float32))


def transformer_program(kind: str):
    model = tiny_transformer(kind)
    source = ModelSource(path=Path("."), gguf_file=None, config=dict(model.config), architecture=type(model).__name__,
                         library="diffusers")
    return DiffusionTransformer().build(source, model)


# --- blocks ---


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_blocks_are_the_repeated_block_lists_in_the_order_the_forward_runs_them(kind):
    program = transformer_program(kind)
    assert [stage.name for stage in program.stages] == list(BLOCK_LISTS[kind])
    ran = [name for name, *_ in capture_block_calls(program.model, kind, tiny_transformer_inputs(program.model, kind))]
    assert [block.name for block in program.blocks] == ran
    roles = {block.name.rsplit(".", 1)[0]: block.role for block in program.blocks}
    assert roles == {name: "text" if "refiner" in name else "dit" for name in BLOCK_LISTS[kind]}


def test_hunyuan_video_traced_blocks_serve_every_resolution():
    model = tiny_transformer("hunyuan_video")
    small = tiny_transformer_inputs(model, "hunyuan_video", batch=1)
    large = {**small, "hidden_states": torch.randn(1, model.config.in_channels, 3, 8, 6, generator=torch.Generator().manual_seed(1))}
    for (name, args, kwargs, _), (_, other_args, other_kwargs, expected) in zip(
            capture_block_calls(model, "hunyuan_video", small), capture_block_calls(model, "hunyuan_video", large)):
        traced = trace_block(model.get_submodule(name), args, kwargs, name=name)
        assert traced.matches(other_args, other_kwargs), name  # first_frame_num_tokens differs: 4 vs 12
        with torch.no_grad():
            actual = traced(*other_args, **other_kwargs)
        assert all(torch.equal(a, e) for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected)))


def test_a_two_expert_pipeline_is_one_program_with_a_stage_and_an_export_part_per_expert(pipelines):
    source, _, program = loaded(pipelines["wan2"])
    assert source.components == ("transformer", "transformer_2")
    assert isinstance(program.model, PipelineTransformers)
    assert [stage.name for stage in program.stages] == ["transformer.blocks", "transformer_2.blocks"]
    parts = program.export_parts()
    assert list(parts) == ["transformer", "transformer_2"]
    for name, part in parts.items():
        assert part.model is program.model.get_submodule(name)
        assert [block.name for block in part.blocks] == ["blocks.0", "blocks.1"]
        assert part.source.components == (name,) and part.source.config["_class_name"] == "WanTransformer3DModel"


# --- calibration from a pipeline ---


def test_calibration_from_a_pipeline_records_every_step_of_every_prompt(pipelines):
    source, frontend, program = loaded(pipelines["flux"])
    batches = frontend.calibration_batches(calibration(), source, program)
    assert len(batches) == 2 * 3  # prompts x steps (FLUX.1 is guidance-distilled: one call per step)
    timesteps = [float(batch["timestep"]) for batch in batches]
    assert timesteps[:3] == timesteps[3:] and len(set(timesteps[:3])) == 3  # each prompt's three steps
    assert not torch.equal(batches[0]["encoder_hidden_states"], batches[3]["encoder_hidden_states"])  # two prompts
    again = frontend.calibration_batches(calibration(), source, program)
    assert all(torch.equal(a["hidden_states"], b["hidden_states"]) for a, b in zip(batches, again))  # seeded


def test_wan22_calibration_records_both_experts_each_on_the_steps_it_runs(pipelines):
    source, frontend, program = loaded(pipelines["wan2"])
    batches = frontend.calibration_batches(calibration(samples=1), source, program)
    assert len(batches) == 3 * 2  # steps x (conditional + unconditional call)
    boundary = WAN22_BOUNDARY_RATIO * 1000
    assert [batch[EXPERT_KEY] for batch in batches] == ["transformer"] * 2 + ["transformer_2"] * 4
    assert all((batch["timestep"].item() >= boundary) == (batch[EXPERT_KEY] == "transformer") for batch in batches)
    ran = []
    hooks = [program.model.get_submodule(name).register_forward_pre_hook(lambda *a, n=name: ran.append(n))
             for name in ("transformer", "transformer_2")]
    with torch.no_grad():
        program.call(program.model, batches[-1])
    for hook in hooks:
        hook.remove()
    assert ran == ["transformer_2"]


# --- recorded inputs ---


def test_recorded_inputs_round_trip_and_calibrate_a_transformer_directory_alone(pipelines, tmp_path):
    config = tmp_path / "record.yaml"
    config.write_text(yaml.safe_dump({"calibration": {**TINY, "samples": 1}}))
    assert main(["record", str(config), "--model", str(pipelines["wan2"]), "--out", str(tmp_path / "inputs.safetensors")]) == 0
    calls = load_recorded_calls(tmp_path / "inputs.safetensors")
    source, frontend, program = loaded(pipelines["wan2"])
    recorded = frontend.calibration_batches(calibration(samples=1), source, program)
    assert [c.expert for c in calls] == [b[EXPERT_KEY] for b in recorded]
    for call, batch in zip(calls, recorded):
        assert set(call.kwargs) == set(batch) - {EXPERT_KEY}
        for key, value in call.kwargs.items():
            assert torch.equal(value, batch[key]) if isinstance(value, torch.Tensor) else value == batch[key]
    assert calls[0].kwargs["encoder_hidden_states"] is calls[2].kwargs["encoder_hidden_states"]  # stored once
    alone, frontend, program = loaded(pipelines["wan2"] / "transformer_2")
    batches = frontend.calibration_batches(calibration(dataset=str(tmp_path / "inputs.safetensors")), alone, program)
    assert len(batches) == 4 and all(torch.equal(b["hidden_states"], c.kwargs["hidden_states"])
                                     for b, c in zip(batches, calls[2:]))


def test_a_plain_file_of_call_tensors_reads_as_calls_of_transformer(tmp_path):
    from safetensors.torch import save_file

    save_file({"0.hidden_states": torch.ones(1, 4), "1.hidden_states": torch.zeros(1, 4)}, tmp_path / "plain.safetensors")
    calls = load_recorded_calls(tmp_path / "plain.safetensors")
    assert [c.expert for c in calls] == ["transformer"] * 2 and torch.equal(calls[1].kwargs["hidden_states"], torch.zeros(1, 4))


def test_a_transformer_directory_with_prompts_names_the_fix(pipelines):
    source, frontend, program = loaded(pipelines["flux"] / "transformer")
    with pytest.raises(DataError, match=r"without its pipeline.*slimc record"):
        frontend.calibration_batches(calibration(), source, program)


def test_inputs_recorded_from_two_experts_need_the_expert_named_by_the_directory(pipelines, tmp_path):
    calls = [RecordedCall(e, {"hidden_states": torch.zeros(1, 2)}) for e in ("transformer", "transformer_2")]
    save_recorded_calls(calls, tmp_path / "two.safetensors")
    other = tmp_path / "renamed"
    other.mkdir()
    for file in (pipelines["wan2"] / "transformer").iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    source, frontend, program = loaded(other)
    with pytest.raises(DataError, match=r"holds inputs of transformer, transformer_2.*'renamed' names none"):
        frontend.calibration_batches(calibration(dataset=str(tmp_path / "two.safetensors")), source, program)


def test_calls_of_different_shapes_are_refused_before_tracing():
    calls = [RecordedCall("transformer", {"hidden_states": torch.zeros(1, 16, 4)}),
             RecordedCall("transformer", {"hidden_states": torch.zeros(1, 36, 4)})]
    with pytest.raises(DataError, match=r"call 1 \(transformer\) differs from call 0 in 'hidden_states'.*same height, width"):
        check_uniform(calls)
    check_uniform([calls[0], RecordedCall("transformer_2", calls[1].kwargs)])  # per expert


def test_unusable_datasets_are_reported_with_the_fix(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"text": "a dog"}) + "\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "prompts.csv").write_text("a cat\n")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    for spec, message in [
        ("builtin:text", r"unknown built-in prompt set.*builtin:prompts"),
        (str(tmp_path / "bad.jsonl"), r"bad.jsonl, line 2: expected an object with a string \"prompt\""),
        (str(tmp_path / "empty.txt"), r"holds no prompt"),
        (str(tmp_path / "prompts.csv"), r"unsupported type.*\.txt.*\.jsonl.*\.safetensors"),
        (str(tmp_path / "missing.txt"), r"does not exist"),
    ]:
        with pytest.raises(DataError, match=message):
            load_prompts(spec)
    with pytest.raises(DataError, match=r"not a readable safetensors file.*slimc record"):
        load_recorded_calls(tmp_path / "broken.safetensors")


def test_builtin_prompt_sets_are_fixed_and_disjoint(tmp_path):
    calibration_set, evaluation_set = (load_prompts(spec) for spec in PROMPT_SPECS)
    assert len(calibration_set) >= 32 and len(evaluation_set) >= 16
    assert not set(calibration_set) & set(evaluation_set)
    assert load_prompts("builtin:prompts", 5) == calibration_set[:5]
    (tmp_path / "mine.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    assert load_prompts(str(tmp_path / "mine.txt")) == load_prompts(str(tmp_path / "mine.jsonl")) == ["a cat", "a dog"]


def test_trace_of_a_two_expert_pipeline_traces_the_blocks_of_both_experts(pipelines):
    from slimc.commands.explain import trace_report

    report = trace_report(str(pipelines["wan2"]))
    assert "stages transformer.blocks (2), transformer_2.blocks (2)" in report
    assert "block transformer_2.blocks.0 [dit]" in report
