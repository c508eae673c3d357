"""`slimc eval` and `compile --eval` measure fidelity for families without a perplexity (here a tiny Flux
transformer through a stand-in diffusion frontend), on the frontend's held-out data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_diffusion import tiny_transformer, tiny_transformer_inputs
from tiny_dit_frontend import TinyDiT, installed
from tiny_models import tiny_causal_lm
from torch import nn

from slimc.backends.mindie import MindieBackend
from slimc.commands.cli import build_parser
from slimc.commands.compile import compile_model
from slimc.commands.evaluate import residual_stream_rotated
from slimc.commands.quantized import load_quantized_model, written_formats
from slimc.config import SlimcConfig, load_config
from slimc.errors import ConfigError, DataError
from slimc.frontends.llm import DecoderLLM
from slimc.ir import Program
from slimc.ir.source import ModelSource, resolve_model_source
from slimc.numerics.fidelity import compare_models

CONFIG = """\
version: 2
model: {dtype: float32}
calibration: {dataset: "builtin:prompts", samples: 2, batch_size: 1}
evaluation: {samples: 4, batch_size: 2}
schemes:
  w8a8_dynamic:
    weight: {dtype: int8, granularity: per_channel}
    act: {dtype: int8, granularity: per_token, dynamic: true}
pipeline:
  - pass: smooth
  - pass: fake_quant
    rules: [{scheme: w8a8_dynamic, include: ["*"]}]
  - pass: calibrate
  - pass: lower
export: [{format: mindie}]
"""
BLOCKS = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model directory, config file, compile output) of a tiny Flux transformer compiled W8A8_DYNAMIC."""
    work = tmp_path_factory.mktemp("flux")
    tiny_transformer("flux").save_pretrained(work / "model")
    (work / "config.yaml").write_text(CONFIG)
    with pytest.MonkeyPatch.context() as patch:
        installed(patch)
        compile_model(load_config(work / "config.yaml"), model_path=str(work / "model"), out_dir=work / "out")
    return work / "model", work / "config.yaml", work / "out"


@pytest.fixture
def frontend(monkeypatch) -> TinyDiT:
    return installed(monkeypatch)


def run(*argv: str | Path) -> None:
    args = build_parser().parse_args([str(a) for a in argv])
    args.run(args)


def test_eval_of_a_diffusers_transformer_gives_fidelity_per_block_and_output_as_json(flux, frontend, capsys):
    model, _, out = flux
    run("eval", "--model", model, "--quantized", out, "--samples", "4", "--batch-size", "2", "--json")
    results = json.loads(capsys.readouterr().out)
    assert results["metric"] == "fidelity" and results["batches"] == 2
    mindie = results["quantized"]["mindie"]
    assert [row["name"] for row in mindie["blocks"]] == BLOCKS
    assert [row["name"] for row in mindie["outputs"]] == ["0"]
    for row in [*mindie["blocks"], *mindie["outputs"]]:
        assert 0.99 < row["worst"]["cosine"] <= 1.0 and 0 < row["worst"]["relative_error"] < 0.1
        assert row["mean"]["psnr"] >= row["worst"]["psnr"] > 20


def test_eval_uses_the_frontends_evaluation_dataset_by_default_and_the_corpus_when_given(flux, frontend, capsys):
    model, _, out = flux
    run("eval", "--model", model, "--quantized", out, "--samples", "2", "--json")
    run("eval", "--model", model, "--quantized", out, "--samples", "2", "--json", "--corpus", "tiny:other")
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (first["dataset"], second["dataset"]) == (TinyDiT.evaluation_dataset, "tiny:other")
    assert [(r.dataset, r.samples) for r in frontend.requested] == [(TinyDiT.evaluation_dataset, 2), ("tiny:other", 2)]


def test_eval_takes_evaluation_and_calibration_settings_from_a_config(flux, frontend, capsys):
    model, config, out = flux
    run("eval", "--model", model, "--quantized", out, "--config", config, "--json")
    settings = frontend.requested[-1]
    assert (settings.samples, settings.batch_size, settings.dataset) == (4, 2, TinyDiT.evaluation_dataset)
    assert json.loads(capsys.readouterr().out)["batches"] == 2


