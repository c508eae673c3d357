"""The real model: SmolLM2-135M-Instruct from its GGUF file, quantized with the shipped configs and
measured through the written Ascend files. Calibration is cut to 16 × 512 tokens to fit CI time;
the full-calibration figures are in README.md."""

import pytest

from slimc.cli import resolve_config_path
from slimc.compile import compile_model
from slimc.config import load_config
from slimc.evaluate import evaluate_perplexity
from slimc.frontends.hf import default_model_path, resolve_model_source

pytestmark = pytest.mark.slow

# Allowed perplexity growth through the Ascend files, as the project promises for each scheme.
BOUNDS = {"llm/w8a8_dynamic.yaml": 1.01, "llm/w8a8_static.yaml": 1.03}


@pytest.mark.parametrize("config_name", sorted(BOUNDS))
def test_smollm2_perplexity_through_the_ascend_files_stays_within_bound(tmp_path, config_name):
    config = load_config(resolve_config_path(config_name), ["calibration.samples=16"])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=None, out_dir=tmp_path / "out")
    assert compiled.report.layers and max(layer.relative_error for layer in compiled.report.layers) < 0.2
    results = evaluate_perplexity(
        resolve_model_source(default_model_path()), tmp_path / "out", corpus="builtin:text-eval", samples=16, seq_len=512
    )
    assert results["quantized_ppl"] <= BOUNDS[config_name] * results["float_ppl"], results
