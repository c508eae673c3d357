"""Every shipped diffusion config compiles its tiny pipeline, in float32 and as a bfloat16 checkpoint, and
the Ascend files reproduce the result.

Each row saves a tiny pipeline (Wan2.2: both experts) with its weights in the row's dtype, compiles it
with the shipped config through the Ascend export (`model.dtype: auto`; calibration shrunk by --set
overrides), rebuilds every exported transformer from its files with the independent reader, and compares
it on fresh inputs at another resolution than the calibration's with the fake-quant program and with the
float transformer of the same dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compile_settings import DIFFUSION_SIZES, DIFFUSION_SMALL
from diffusers import ModelMixin
from programs import relative
from tiny_diffusion import save_tiny_pipeline, tiny_transformer_inputs

from slimc.backends.mindie_reader import load_ascend_model
from slimc.commands.cli import main, resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.frontends.diffusion import EXPERT_KEY
from slimc.frontends.diffusion_data import cast_floats, compute_dtype

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (shipped config, tiny pipeline kind, Wan2.2 two experts); W8A8 rows also hold the float model's output.
ROWS = [
    ("flux/w8a8.yaml", "flux", False), ("flux/w4a4.yaml", "flux", False),
    ("hunyuan_video/w8a8.yaml", "hunyuan_video", False), ("hunyuan_video/w4a4.yaml", "hunyuan_video", False),
    ("wan2_2/w8a8.yaml", "wan", True), ("wan2_2/w4a4.yaml", "wan", True),
]
DTYPES = [torch.float32, torch.bfloat16]
MODULATION = ("norm1.linear.weight", "norm1_context.linear.weight", "norm.linear.weight", "norm_out.linear.weight")
# Cosine similarity of the quantized transformer's output with the float one's (same dtype), on the tiny models.
# How closely the quantized tiny random model still follows the float one: a check that quantization kept the
# function, not a quality figure (W4A4 in bfloat16 lands near 0.98 as rounding falls); the files reproduce the
# quantized program exactly, checked below.
FIDELITY = {"w8a8": 0.99, "w4a4": 0.97}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(kind, two experts, dtype) -> a tiny pipeline directory, saved on first use."""
    root, saved = tmp_path_factory.mktemp("pipelines"), {}

    def pipeline(kind: str, two_experts: bool, dtype: torch.dtype) -> Path:
        key = (kind, two_experts, dtype)
        if key not in saved:
            saved[key] = save_tiny_pipeline(kind, root / f"{kind}-{two_experts}-{str(dtype).split('.')[1]}",
                                            two_experts=two_experts, weight_std=0.3, dtype=dtype)
        return saved[key]

    return pipeline


def checkpoint_name(name: str, written: dict) -> str:
    """The diffusers state_dict name, except that a Linear behind an explicit smoothing multiply sits under
    `.linear` beside its `.div.mul_scale` (msModelSlim's non-fusion layout)."""
    prefix, _, leaf = name.rpartition(".")
    return f"{prefix}.linear.{leaf}" if f"{prefix}.div.mul_scale" in written else name


def fresh_inputs(model: ModelMixin, kind: str) -> dict:
    """Inputs the calibration never saw, at another resolution (Flux 6x6 tokens, video 3x8x6 latents)."""
    inputs = tiny_transformer_inputs(model, kind, batch=2, seed=11)
    generator = torch.Generator().manual_seed(12)
    if kind == "flux":
        rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
        inputs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        inputs["hidden_states"] = torch.randn(2, 36, model.config.in_channels, generator=generator)
        inputs["joint_attention_kwargs"] = {}  # as FluxPipeline passes it (traced blocks see the call's structure)
    else:
        inputs["hidden_states"] = torch.randn(2, model.config.in_channels, 3, 8, 6, generator=generator)
    return inputs


@pytest.mark.parametrize(("config_name", "kind", "two_experts", "dtype"), [
    pytest.param(*row, dtype, id=f"{row[0]}-{str(dtype).split('.')[1]}") for row in ROWS for dtype in DTYPES])
