"""The Python API (docs/api.md) mirrors the command line: `slimc.compile`, `slimc.evaluate`, `slimc.load_config`,
`slimc.trace`, imported only when first used; models by path, Hub id (from an offline cache) or loaded object."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cli_runs import assert_user_error, slimc
from compile_settings import SMALL_CALIBRATION
from hub_cache import cache_model, use_hub_cache
from tiny_models import tiny_causal_lm
from tiny_tokenizer import tiny_tokenizer

import slimc as api
from slimc.config import SlimcConfig
from slimc.errors import ConfigError, ModelLoadError
from slimc.ir.source import resolve_model_source

QUICK = [*SMALL_CALIBRATION, "model.dtype=float32", "pipeline.0.search=false"]


def test_importing_slimc_does_not_import_torch_until_the_api_is_used():
    code = "import sys, slimc; print('torch' in sys.modules); slimc.load_config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_the_api_names_are_listed_and_others_are_attribute_errors():
    assert {"compile", "evaluate", "load_config", "trace", "CompileResult"} <= set(dir(api))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        api.nothing  # noqa: B018


def test_load_config_takes_a_shipped_name_with_overrides_and_a_loaded_config():
    config = api.load_config("llm/w8a8_dynamic.yaml", ["calibration.samples=8"])
    assert isinstance(config, SlimcConfig) and config.calibration.samples == 8
    again = api.load_config(config, ["calibration.seq_len=64"])
    assert (again.calibration.samples, again.calibration.seq_len) == (8, 64)
    assert [step.name for step in again.pipeline] == [step.name for step in config.pipeline]
    assert again.pipeline[0].model_dump() == config.pipeline[0].model_dump()


def test_an_unknown_config_name_is_a_config_error():
    with pytest.raises(Exception, match="not found; give a path, or one of the shipped configs"):
        api.load_config("llm/nothing.yaml")


def test_compile_of_a_loaded_model_writes_its_formats_and_evaluates_each(tmp_path):
    model = tiny_causal_lm("llama")
    result = api.compile("llm/w8a8_dynamic.yaml", model=model, tokenizer=tiny_tokenizer(), out=tmp_path / "out",
                         overrides=[*QUICK, "export=[{format: mindie}, {format: vllm}]", "evaluation.samples=2",
                                    "evaluation.seq_len=32"], evaluate=True)
    assert result.outputs == {"mindie": tmp_path / "out" / "mindie", "vllm": tmp_path / "out" / "vllm"}
    assert json.loads(result.report_file.read_text())["outputs"].keys() == {"mindie", "vllm"}
    assert result.program.blocks[0].name == "model.layers.0"
    assert set(result.evaluation["quantized"]) == {"mindie", "vllm"}
    assert not list(tmp_path.glob(".slimc-model-*"))  # the saved copy of the model is gone


def test_a_model_object_without_save_pretrained_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="save_pretrained"):
        api.compile("llm/w8a8_dynamic.yaml", model=object(), out=tmp_path / "out")


def test_trace_returns_what_slimc_trace_prints(tiny_llama_dir):
    assert api.trace(tiny_llama_dir) == slimc("trace", tiny_llama_dir).stdout.rstrip("\n")


# --- Hub ids ------------------------------------------------------------------------------------------


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(tmp_path, monkeypatch, tiny_llama_dir):
    snapshot = cache_model(use_hub_cache(monkeypatch, tmp_path / "hub"), "tiny-org/tiny-llama", tiny_llama_dir)
    source = resolve_model_source("tiny-org/tiny-llama")
    assert source.path == snapshot and source.architecture == "LlamaForCausalLM"


def test_trace_of_a_cached_hub_id_on_the_command_line(tmp_path, monkeypatch, tiny_llama_dir):
    cache_model(use_hub_cache(monkeypatch, tmp_path / "hub"), "tiny-org/tiny-llama", tiny_llama_dir)
    result = slimc("trace", "tiny-org/tiny-llama")
    assert result.returncode == 0, result.stderr
    assert "block model.layers.0" in result.stdout


def test_a_hub_id_that_is_not_cached_offline_names_the_id_and_the_fix(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "hub")
    result = slimc("trace", "tiny-org/not-cached")
    assert_user_error(result, "tiny-org/not-cached", "is in the cache", "HF_HUB_OFFLINE=1", "hf download tiny-org/not-cached")


def test_a_missing_path_that_is_no_hub_id_is_still_a_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(tmp_path / "nowhere")
