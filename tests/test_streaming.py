"""Block-streamed compiles: the blocks' weights read from the checkpoint's shards when the pipeline reaches each
(through transformers' own loading and conversion), giving the same files as a compile of the whole model."""

from __future__ import annotations

import filecmp
import gc
import weakref
from pathlib import Path

import pytest
import torch
from cli_runs import slimc
from compile_settings import MULTIMODAL_SMALL, OMNI_IMAGE_SIZE, OMNI_SMALL, SMALL_CALIBRATION
from programs import logits
from tiny_models import tiny_causal_lm
from tiny_multimodal import save_tiny_multimodal
from tiny_omni import save_tiny_full_omni
from tiny_tokenizer import tiny_tokenizer

from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model, load_program
from slimc.commands.export import REPORT_FILE
from slimc.config import load_config
from slimc.frontends import frontend_for
from slimc.ir.hooks import temporary_hooks
from slimc.ir.source import resolve_model_source
from slimc.ir.streaming import BlockWeights, is_on_meta
from slimc.pipeline import Pipeline
from slimc.report import RunReport

SMALL = SMALL_CALIBRATION
OMNI = [*OMNI_SMALL, f"calibration.image_size={OMNI_IMAGE_SIZE['qwen3_omni_moe']}"]
SHARD = "20KB"  # several shards even for a tiny model, so blocks are read across files


def save_llm(family: str, directory: Path) -> Path:
    """A tiny bfloat16 `family` model in several safetensors shards, with config.json and a tokenizer."""
    tiny_causal_lm(family, dtype=torch.bfloat16).save_pretrained(directory, max_shard_size=SHARD)
    tiny_tokenizer().save_pretrained(directory)
    return directory


CASES = {
    "llama-w8a8": (lambda d: save_llm("llama", d), "llm/w8a8_dynamic.yaml", SMALL),
    "llama-w8a8-float-propagation": (lambda d: save_llm("llama", d), "llm/w8a8_dynamic.yaml",
                                     [*SMALL, "calibration.propagate=float"]),
    "llama-w4a4-rotated": (lambda d: save_llm("llama", d), "llm/w4a4_quarot_gptq.yaml", SMALL),
    "qwen3_moe-w8a8": (lambda d: save_llm("qwen3_moe", d), "llm/w8a8_dynamic.yaml", SMALL),
    "glm4_moe": (lambda d: save_llm("glm4_moe", d), "glm4_moe/w8a8.yaml", SMALL),
    "qwen2_5_vl": (lambda d: save_tiny_multimodal("qwen2_5_vl", d, dtype=torch.bfloat16), "qwen2_5_vl/w8a8.yaml", MULTIMODAL_SMALL),
    "qwen3_vl_moe": (lambda d: save_tiny_multimodal("qwen3_vl_moe", d, dtype=torch.bfloat16), "qwen3_vl_moe/w8a8.yaml",
                     MULTIMODAL_SMALL),
    "qwen3_omni_moe-whole-checkpoint": (lambda d: save_tiny_full_omni("qwen3_omni_moe", d, dtype=torch.bfloat16),
                                        "qwen3_omni_moe/w8a8.yaml", OMNI),
}


def same_files(a: Path, b: Path) -> list[str]:
    """The files under `a` and `b` that differ or exist on one side only (the run reports, which carry timings,
    left out)."""
    compared = filecmp.dircmp(a, b, ignore=[REPORT_FILE])
    differing = [*compared.left_only, *compared.right_only, *compared.funny_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, compared.common_files, shallow=False)
    differing += mismatch + errors
    for name in compared.common_dirs:
        differing += [f"{name}/{file}" for file in same_files(a / name, b / name)]
    return differing


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_streamed_compile_writes_the_files_of_a_whole_model_compile(case, tmp_path):
    save, config_name, overrides = CASES[case]
    model = save(tmp_path / "model")
    outputs = {}
    for stream in (True, False):
        config = load_config(resolve_config_path(config_name), [*overrides, f"memory.stream_blocks={str(stream).lower()}"])
        compiled = compile_model(config, model_path=str(model), out_dir=tmp_path / f"stream-{stream}")
        assert (compiled.program.weights is not None) == stream
        outputs[stream] = tmp_path / f"stream-{stream}"
    assert same_files(outputs[True], outputs[False]) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch directory left


