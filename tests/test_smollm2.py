"""The real model: SmolLM2-135M-Instruct from its GGUF file, quantized with the shipped configs and
measured through the written Ascend files. Calibration is cut to 16 × 512 tokens in batches of 2 (the
smoothing search runs on the first batch) to fit CI time; the full-calibration figures are in README.md
and docs/lowbit.md."""

import pytest
import torch

from slimc.backends.mindie_reader import load_ascend_model
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.commands.evaluate import perplexity
from slimc.config import load_config
from slimc.frontends.data import load_corpus, token_samples
from slimc.ir.source import default_model_path, load_model, load_tokenizer, resolve_model_source

pytestmark = pytest.mark.slow

# Allowed perplexity growth through the Ascend files, as the project promises for each scheme, and the
# largest relative output error of one layer (int4 activations lose far more per layer than int8).
# W4A16 (GPTQ, groups of 64), W4A8 (rotation + GPTQ) and W8A8 static are measured by bench/compile_llm.py only,
# to keep the suite within CI time: W4A16 and W4A8 run the GPTQ (and rotation) path the W4A4 config runs here,
# and the static activation and packed int4 layouts are checked against the Ascend files on every tiny family
# (tests/test_compile.py).
BOUNDS = {"llm/w8a8_dynamic.yaml": (1.01, 0.2), "llm/w4a4_quarot_gptq.yaml": (2.0, 0.5)}


@pytest.fixture(scope="module")
def evaluation_ids() -> torch.Tensor:
    source = resolve_model_source(default_model_path())
    return token_samples(load_tokenizer(source), load_corpus("builtin:text-eval"), samples=16, seq_len=512, recommended=None)


@pytest.fixture(scope="module")
def float_ppl(evaluation_ids) -> float:
    return perplexity(load_model(resolve_model_source(default_model_path()), dtype=torch.float32), evaluation_ids)


@pytest.mark.parametrize("config_name", sorted(BOUNDS))
def test_smollm2_perplexity_through_the_ascend_files_stays_within_bound(tmp_path, config_name, evaluation_ids, float_ppl):
    config = load_config(resolve_config_path(config_name), ["calibration.samples=16", "calibration.batch_size=2"])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=None, out_dir=tmp_path / "out")
    ppl_bound, layer_bound = BOUNDS[config_name]
    assert compiled.report.layers and max(layer.relative_error for layer in compiled.report.layers) < layer_bound
    quantized_ppl = perplexity(load_ascend_model(tmp_path / "out" / "mindie"), evaluation_ids)
    assert quantized_ppl <= ppl_bound * float_ppl, (quantized_ppl, float_ppl)
