"""`slimc eval` reads every format of a compile output with that format's own reader: mindie through slimc's
Ascend reader, vllm through transformers' compressed-tensors loading, onnx through onnxruntime; each gets the
same perplexity or fidelity results."""

from __future__ import annotations

import json

import pytest
from cli_runs import assert_user_error, slimc
from compile_settings import SMALL_CALIBRATION

from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.configs import resolve_config_path

EVERY_FORMAT = "export=[{format: mindie}, {format: vllm}, {format: onnx}]"
EVAL = ("--samples", "2", "--seq-len", "32")


@pytest.fixture(scope="module")
def every_format(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("every-format") / "out"
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"),
                         [*SMALL_CALIBRATION, "model.dtype=float32", "pipeline.0.search=false", EVERY_FORMAT])
    compile_model(config, model_path=str(tiny_llama_dir), out_dir=out)
    return out


def test_eval_gives_the_perplexity_of_every_format_written(every_format, tiny_llama_dir):
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", every_format, *EVAL, "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert list(results["quantized"]) == ["mindie", "vllm", "onnx"]
    for name, entry in results["quantized"].items():
        assert entry["quantized_dir"] == str(every_format / name)
        assert entry["quantized_ppl"] / results["float_ppl"] == pytest.approx(1.0, abs=0.05)
        assert entry["relative_change"] == pytest.approx(entry["quantized_ppl"] / results["float_ppl"] - 1)
    # The same codes and scales: the three readers agree far closer than quantization moved them.
    ppl = [entry["quantized_ppl"] for entry in results["quantized"].values()]
    assert max(ppl) / min(ppl) == pytest.approx(1.0, abs=1e-3)


def test_eval_of_one_formats_directory_reads_only_that_format(every_format, tiny_llama_dir):
    for name in ("vllm", "onnx"):
        result = slimc("eval", "--model", tiny_llama_dir, "--quantized", every_format / name, *EVAL, "--json")
        assert result.returncode == 0, result.stderr
        assert list(json.loads(result.stdout)["quantized"]) == [name]


def test_eval_prints_a_perplexity_line_per_format(every_format, tiny_llama_dir):
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", every_format, *EVAL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["float", "mindie", "vllm", "onnx"]


def test_eval_fidelity_compares_blocks_of_vllm_and_the_logits_of_onnx(every_format, tiny_llama_dir):
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", every_format, *EVAL, "--fidelity", "--json")
    assert result.returncode == 0, result.stderr
    quantized = json.loads(result.stdout)["quantized"]
    assert [row["name"] for row in quantized["vllm"]["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert quantized["onnx"]["blocks"] == [] and "onnxruntime session" in quantized["onnx"]["notes"][0]
    for entry in quantized.values():
        assert [row["name"] for row in entry["outputs"]] == ["logits"]
        assert 0.99 < entry["outputs"][0]["worst"]["cosine"] < 1


def test_an_onnx_graph_of_the_last_logits_only_is_refused(every_format, tiny_llama_dir, tmp_path):
    import shutil

    onnx = shutil.copytree(every_format / "onnx", tmp_path / "onnx")
    description = json.loads((onnx / "onnx_model.json").read_text())
    description["outputs"][0]["shape"][1] = 1
    (onnx / "onnx_model.json").write_text(json.dumps(description))
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", onnx, *EVAL)
    assert_user_error(result, "logits: last", "logits: all")


def test_compile_eval_evaluates_every_format_written(tmp_path, tiny_llama_dir):
    result = slimc("compile", "llm/w8a8_dynamic.yaml", "--model", tiny_llama_dir, "--out", tmp_path / "out", "--eval",
                   *(a for o in [*SMALL_CALIBRATION, "model.dtype=float32", "pipeline.0.search=false",
                                 "export=[{format: mindie}, {format: vllm}]", "evaluation.samples=2",
                                 "evaluation.seq_len=32"] for a in ("--set", o)))
    assert result.returncode == 0, result.stderr
    assert "\n  mindie " in result.stdout and "\n  vllm " in result.stdout
