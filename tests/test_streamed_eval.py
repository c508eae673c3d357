"""Perplexity block by block (slimc.commands.streamed_eval) gives the whole model's figures, float and quantized
(read by the Ascend reader from the written files), with one block's weights in memory at a time."""

from __future__ import annotations

import contextlib

import pytest
import torch
from compile_settings import SMALL_CALIBRATION
from conftest import save_tiny_model
from tiny_models import VOCAB_SIZE

from slimc.backends.mindie_reader import AscendBlocks, load_ascend_model
from slimc.commands.compile import compile_model
from slimc.commands.evaluate import evaluate_perplexity, perplexity, streamed_ascend_perplexity
from slimc.commands.streamed_eval import reading_float, streamed_float_program, streamed_perplexity
from slimc.config import load_config
from slimc.configs import resolve_config_path
from slimc.frontends import frontend_for
from slimc.ir.source import resolve_model_source
from slimc.ir.streaming import is_on_meta

CASES = [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen3", torch.float32), ("qwen3", torch.bfloat16),
         ("qwen3_moe", torch.bfloat16)]  # fused experts: read through transformers' checkpoint conversion
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
# Each block computes the same operations on the same inputs as inside the whole model; what remains is the
# order of the float32 sums of the negative log-likelihoods.
TOLERANCE = 1e-6


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{DTYPE_NAMES[case[1]]}")
def compiled(request, tmp_path_factory):
    family, dtype = request.param
    work = tmp_path_factory.mktemp(f"{family}-{DTYPE_NAMES[dtype]}")
    model_dir = save_tiny_model(work / "model", family, dtype)
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"),
                         [*SMALL_CALIBRATION, "pipeline.0.search=false", "export=[{format: mindie}]"])
    compile_model(config, model_path=str(model_dir), out_dir=work / "out")
    return resolve_model_source(model_dir), config, work / "out" / "mindie", dtype


@pytest.fixture(scope="module")
def windows():
    return torch.randint(1, VOCAB_SIZE, (5, 24), generator=torch.Generator().manual_seed(0))


def test_the_float_model_block_by_block_has_the_whole_models_perplexity(compiled, windows):
    source, config, _, dtype = compiled
    frontend = frontend_for(source)
    whole = perplexity(frontend.load(source, dtype=dtype), windows, batch_size=2)
    with streamed_float_program(config, source, frontend) as program:
        assert program.dtype == dtype
        streamed = streamed_perplexity(program, reading_float(program), windows, batch_size=2)
    assert streamed == pytest.approx(whole, rel=TOLERANCE)


def test_the_ascend_files_block_by_block_have_the_whole_quantized_models_perplexity(compiled, windows):
    source, _, mindie, _ = compiled
    whole = perplexity(load_ascend_model(mindie), windows, batch_size=2)
    streamed = streamed_ascend_perplexity(mindie, frontend_for(source), windows, batch_size=2)
    assert streamed == pytest.approx(whole, rel=TOLERANCE)


def test_only_the_block_being_run_holds_weights(compiled, windows):
    source, _, mindie, _ = compiled
    reader = AscendBlocks(mindie)
    program = frontend_for(source).build(reader.output.source, reader.model)
    reader.read_outside(block.name for block in program.blocks)
    held = []

    @contextlib.contextmanager
    def read(block):
        with reader.reading(block.name) as module:
            held.append([other.name for other in program.blocks if not is_on_meta(reader.model.get_submodule(other.name))])
            yield module

    streamed_perplexity(program, read, windows[:2])
    assert held == [[block.name] for block in program.blocks]
    assert all(is_on_meta(block.module) for block in program.blocks)


@pytest.mark.parametrize("compiled", [CASES[0]], indirect=True, ids=["llama-float32"])  # one end-to-end case
def test_eval_streams_to_the_figures_of_the_whole_model_evaluation(compiled):
    source, config, mindie, dtype = compiled
    settings = {"corpus": "builtin:text-eval", "samples": 4, "seq_len": 32, "batch_size": 2}
    streamed = evaluate_perplexity(source, mindie, config=config, **settings)
    whole = evaluate_perplexity(source, mindie, config=config.model_copy(
        update={"memory": config.memory.model_copy(update={"stream_blocks": False})}), **settings)
    assert streamed["float_ppl"] == pytest.approx(whole["float_ppl"], rel=TOLERANCE)
    assert streamed["quantized"]["mindie"]["quantized_ppl"] == pytest.approx(whole["quantized"]["mindie"]["quantized_ppl"],
                                                                            rel=TOLERANCE)