def test_blocks_stay_unread_until_the_pipeline_needs_them_and_forwards_read_them_one_at_a_time(tmp_path):
    model_dir = save_llm("llama", tmp_path / "model")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), SMALL)
    source = resolve_model_source(model_dir)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    program = load_program(config, source, frontend_for(source), RunReport(), scratch)
    assert all(is_on_meta(block.module) for block in program.blocks)
    assert not is_on_meta(program.model.get_input_embeddings())
    reference = tiny_causal_lm("llama", dtype=torch.bfloat16).eval()
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    read_at_once = []  # blocks holding weights when each block starts (the probes run after the streaming hooks)
    with torch.no_grad(), program.streamed(), temporary_hooks() as probes:
        for block in program.blocks:
            probes.before(block.module, lambda m, args: read_at_once.append(
                sum(not is_on_meta(b.module) for b in program.blocks)))
        logits = program.model(input_ids=ids, use_cache=False).logits
    assert read_at_once == [1] * len(program.blocks)
    assert all(is_on_meta(block.module) for block in program.blocks)
    assert torch.equal(logits, reference(input_ids=ids, use_cache=False).logits)
    program.materialize(program.blocks[1])
    assert not is_on_meta(program.blocks[1].module) and is_on_meta(program.blocks[0].module)
    assert torch.equal(program.blocks[1].module.mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)


def test_a_config_that_says_so_loads_the_whole_model(tmp_path):
    model_dir = save_llm("llama", tmp_path / "model")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), [*SMALL, "memory.stream_blocks=false"])
    source = resolve_model_source(model_dir)
    program = load_program(config, source, frontend_for(source), RunReport(), tmp_path)
    assert program.weights is None and not any(is_on_meta(block.module) for block in program.blocks)


def test_dry_run_estimates_a_streamed_compile_and_checks_the_output_can_be_written(tmp_path):
    model = save_llm("qwen3_moe", tmp_path / "model")
    result = slimc("compile", "llm/w8a8_dynamic.yaml", "--model", model, "--out", tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blocks read one at a time" in result.stdout and "estimated output" in result.stdout
    assert "quantized layers: W8A8_DYNAMIC" in result.stdout
    a_file = tmp_path / "a-file"  # a directory cannot be made inside a file, even by root
    a_file.write_text("")
    result = slimc("compile", "llm/w8a8_dynamic.yaml", "--model", model, "--out", a_file / "out", "--dry-run")
    assert result.returncode == 1 and f"cannot write the output {a_file / 'out'}" in result.stdout
    assert not (tmp_path / "out").exists()


def test_no_float_layer_outlives_its_lowering(tmp_path):
    """A lowered block holds its integer weights only: the float Linears it replaced are freed as soon as they are
    replaced, with no garbage collection (a cache keeping them alive held the float model in memory until the
    compile ended; a reference cycle the loader's hooks left on each module held them until a collection ran)."""
    model_dir = save_llm("llama", tmp_path / "model")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), SMALL)
    source = resolve_model_source(model_dir)
    frontend = frontend_for(source)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    report = RunReport()
    program = load_program(config, source, frontend, report, scratch)
    replaced = [weakref.ref(module) for block in program.blocks for module in block.module.modules()
                if isinstance(module, torch.nn.Linear)]
    batches = frontend.calibration_batches(config.calibration, source, program)
    gc.collect()
    gc.disable()
    try:
        Pipeline.from_config(config).run(program, config, batches, report)
        alive = [ref for ref in replaced if ref() is not None]
    finally:
        gc.enable()
    assert replaced and alive == []


def test_a_streamed_compile_holds_one_block_at_a_time_from_calibration_to_verify(tmp_path, monkeypatch):
    """Finished blocks are spilled and read back one at a time by later forwards, export and verify, so memory does
    not grow with depth; the program returned still computes the compiled model, and its spill goes with it."""
    model_dir = save_llm("llama", tmp_path / "model")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"),
                         [*SMALL, "export=[{format: mindie}, {format: vllm}]"])
    whole = compile_model(load_config(resolve_config_path("llm/w8a8_dynamic.yaml"),
                                      [*SMALL, "memory.stream_blocks=false"]), model_path=str(model_dir), out_dir=tmp_path / "whole")
    held: list[int] = []  # blocks holding weights, each time one is read
    read: list[torch.nn.Module] = []
    materialize = BlockWeights.materialize

    def counting(self, module, prefix):
        materialize(self, module, prefix)
        read.append(module)
        held.append(sum(not is_on_meta(block) for block in set(read)))

    monkeypatch.setattr(BlockWeights, "materialize", counting)
    compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    program = compiled.program
    assert len(held) > 3 * len(program.blocks) and max(held) == 1  # read for the pipeline, each format's write and verify
    assert all(is_on_meta(block.module) for block in program.blocks)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        assert torch.equal(logits(program, ids), logits(whole.program, ids))
    spill = program.weights.spill_directory
    assert spill.is_dir() and len(list(spill.iterdir())) == len(program.blocks)
    del compiled, program
    gc.collect()
    assert not spill.exists()
