"""The `slimc` command line as users meet it: its exit code, stdout and stderr.

A bad input exits 2 with one `slimc: error:` message naming the problem and no traceback
(`--debug` shows it); a good compile publishes a complete output directory, or nothing.
Commands run in this process through `slimc.commands.cli.main` with stdout and stderr captured (a fresh
process spends seconds importing torch each time); the traceback and the console script are
checked in real processes.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import assert_user_error, slimc, slimc_process
from PIL import Image
from tiny_models import tiny_causal_lm
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from slimc.commands.compile import LAYER_PLOT_FILE, compile_model
from slimc.config import load_config
from slimc.errors import ExportError
from slimc.frontends import supported_architectures

BUILTIN_PASSES = ("norm_fusion", "rotate", "smooth", "fake_quant", "calibrate", "lower")

CONFIG = """\
version: 2
model:
  dtype: float32
calibration:
  samples: 4
  seq_len: 32
  batch_size: 2
schemes:
  w8a8_dynamic:
    weight: {dtype: int8, granularity: per_channel, symmetric: true}
    act: {dtype: int8, granularity: per_token, symmetric: true, dynamic: true}
pipeline:
  - pass: smooth
    alpha: 0.5
  - pass: fake_quant
    rules:
      - scheme: w8a8_dynamic
        include: ["*"]
        exclude: ["lm_head"]
  - pass: calibrate
  - pass: lower
export:
  - format: mindie
"""


# --- helpers ------------------------------------------------------------------------------------------


def write_config(directory: Path, text: str = CONFIG) -> Path:
    path = directory / "config.yaml"
    path.write_text(text)
    return path


def line_of(text: str, fragment: str) -> int:
    """1-based number of the first line of `text` containing `fragment`."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if fragment in line)