def test_eval_set_overrides_settings_with_or_without_a_config(flux, frontend, capsys):
    model, config, out = flux
    run("eval", "--model", model, "--quantized", out, "--set", "calibration.image_size=64", "--set", "evaluation.samples=2")
    run("eval", "--model", model, "--quantized", out, "--config", config, "--set", "evaluation.batch_size=1")
    assert [(r.image_size, r.samples, r.batch_size) for r in frontend.requested] == [(64, 2, 4), (448, 4, 1)]


def test_eval_prints_a_table_with_a_row_per_block_then_the_output(flux, frontend, capsys):
    model, _, out = flux
    run("eval", "--model", model, "--quantized", out, "--samples", "2")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"fidelity on {TinyDiT.evaluation_dataset} (1 batches)")
    assert "cosine" in lines[1] and "rel. error" in lines[1] and "PSNR (dB)" in lines[1]
    assert [line.split()[0] for line in lines[3:]] == [*BLOCKS, "output"]


def test_eval_refuses_the_dataset_the_output_was_calibrated_on(flux, frontend):
    model, _, out = flux
    with pytest.raises(ConfigError, match="builtin:prompts is the calibration dataset"):
        run("eval", "--model", model, "--quantized", out, "--corpus", "builtin:prompts")


def test_fidelity_without_a_quantized_model_is_a_user_error(flux, frontend):
    model, _, _ = flux
    with pytest.raises(DataError, match="needs the quantized model: pass --quantized"):
        run("eval", "--model", model)


def test_evaluation_settings_out_of_range_name_the_key(flux, frontend):
    model, _, out = flux
    with pytest.raises(ConfigError, match="evaluation.samples"):
        run("eval", "--model", model, "--quantized", out, "--samples", "0")


def test_compile_eval_prints_the_fidelity_table_for_a_diffusers_transformer(flux, frontend, capsys, tmp_path):
    model, config, _ = flux
    run("compile", config, "--model", model, "--out", tmp_path / "out", "--eval")
    text = capsys.readouterr().out
    assert f"fidelity on {TinyDiT.evaluation_dataset} (2 batches)" in text
    assert all(f"\n{block} " in text for block in BLOCKS) and "\noutput 0 " in text


def test_an_output_written_in_parts_is_read_back_as_a_container_of_the_same_names(tmp_path):
    experts = nn.Module()
    for index, name in enumerate(("transformer", "transformer_2")):
        model = tiny_transformer("wan", seed=index)
        experts.add_module(name, model)
        model.save_pretrained(tmp_path / "model" / name)
        program = Program(model=model, family="test", source=resolve_model_source(tmp_path / "model" / name), stages=[])
        (tmp_path / "out" / "mindie" / name).mkdir(parents=True)
        MindieBackend().export(program, tmp_path / "out" / "mindie" / name)
    read = load_quantized_model("mindie", written_formats(tmp_path / "out")["mindie"], SlimcConfig())
    assert [name for name, _ in read.named_children()] == ["transformer", "transformer_2"]
    batch = {"expert": "transformer_2", **tiny_transformer_inputs(experts.transformer_2, "wan")}

    def call(model, batch):
        return model.get_submodule(batch["expert"])(**{k: v for k, v in batch.items() if k != "expert"})

    blocks = ["transformer.blocks.0", "transformer_2.blocks.0", "transformer_2.blocks.1"]
    report = compare_models(experts, read, [batch], call, blocks)
    assert list(report.blocks) == blocks[1:] and report.notes == ["1 blocks ran on no batch (e.g. transformer.blocks.0); give data that reaches them"]
    assert report.outputs["0"].worst.relative_error == 0.0


def test_a_rotated_residual_stream_is_recognised_from_the_embeddings():
    model = tiny_causal_lm("llama")
    program = DecoderLLM().build(ModelSource(path=Path("."), gguf_file=None, config=model.config, architecture="LlamaForCausalLM"), model)
    same = copy.deepcopy(model).to(torch.bfloat16)  # dtype rounding is not a rotation
    assert not residual_stream_rotated(program, same)
    rotated = copy.deepcopy(model)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        rotated.model.embed_tokens.weight.copy_(rotated.model.embed_tokens.weight @ q)
    assert residual_stream_rotated(program, rotated)
