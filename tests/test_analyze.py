"""`slimc analyze`: per-layer sensitivity measured one Linear at a time, checked against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runs import assert_user_error, slimc
from conftest import save_tiny_model
from PIL import Image
from transformers import AutoModelForCausalLM

from slimc.commands.compile import compile_model, layer_error_points
from slimc.config import load_config
from slimc.frontends import frontend_for
from slimc.ir.source import resolve_model_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Weight-only int8 per-channel: the hand computation below is a few lines of plain PyTorch.
CONFIG = """
version: 2
model: {family: auto, dtype: auto}
calibration: {dataset: "builtin:text", samples: 4, seq_len: 32, batch_size: 2}
schemes:
  w8: {weight: {dtype: int8, granularity: per_channel, symmetric: true}}
pipeline:
  - pass: fake_quant
    rules: [{scheme: w8, include: ["*"], exclude: ["lm_head"]}]
  - pass: calibrate
  - pass: lower
export: [{format: mindie}]
"""


def write_config(directory: Path, text: str = CONFIG) -> Path:
    path = directory / "config.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def analyzed(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("analyze")
    model = save_tiny_model(work / "model", "llama", request.param)
    out = work / "out"
    result = slimc("analyze", write_config(work), "--model", model, "--out", out, "--end-to-end", "--top", "3")
    assert result.returncode == 0, result.stderr
    return model, work / "config.yaml", out, result, request.param


def hand_quantized(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel, round to nearest: scale = max |w| of the row / 127."""
    scale = weight.float().abs().amax(1, keepdim=True) / 127
    return (torch.clamp(torch.round(weight.float() / scale), -128, 127) * scale).to(weight.dtype)


def calibration_batches(model: Path, config_path: Path) -> list[dict]:
    config = load_config(config_path)
    source = resolve_model_source(str(model))
    frontend = frontend_for(source)
    return frontend.calibration_batches(config.calibration, source, frontend.build(source, frontend.load(source, dtype=None)))