def test_shipped_diffusion_config_compiles_and_the_ascend_files_reproduce_the_quantized_model(
        tmp_path, pipelines, config_name, kind, two_experts, dtype):
    pipeline_dir = pipelines(kind, two_experts, dtype)
    config = load_config(resolve_config_path(config_name), DIFFUSION_SMALL + DIFFUSION_SIZES[kind])
    compiled = compile_model(config, model_path=str(pipeline_dir), out_dir=tmp_path / "out")
    program = compiled.program
    experts = ["transformer", "transformer_2"] if two_experts else [""]
    assert sorted(p.name for p in (tmp_path / "out" / "mindie").iterdir() if p.is_dir()) == [e for e in experts if e]
    for expert in experts:
        out_dir = tmp_path / "out" / "mindie" / expert
        assert {"config.json", "model_index.json", "quant_model_description.json"} <= {p.name for p in out_dir.iterdir()}
        float_model = type(program.model.get_submodule(expert)).from_pretrained(
            pipeline_dir / (expert or "transformer"), torch_dtype=dtype).eval()
        assert compute_dtype(program.model.get_submodule(expert)) == dtype
        written = json.loads((out_dir / "quant_model_description.json").read_text())
        assert {checkpoint_name(n, written) for n in float_model.state_dict()} <= set(written)
        quantized = {n for n, t in written.items() if n.endswith(".weight") and isinstance(t, str) and t != "FLOAT"}
        blocks = tuple(f"{stage.name}." for stage in program.export_parts()[expert].stages)
        assert quantized and all(n.startswith(blocks) for n in quantized)  # nothing outside the blocks
        modulation = {n for n in written if n.startswith(blocks) and n.endswith(MODULATION)}
        assert bool(modulation) == (kind != "wan") and all(written[n] == "FLOAT" for n in modulation)  # AdaLN stays float
        inputs = cast_floats(fresh_inputs(float_model, kind), dtype)  # as the pipeline passes them
        batch = {EXPERT_KEY: expert, **inputs} if expert else inputs
        with torch.no_grad(), program.executing_graphs():
            expected = program.call(program.model, batch)[0]
        with torch.no_grad():
            from_files = load_ascend_model(out_dir)(**inputs)[0]
            reference = float_model(**inputs)[0]
        cosine = torch.nn.functional.cosine_similarity(from_files.flatten().float(), reference.flatten().float(), dim=0)
        assert from_files.dtype == dtype and cosine > FIDELITY[config_name.split("/")[1].removesuffix(".yaml")]
        # The reader rebuilds the program's arithmetic exactly, in bfloat16 as in float32 (unsaved buffers such as
        # Wan's rotary tables included).
        assert relative(from_files, expected) < 1e-4


def test_compiling_a_pipeline_twice_writes_the_same_files(tmp_path, pipelines):
    """Nothing in a compile may read memory it did not write: Wan's rotary embedding fills a tensor in place,
    which a statistics run that skipped those writes turned into different smoothing scales on every run."""
    pipeline_dir = pipelines("wan", True, torch.float32)
    config = load_config(resolve_config_path("wan2_2/w8a8.yaml"), DIFFUSION_SMALL + DIFFUSION_SIZES["wan"])
    written = []
    for run in ("first", "second"):
        compile_model(config, model_path=str(pipeline_dir), out_dir=tmp_path / run)
        files = sorted((tmp_path / run / "mindie").rglob("*.safetensors"))
        written.append({str(f.relative_to(tmp_path / run)): f.read_bytes() for f in files})
    assert len(written[0]) == 2 and written[0] == written[1]


def test_a_transformer_directory_compiles_from_inputs_recorded_from_its_pipeline(tmp_path, pipelines):
    pipeline_dir, recorded = pipelines("flux", False, torch.float32), tmp_path / "inputs.safetensors"
    config_file, overrides = resolve_config_path("flux/w8a8.yaml"), DIFFUSION_SMALL + DIFFUSION_SIZES["flux"]
    assert main(["record", str(config_file), "--model", str(pipeline_dir), "--out", str(recorded),
                 *(arg for override in overrides for arg in ("--set", override))]) == 0
    config = load_config(config_file, [*overrides, f"calibration.dataset={recorded}"])
    program = compile_model(config, model_path=str(pipeline_dir / "transformer"), out_dir=tmp_path / "out").program
    out_dir = tmp_path / "out" / "mindie"
    assert (out_dir / "config.json").is_file() and not (out_dir / "model_index.json").exists()
    inputs = fresh_inputs(program.model, "flux")
    with torch.no_grad(), program.executing_graphs():
        expected = program.model(**inputs)[0]
    with torch.no_grad():
        assert relative(load_ascend_model(out_dir)(**inputs)[0], expected) < 1e-4


def test_eval_of_a_bfloat16_pipeline_compares_the_written_model_with_the_float_one(tmp_path, pipelines, capsys):
    """Both models compute in bfloat16, as compiled; the evaluation calls are recorded from the float pipeline."""
    pipeline_dir = pipelines("flux", False, torch.bfloat16)
    overrides = [*DIFFUSION_SMALL, *DIFFUSION_SIZES["flux"], "evaluation.samples=2"]
    compile_model(load_config(resolve_config_path("flux/w8a8.yaml"), overrides), model_path=str(pipeline_dir),
                  out_dir=tmp_path / "out")
    assert main(["eval", "--model", str(pipeline_dir), "--quantized", str(tmp_path / "out"), "--json",
                 "--config", str(resolve_config_path("flux/w8a8.yaml")), *(a for o in overrides for a in ("--set", o))]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["metric"] == "fidelity" and results["batches"] == 2 * 2  # 2 prompts x 2 steps
    outputs = results["quantized"]["mindie"]["outputs"]
    assert [row["name"] for row in outputs] == ["0"]
    assert 0.99 < outputs[0]["worst"]["cosine"] <= 1.0
