"""slimc_report.json records what a compile was made from (`provenance`) and, with `--eval`, the evaluation;
the run summary says where the report is."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import stat

import gguf
import pytest
from cli_runs import slimc

from slimc import __version__
from slimc.commands.export import REPORT_FILE
from slimc.commands.provenance import calibration_fingerprint, gguf_header_length, weight_index_digests
from slimc.config import config_from_data, load_config
from slimc.configs import resolve_config_path
from slimc.frontends.llm import text_batches
from slimc.ir.source import default_model_path, load_tokenizer, resolve_model_source

CONFIG = "llm/w8a8_dynamic.yaml"
OVERRIDES = ["calibration.samples=2", "calibration.seq_len=32", "calibration.batch_size=2", "pipeline.0.search=false",
             "evaluation.samples=2", "evaluation.seq_len=32"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_llama_dir):
    """`slimc compile --eval` of the tiny Llama with --set overrides: (output directory, run, report)."""
    out = tmp_path_factory.mktemp("provenance") / "out"
    result = slimc("compile", CONFIG, "--model", tiny_llama_dir, "--out", out, "--eval",
                   *(arg for override in OVERRIDES for arg in ("--set", override)))
    assert result.returncode == 0, result.stderr
    return out, result, json.loads((out / REPORT_FILE).read_text())


def test_the_report_records_the_slimc_and_library_versions_and_the_device(evaluated):
    provenance = evaluated[2]["provenance"]
    assert provenance["slimc"] == __version__
    for name in ("torch", "transformers", "safetensors"):
        assert provenance["libraries"][name] == importlib.metadata.version(name)
    assert provenance["device"]["configured"] == "cpu" and provenance["device"]["torch"]


def test_the_report_records_the_config_as_resolved_after_set(evaluated):
    recorded = evaluated[2]["provenance"]["config"]
    assert recorded["file"] == str(resolve_config_path(CONFIG))
    assert recorded["resolved"]["calibration"]["samples"] == 2
    assert recorded["resolved"]["pipeline"][0]["pass"] == "smooth" and recorded["resolved"]["pipeline"][0]["search"] is False
    expected = load_config(resolve_config_path(CONFIG), OVERRIDES).resolved()
    assert recorded["resolved"] == expected
    assert config_from_data(recorded["resolved"]).resolved() == expected  # the report's config compiles again


def test_the_report_records_the_model_path_and_the_hash_of_its_weight_header(evaluated, tiny_llama_dir):
    model = evaluated[2]["provenance"]["model"]
    assert model["path"] == str(tiny_llama_dir.resolve()) and model["architecture"] == "LlamaForCausalLM"
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    header = data[:8 + int.from_bytes(data[:8], "little")]
    assert model["weight_index"] == [{"file": "model.safetensors", "hashed": "header",
                                      "sha256": hashlib.sha256(header).hexdigest()}]


def test_the_report_records_the_hash_of_the_calibration_batches(evaluated, tiny_llama_dir):
    calibration = evaluated[2]["provenance"]["calibration"]
    config = load_config(resolve_config_path(CONFIG), OVERRIDES)
    batches = [{"input_ids": ids} for ids in text_batches(config.calibration, load_tokenizer(resolve_model_source(tiny_llama_dir)))]
    assert calibration == {"dataset": "builtin:text", "batches": 1, "sha256": calibration_fingerprint(batches)}
    other = load_config(resolve_config_path(CONFIG), [*OVERRIDES, "calibration.seq_len=16"])
    fewer = [{"input_ids": ids} for ids in text_batches(other.calibration, load_tokenizer(resolve_model_source(tiny_llama_dir)))]
    assert calibration_fingerprint(fewer) != calibration["sha256"]


def test_the_report_holds_the_evaluation_and_stays_published_0644(evaluated):
    out, result, report = evaluated
    evaluation = report["evaluation"]
    assert evaluation["metric"] == "perplexity" and evaluation["corpus"] == "builtin:text-eval"
    assert f"float      {evaluation['float_ppl']:.4f}" in result.stdout
    assert stat.S_IMODE((out / REPORT_FILE).stat().st_mode) == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary file left beside it


def test_the_run_summary_says_where_the_report_is(evaluated):
    out, result, _ = evaluated
    assert f"report: {out / REPORT_FILE}" in result.stdout


def test_a_sharded_checkpoint_is_identified_by_the_hash_of_its_index(tmp_path):
    from tiny_models import tiny_causal_lm

    model_dir = tmp_path / "sharded"
    tiny_causal_lm("llama").save_pretrained(model_dir, max_shard_size="100KB")
    index = model_dir / "model.safetensors.index.json"
    assert index.is_file()
    assert weight_index_digests(resolve_model_source(model_dir)) == [
        {"file": index.name, "hashed": "file", "sha256": hashlib.sha256(index.read_bytes()).hexdigest()}]


def test_a_gguf_file_is_identified_by_its_header_up_to_the_tensor_data():
    file = default_model_path()
    reader = gguf.GGUFReader(file)
    assert 0 <= reader.data_offset - gguf_header_length(file) < reader.alignment