@torch.no_grad()
def hand_block_error(model_dir: Path, config_path: Path, block: int, layer: str) -> float:
    """Run the float model, keep the decoder layer's inputs and outputs, quantize the one Linear, rerun the layer:
    the worst ‖q − f‖ / ‖f‖ over the batches."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    decoder = model.model.layers[block]
    seen = []
    handle = decoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    for batch in calibration_batches(model_dir, config_path):
        model(**batch)
    handle.remove()
    first = lambda output: output[0] if isinstance(output, tuple) else output  # noqa: E731
    reference = [first(decoder(*args, **kwargs)) for args, kwargs in seen]
    linear = decoder.get_submodule(layer)
    linear.weight.copy_(hand_quantized(linear.weight))
    errors = [(first(decoder(*a, **k)).float() - r.float()).norm() / r.float().norm() for (a, k), r in zip(seen, reference)]
    return max(errors).item()


def read_analysis(out: Path) -> dict:
    return json.loads((out / "analysis.json").read_text())


def test_a_layers_block_error_is_the_block_output_error_of_quantizing_that_linear_alone(analyzed):
    model, config, out, _, dtype = analyzed
    layers = {layer["name"]: layer for layer in read_analysis(out)["layers"]}
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        block = int(name.split(".")[2])
        expected = hand_block_error(model, config, block, name.split(".", 3)[3])
        tolerance = 1e-5 if dtype == torch.float32 else 0.05
        assert layers[name]["block_error"] == pytest.approx(expected, rel=tolerance), name
        assert layers[name]["block"] == block


def test_layers_are_ranked_by_block_error_with_their_kind_from_the_graph(analyzed):
    layers = read_analysis(analyzed[2])["layers"]
    assert [layer["rank"] for layer in layers] == list(range(1, len(layers) + 1))
    errors = [layer["block_error"] for layer in layers]
    assert errors == sorted(errors, reverse=True)
    assert len(layers) == 2 * 7  # two blocks of q, k, v, o, gate, up, down; lm_head excluded
    kinds = {layer["name"].rsplit(".", 1)[1]: layer["kind"] for layer in layers}
    assert kinds == {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                     "up_proj": "up", "down_proj": "down"}


def test_the_proxies_are_measured_from_the_layer_inputs(analyzed):
    for layer in read_analysis(analyzed[2])["layers"]:
        assert layer["kurtosis"] > 1  # no distribution has a kurtosis below 1
        assert 0 <= layer["outlier_ratio"] <= 1


def test_end_to_end_loss_is_the_float_models_loss_and_measured_for_the_top_layers_only(analyzed):
    model_dir, config, out, _, dtype = analyzed
    analysis = read_analysis(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in calibration_batches(model_dir, config):
            logits = model(**batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       reduction="sum").item()
            count += targets.numel()
    assert analysis["float_loss"] == pytest.approx(total / count, rel=1e-5 if dtype == torch.float32 else 1e-2)
    deltas = [layer["loss_delta"] for layer in analysis["layers"]]
    assert all(delta is not None for delta in deltas[:3]) and all(delta is None for delta in deltas[3:])


def test_the_plot_is_a_png_and_the_table_is_printed(analyzed):
    *_, out, result, _ = analyzed
    with Image.open(out / "analysis.png") as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert "model.layers.0.mlp.down_proj" in result.stdout and "analysis.json" in result.stdout


def test_a_config_without_fake_quant_is_refused(tmp_path, tiny_llama_dir):
    text = CONFIG[:CONFIG.index("pipeline:")] + "pipeline: [{pass: norm_fusion}]\nexport: [{format: mindie}]\n"
    result = slimc("analyze", write_config(tmp_path, text), "--model", tiny_llama_dir, "--out", tmp_path / "out")
    assert_user_error(result, "fake_quant")


def test_top_below_one_or_without_end_to_end_and_an_existing_output_are_refused(tmp_path, tiny_llama_dir):
    config = write_config(tmp_path)
    assert_user_error(slimc("analyze", config, "--model", tiny_llama_dir, "--out", tmp_path / "out", "--top", "3"),
                      "--end-to-end")
    assert_user_error(slimc("analyze", config, "--model", tiny_llama_dir, "--out", tmp_path / "out", "--end-to-end",
                            "--top", "0"), "--top")
    (tmp_path / "taken").mkdir()
    assert_user_error(slimc("analyze", config, "--model", tiny_llama_dir, "--out", tmp_path / "taken"), "already exists")




def test_batches_measures_the_block_errors_on_the_first_batches_alone(tmp_path, tiny_llama_dir):
    """Two batches measured on the first: the errors of a calibration set of that one batch (nothing before
    fake_quant here, so the steps before the measurement do not depend on the batches either)."""
    errors = {}
    for name, arguments in {"first": ["--batches", "1"], "one batch": ["--set", "calibration.samples=2"],
                            "both": []}.items():
        out = tmp_path / name.replace(" ", "-")
        result = slimc("analyze", write_config(tmp_path), "--model", tiny_llama_dir, "--out", out, *arguments)
        assert result.returncode == 0, result.stderr
        errors[name] = {layer["name"]: layer["block_error"] for layer in read_analysis(out)["layers"]}
    assert errors["first"] == errors["one batch"]
    assert errors["first"] != errors["both"]
    assert_user_error(slimc("analyze", write_config(tmp_path), "--model", tiny_llama_dir, "--out", tmp_path / "zero",
                            "--batches", "0"), "--batches must be at least 1")
@pytest.mark.filterwarnings("ignore:.*recommended.*calibration set")
def test_the_compile_reports_layer_errors_plotted_by_role_and_depth(tmp_path, tiny_llama_dir):
    compiled = compile_model(load_config(write_config(tmp_path)), model_path=str(tiny_llama_dir), out_dir=tmp_path / "out")
    points = layer_error_points(compiled.report.layers)
    assert [error for *_, error in points] == [layer.relative_error for layer in compiled.report.layers]
    by_name = {layer.name: point for layer, point in zip(compiled.report.layers, points)}
    assert by_name["model.layers.1.self_attn.o_proj"][:2] == ("o", 1)
    assert by_name["model.layers.0.mlp.gate_proj"][:2] == ("gate", 0)
