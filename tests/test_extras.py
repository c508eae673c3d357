"""Optional parts of slimc (pyproject's extras): the core compiles an LLM to the Ascend format without any, and what
needs a missing one says which `pip install "slimc[...]"` to run, before anything is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib
from cli_runs import assert_user_error, slimc
from packaging.requirements import Requirement

from slimc import environment
from slimc.commands.cli import main
from slimc.environment import EXTRA_MODULES, TESTED_LIBRARIES

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SMALL = ["--set", "calibration.samples=2", "--set", "calibration.seq_len=32", "--set", "calibration.batch_size=2",
         "--set", "pipeline.0.search=false"]


def without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `import MODULE` fail (and find_spec find nothing) as if the module were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize(("export_format", "extra", "module"), [("vllm", "vllm", "compressed_tensors"),
                                                                 ("onnx", "onnx", "onnxscript")])
def test_an_export_format_whose_extra_is_missing_names_the_pip_install(tmp_path, monkeypatch, tiny_llama_dir,
                                                                       export_format, extra, module):
    without(monkeypatch, module)
    out = tmp_path / "out"
    result = slimc("compile", "llm/w8a8_dynamic.yaml", "--model", tiny_llama_dir, "--out", out, *SMALL,
                   "--set", f"export=[{{format: {export_format}}}]")
    assert_user_error(result, f"{module} is not installed", f"export format '{export_format}'",
                      f'pip install "slimc[{extra}]"')
    assert not out.exists()


def test_a_diffusion_model_without_diffusers_names_the_diffusion_extra(tmp_path, monkeypatch):
    from tiny_diffusion import tiny_transformer

    model_dir = tmp_path / "flux"
    tiny_transformer("flux").save_pretrained(model_dir)
    without(monkeypatch, "diffusers")
    assert_user_error(slimc("trace", model_dir), "diffusers is not installed", "FluxTransformer2DModel",
                      'pip install "slimc[diffusion]"')


@pytest.mark.filterwarnings("ignore:.*recommended.*calibration set")
def test_an_llm_compile_to_the_ascend_format_needs_no_extra(tmp_path, monkeypatch, tiny_llama_dir):
    without(monkeypatch, *(module for modules in EXTRA_MODULES.values() for module in modules))
    result = slimc("compile", "llm/w8a8_dynamic.yaml", "--model", tiny_llama_dir, "--out", tmp_path / "out", *SMALL)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "mindie" / "quant_model_weights.safetensors").is_file()


def test_a_library_of_a_missing_extra_is_no_problem_for_doctor_nor_warned_about(monkeypatch, capsys):
    installed = environment.installed_version
    monkeypatch.setattr(environment, "installed_version", lambda name: None if name == "diffusers" else installed(name))
    assert environment.untested_versions_warning() is None
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("diffusers "))
    assert "not installed" in line and 'pip install "slimc[diffusion]"' in line
    assert out.rstrip().endswith("all checks passed")


def test_pyproject_declares_each_extra_and_keeps_its_libraries_out_of_the_core():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras)
    assert extras["all"] == ["slimc[vllm,onnx,diffusion]"]
    assert "slimc[all]" in extras["test"]  # setup.sh installs .[test]: the README commands and tests need every extra
    core = {Requirement(line).name for line in project["dependencies"]}
    optional = {Requirement(line).name for lines in extras.values() for line in lines}
    for name in TESTED_LIBRARIES:
        assert (name in core) != (name in optional), name
    assert {status.name: status.extra for status in environment.library_statuses()} == {
        "torch": None, "transformers": None, "diffusers": "diffusion", "compressed-tensors": "vllm",
        "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx"}