def compile_with(tmp_path: Path, model: Path, config_text: str = CONFIG, *extra: str) -> subprocess.CompletedProcess:
    return slimc("compile", write_config(tmp_path, config_text), "--model", model, "--out", tmp_path / "out", *extra)


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """One successful `slimc compile` of the tiny Llama: (output directory, finished process)."""
    work = tmp_path_factory.mktemp("compiled")
    out = work / "out"
    result = slimc("compile", write_config(work), "--model", tiny_llama_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


# --- a successful compile -----------------------------------------------------------------------------


def test_compile_writes_the_mindie_description_the_weights_and_the_report(compiled):
    out, _ = compiled
    description = json.loads((out / "mindie" / "quant_model_description.json").read_text())
    assert description
    assert (out / "mindie" / "quant_model_weights.safetensors").stat().st_size > 0
    report = json.loads((out / "slimc_report.json").read_text())
    assert "mindie" in report["outputs"]


def test_compile_writes_a_png_of_the_per_layer_errors_beside_the_report(compiled):
    out, _ = compiled
    with Image.open(out / LAYER_PLOT_FILE) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_compile_publishes_files_0644_and_directories_0755(compiled):
    out, _ = compiled
    modes = {p.relative_to(out.parent): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    expected = {p: 0o755 if (out.parent / p).is_dir() else 0o644 for p in modes}
    assert modes == expected


def test_compile_leaves_no_staging_directory_beside_the_output(compiled):
    out, _ = compiled
    assert staging_dirs(out) == []


def test_compile_prints_a_summary_with_quantized_layers_and_peak_memory(compiled):
    _, result = compiled
    assert "quantized layers" in result.stdout
    assert "peak memory" in result.stdout


@pytest.mark.filterwarnings("ignore:.*recommended.*calibration set")
def test_a_compile_that_fails_during_export_leaves_no_output_and_no_staging_directory(tmp_path, monkeypatch, tiny_llama_dir):
    from slimc.backends.mindie import MindieBackend

    def write_then_fail(self, program, out_dir):
        (out_dir / "quant_model_weights.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MindieBackend, "write", write_then_fail)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="ran out of space"):
        compile_model(load_config(write_config(tmp_path)), model_path=str(tiny_llama_dir), out_dir=out)
    assert not out.exists()
    assert staging_dirs(out) == []


def test_an_existing_output_directory_is_refused_and_left_alone(tmp_path, tiny_llama_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_user_error(compile_with(tmp_path, tiny_llama_dir), "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_an_existing_output_directory(tmp_path, tiny_llama_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "slimc_report.json").write_text("{}")  # an earlier slimc output: --overwrite may replace it
    (tmp_path / "out" / "stale.txt").write_text("from an earlier run")
    result = compile_with(tmp_path, tiny_llama_dir, CONFIG, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert (tmp_path / "out" / "mindie" / "quant_model_weights.safetensors").exists()
    assert staging_dirs(tmp_path / "out") == []


def test_overwrite_refuses_to_replace_the_model_directory_it_reads(tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    result = slimc("compile", write_config(tmp_path), "--model", model, "--out", model, "--overwrite")
    assert_user_error(result)
    assert (model / "model.safetensors").exists()


# --- bad models ---------------------------------------------------------------------------------------


def test_a_nonexistent_model_path_is_a_user_error(tmp_path):
    assert_user_error(compile_with(tmp_path, tmp_path / "nowhere"), "nowhere", "does not exist")


def test_a_directory_that_is_not_a_model_is_a_user_error(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    assert_user_error(compile_with(tmp_path, tmp_path / "notes"), "not a model directory", "config.json", ".safetensors")


def test_a_model_directory_without_weight_files_is_a_user_error(tmp_path, tiny_llama_dir):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    assert_user_error(compile_with(tmp_path, tmp_path / "model"), "config.json but no", "safetensors")


def test_a_model_directory_with_only_pickle_weights_is_refused(tmp_path, tiny_llama_dir):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    torch.save(tiny_causal_lm("llama").state_dict(), tmp_path / "model" / "pytorch_model.bin")
    assert_user_error(compile_with(tmp_path, tmp_path / "model"), "pytorch_model.bin", "pickle", "safetensors only")


def test_a_sharded_index_naming_a_missing_shard_lists_the_missing_shard(tmp_path):
    model = tmp_path / "sharded"
    tiny_causal_lm("llama").save_pretrained(model, max_shard_size="100KB")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    assert_user_error(compile_with(tmp_path, model), shards[-1].name, "missing", "model.safetensors.index.json")


UNSUPPORTED = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512, n_positions=64, bos_token_id=1, eos_token_id=2)
    ),
    "bert": lambda: BertForMaskedLM(
        BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=512)
    ),
}


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_an_unsupported_architecture_names_the_supported_ones(tmp_path, family):
    model = UNSUPPORTED[family]()
    model.save_pretrained(tmp_path / "model")
    result = compile_with(tmp_path, tmp_path / "model")
    assert_user_error(result, type(model).__name__, "not a supported model architecture", *supported_architectures())


# --- bad configs and overrides ------------------------------------------------------------------------


def test_an_unknown_yaml_key_gives_its_file_line_and_the_allowed_keys(tmp_path, tiny_llama_dir):
    text = CONFIG.replace("  batch_size: 2\n", "  batch_size: 2\n  sample_count: 4\n")
    result = compile_with(tmp_path, tiny_llama_dir, text)
    assert_user_error(
        result, f"config.yaml:{line_of(text, 'sample_count')}", "unknown key 'sample_count'",
        "allowed keys: dataset, split, column, samples, seq_len, batch_size",
    )


def test_a_value_of_the_wrong_type_names_the_key_its_line_and_the_value(tmp_path, tiny_llama_dir):
    text = CONFIG.replace("samples: 4", "samples: many")
    result = compile_with(tmp_path, tiny_llama_dir, text)
    assert_user_error(result, f"config.yaml:{line_of(text, 'samples: many')}", "calibration.samples", "integer", "'many'")


def test_an_unknown_pass_lists_the_registered_passes(tmp_path, tiny_llama_dir):
    text = CONFIG.replace("pass: smooth", "pass: smoothquant")
    result = compile_with(tmp_path, tiny_llama_dir, text)
    assert_user_error(result, f"config.yaml:{line_of(text, 'smoothquant')}", "unknown pass 'smoothquant'", *BUILTIN_PASSES)


def test_an_unknown_export_format_gives_its_file_line_and_the_available_formats(tmp_path, tiny_llama_dir):
    text = CONFIG.replace("format: mindie", "format: mindy")
    result = compile_with(tmp_path, tiny_llama_dir, text)
    assert_user_error(result, f"config.yaml:{line_of(text, 'mindy')}", "unknown export format 'mindy'", "mindie")


def test_an_unknown_pass_parameter_names_the_pass_parameters(tmp_path, tiny_llama_dir):
    text = CONFIG.replace("alpha: 0.5", "alfa: 0.5")
    result = compile_with(tmp_path, tiny_llama_dir, text)
    assert_user_error(result, f"config.yaml:{line_of(text, 'alfa')}", "unknown key 'alfa'", "allowed keys:", "alpha")


def test_a_glob_with_an_unclosed_bracket_is_a_user_error(tmp_path, tiny_llama_dir):
    text = CONFIG.replace('include: ["*"]', 'include: ["model.layers.[0.*"]')
    result = compile_with(tmp_path, tiny_llama_dir, text)
    assert_user_error(result, "model.layers.[0.*", "unclosed [")


def test_an_include_glob_that_matches_no_layer_is_a_user_error(tmp_path, tiny_llama_dir):
    text = CONFIG.replace('include: ["*"]', 'include: ["*.qkv_proj"]')
    result = compile_with(tmp_path, tiny_llama_dir, text)
    assert_user_error(result, "*.qkv_proj", "matches no quantizable layer", "model.layers.0.")
    assert not (tmp_path / "out").exists()


def test_a_config_that_does_not_exist_names_the_shipped_configs(tmp_path, tiny_llama_dir):
    result = slimc("compile", tmp_path / "nope.yaml", "--model", tiny_llama_dir, "--out", tmp_path / "out")
    assert_user_error(result, "nope.yaml", "not found", "llm/w8a8_dynamic.yaml")


def test_a_set_override_without_an_equals_sign_shows_the_expected_syntax(tmp_path, tiny_llama_dir):
    result = compile_with(tmp_path, tiny_llama_dir, CONFIG, "--set", "calibration.samples")
    assert_user_error(result, "--set 'calibration.samples'", "key.path=value")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = slimc_process("--debug", "compile", write_config(tmp_path), "--model", tmp_path / "nowhere",
                           "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ModelLoadError" in result.stderr


# --- passes, configs, trace, eval ---------------------------------------------------------------------


def test_passes_lists_every_builtin_pass_and_the_smooth_alpha():
    result = slimc("passes")
    assert result.returncode == 0, result.stderr
    listed = {line.split(":")[0] for line in result.stdout.splitlines() if not line.startswith(" ")}
    assert set(BUILTIN_PASSES) <= listed
    smooth = result.stdout[result.stdout.index("smooth:"):]
    assert "alpha: float (default 0.5)" in smooth


def test_configs_lists_the_shipped_llm_configs():
    result = slimc("configs")
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"llm/w8a8_dynamic.yaml", "llm/w8a8_static.yaml", "llm/w4a4_quarot_gptq.yaml", "llm/w4a8_quarot_gptq.yaml",
            "llm/w4a16_gptq.yaml", "llm/w8a8_dynamic_quarot.yaml"} <= names


def test_trace_prints_the_blocks_and_the_dense_patterns(tiny_llama_dir):
    result = slimc("trace", tiny_llama_dir)
    assert result.returncode == 0, result.stderr
    assert "block model.layers.0" in result.stdout
    for pattern in ("norm → linears", "v → o", "up → down"):
        assert pattern in result.stdout
    assert ("k, v → attention self_attn.k_proj, self_attn.v_proj → self_attn.attention_kernel (2 kv heads × 16): the KV "
            "cache") in result.stdout


def test_trace_prints_the_fused_experts_of_a_moe_model(tiny_qwen3_moe_dir):
    result = slimc("trace", tiny_qwen3_moe_dir)
    assert result.returncode == 0, result.stderr
    assert "block model.layers.0" in result.stdout
    assert "experts          mlp.experts: 4 experts" in result.stdout


def test_trace_prints_who_reads_and_writes_the_residual_stream(tiny_qwen3_moe_dir):
    result = slimc("trace", tiny_qwen3_moe_dir)
    assert result.returncode == 0, result.stderr
    assert "residual stream outside the blocks: written by model.embed_tokens, read by model.norm → lm_head" in result.stdout
    assert "residual stream  read by " in result.stdout and "written by mlp.experts, self_attn.o_proj" in result.stdout


def test_eval_json_gives_float_and_quantized_perplexity_within_5_percent_for_w8a8(compiled, tiny_llama_dir):
    out, _ = compiled
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", out, "--samples", "2", "--seq-len", "32", "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results["float_ppl"] > 1
    assert results["quantized"]["mindie"]["quantized_ppl"] / results["float_ppl"] == pytest.approx(1.0, abs=0.05)


def test_eval_fidelity_of_an_llm_compares_every_decoder_layer_and_the_logits(compiled, tiny_llama_dir):
    out, _ = compiled
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", out, "--fidelity", "--samples", "2", "--seq-len", "32",
                   "--batch-size", "1", "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert (results["metric"], results["dataset"], results["batches"]) == ("fidelity", "builtin:text-eval", 2)
    mindie = results["quantized"]["mindie"]
    assert [row["name"] for row in mindie["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert [row["name"] for row in mindie["outputs"]] == ["logits"]
    assert all(0.99 < row["worst"]["cosine"] < 1 for row in [*mindie["blocks"], *mindie["outputs"]])


def test_eval_fidelity_prints_a_table_of_cosine_relative_error_and_psnr(compiled, tiny_llama_dir):
    out, _ = compiled
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", out, "--fidelity", "--samples", "1", "--seq-len", "32")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fidelity on builtin:text-eval (1 batches)")
    assert [line.split()[0] for line in lines[3:]] == ["model.layers.0", "model.layers.1", "output"]
    assert "cosine" in lines[1] and "PSNR (dB)" in lines[1]


def test_eval_on_the_calibration_dataset_is_a_user_error(compiled, tiny_llama_dir):
    out, _ = compiled
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", out, "--corpus", "builtin:text", "--samples", "1")
    assert_user_error(result, "builtin:text is the calibration dataset", "held-out")


def test_eval_of_a_directory_that_is_not_a_compile_output_is_a_user_error(tmp_path, tiny_llama_dir):
    result = slimc("eval", "--model", tiny_llama_dir, "--quantized", tmp_path, "--samples", "2", "--seq-len", "32")
    assert_user_error(result, "quant_model_description.json", "slimc compile")


def test_the_console_script_is_installed_next_to_the_interpreter():
    script = Path(sys.executable).parent / "slimc"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("slimc ")


def test_a_dry_run_of_the_default_gguf_model_prints_no_deprecation_warning():
    """transformers warns once per process when its deprecated `torch_dtype` is read: slimc's own calls never do."""
    result = slimc_process("compile", "llm/w8a8_dynamic.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "deprecated" not in result.stderr.lower(), result.stderr
