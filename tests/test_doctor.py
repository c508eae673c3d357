"""`slimc doctor`, the tested version ranges, and the warning for a library outside them."""

from __future__ import annotations

import importlib.metadata
from collections import Counter

import pytest
import torch
from conftest import save_tiny_model
from safetensors import safe_open

from slimc import environment
from slimc.commands import doctor
from slimc.commands.cli import main, resolve_config_path
from slimc.commands.compile import compile_model, resolve_source
from slimc.config import load_config
from slimc.environment import TESTED_LIBRARIES, library_statuses
from slimc.frontends import frontend_for

SMALL = ["--set", "calibration.samples=4", "--set", "calibration.seq_len=32"]


@pytest.fixture
def transformers_reported_as(monkeypatch):
    """Make importlib.metadata report another installed transformers version."""
    real = importlib.metadata.version

    def report(version):
        monkeypatch.setattr(environment.importlib.metadata, "version",
                            lambda name: version if name == "transformers" else real(name))
    return report


def test_every_tested_library_has_a_range_with_both_bounds_in_the_installed_metadata():
    ranges = environment.tested_ranges()
    assert set(ranges) == set(TESTED_LIBRARIES)
    for name, specifier in ranges.items():
        operators = {spec.operator for spec in specifier}
        assert operators == {">=", "<"}, f"{name}: {specifier}"


def test_doctor_passes_in_an_environment_of_tested_versions(capsys):
    assert all(status.in_range for status in library_statuses())  # this suite runs in the lock or a compat env
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in TESTED_LIBRARIES:
        assert f"\n  {name} " in out
    assert "memory available:" in out and "disk free under" in out and out.rstrip().endswith("all checks passed")


def test_a_library_outside_its_range_fails_doctor_naming_the_range(capsys, transformers_reported_as):
    transformers_reported_as("9.0.0")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    low, high = sorted(str(s) for s in environment.tested_ranges()["transformers"])[::-1]
    assert f"- transformers 9.0.0 (tested {low}, {high}): install a tested version" in out


def test_other_commands_warn_once_about_an_untested_version_and_still_run(capsys, transformers_reported_as):
    transformers_reported_as("9.0.0")
    assert main(["configs"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "untested library versions" in line]
    assert len(warnings) == 1 and "transformers 9.0.0 (tested >=" in warnings[0] and "docs/compatibility.md" in warnings[0]
    assert "llm/w8a8_dynamic.yaml" in captured.out


def test_doctor_with_a_model_and_config_counts_the_layers_a_compile_quantizes(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model", "qwen3_moe")
    config_name = "llm/w8a8_static.yaml"
    assert main(["doctor", config_name, "--model", str(model_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(load_config(resolve_config_path(config_name), SMALL[1::2]), model_path=str(model_dir),
                                 out_dir=tmp_path / "out")
    labels = Counter(spec.scheme.label for spec in compiled.program.quant_specs.values())
    assert f"quantized layers: {', '.join(f'{k} {v}' for k, v in sorted(labels.items()))}; float layers in blocks: 0" in out
    assert "model: " in out and "Qwen3MoeForCausalLM, frontend llm" in out


def test_the_output_estimate_is_close_to_the_tensors_a_compile_writes(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), SMALL[1::2])
    with pytest.warns(UserWarning, match="below the recommended"):
        compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    written = 0
    for path in (tmp_path / "out" / "mindie").glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            written += sum(f.get_tensor(name).nbytes for name in f.keys())
    source = resolve_source(config, str(model_dir))
    frontend = frontend_for(source)
    program = frontend.build(source, frontend.skeleton(source, torch.float32))
    assert all(p.device.type == "meta" for p in program.model.parameters())  # no weight was read
    found = doctor.estimate(program, config)
    assert found.layers == Counter({"W8A8_DYNAMIC": 14})
    assert 0.9 < found.output_bytes / written < 1.1


def test_doctor_reports_too_little_memory_for_the_estimate(tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    monkeypatch.setattr(doctor, "free_memory_bytes", lambda: 1)
    assert main(["doctor", "llm/w8a8_dynamic.yaml", "--model", str(model_dir)]) == 1
    assert "of memory needed, 0.0 MiB available" in capsys.readouterr().out


MEASURED_7B_WIDTH_PEAK = {2: 2.50 * 2**30, 8: 2.60 * 2**30}  # bench/scale.py, W8A8 dynamic, 4 x 128 tokens (docs/scale.md)


def test_the_streamed_peak_estimate_matches_the_measured_compiles_of_7b_widths(tmp_path):
    """`--dry-run`'s peak for the shape bench/scale.py measured, from the skeleton alone (no weight exists)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), ["calibration.samples=4", "calibration.seq_len=128"])
    for layers, measured in MEASURED_7B_WIDTH_PEAK.items():
        model_dir = tmp_path / f"{layers}l"
        AutoConfig.for_model("qwen2", num_hidden_layers=layers, vocab_size=49152, tie_word_embeddings=False,
                             dtype="bfloat16", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                             num_key_value_heads=4, architectures=["Qwen2ForCausalLM"]).save_pretrained(model_dir)
        save_file({"unread": torch.zeros(1)}, model_dir / "model.safetensors")  # the skeleton reads no weight
        source = resolve_source(config, str(model_dir))
        frontend = frontend_for(source)
        found = doctor.estimate(frontend.build(source, frontend.skeleton(source, torch.bfloat16)), config, streamed=True)
        assert 1.0 <= found.peak_memory_bytes / measured < 1.1  # not below what was measured
