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

# Allowed perplexity growth through the Ascend files, as the project promises for each scheme, and the
# largest relative output error of one layer (int4 activations lose far more per layer than int8).
BOUNDS = {"llm/w8a8_dynamic.yaml": (1.01, 0.2), "llm/w8a8_static.yaml": (1.03, 0.2),
          "llm/w4a4_quarot_gptq.yaml": (2.0, 0.5), "llm/w4a8_quarot_gptq.yaml": (1.10, 0.3), "llm/w4a16_gptq.yaml": (1.25, 0.3)}


@pytest.mark.parametrize("config_name", sorted(BOUNDS))
def test_smollm2_perplexity_through_the_ascend_files_stays_within_bound(tmp_path, config_name):
    config = load_config(resolve_config_path(config_name), ["calibration.samples=16"])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=None, out_dir=tmp_path / "out")
    ppl_bound, layer_bound = BOUNDS[config_name]
    assert compiled.report.layers and max(layer.relative_error for layer in compiled.report.layers) < layer_bound
    results = evaluate_perplexity(
        resolve_model_source(default_model_path()), tmp_path / "out", corpus="builtin:text-eval", samples=16, seq_len=512
    )
    assert results["quantized_ppl"] <= ppl_bound * results["float_ppl"], results
