"""calibration.propagate: float calibrates every block on the float model's hidden states, whether a smoothing pass
offers the float block's outputs on its statistics run or the pipeline runs the block itself; "quantized" (the
default) on the outputs of the blocks before as quantized."""

import copy

import pytest
import torch
from programs import W8A8_DYNAMIC, calibration_ids, llm_program
from tiny_models import tiny_causal_lm

from slimc.config import config_from_data
from slimc.errors import ConfigError
from slimc.pipeline import Pipeline
from slimc.report import RunReport

RECORD = {"pass": "recording_pass:RecordInputs"}
QUANTIZE = [{"pass": "fake_quant", "rules": [{"scheme": "w8", "exclude": ["*mlp.gate"]}]}, {"pass": "calibrate"}]
SMOOTH = {"pass": "smooth", "search": True, "search_grid": [0.5, 0.8]}


def compile_recording(model, batches, pipeline, propagate, **config):
    """The hidden states the last recording pass saw, per block, and the run's report."""
    cfg = config_from_data({"schemes": {"w8": W8A8_DYNAMIC}, "pipeline": [RECORD, *pipeline],
                            "calibration": {"propagate": propagate}, **config})
    steps = Pipeline.from_config(cfg)
    report = RunReport()
    steps.run(llm_program(model), cfg, [{"input_ids": ids} for ids in batches], report)
    return [step for step in steps.steps if hasattr(step, "hidden")][-1].hidden, report


@torch.no_grad()
def float_hidden_states(model, batches):
    """Per decoder layer, the float model's input hidden states on each batch."""
    per_batch = [model(input_ids=ids, output_hidden_states=True).hidden_states for ids in batches]
    return [[states[layer] for states in per_batch] for layer in range(model.config.num_hidden_layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothed", [True, False], ids=["offered-by-smooth", "run-by-pipeline"])
def test_float_propagation_calibrates_every_block_on_the_float_models_hidden_states(dtype, smoothed):
    model = tiny_causal_lm("llama", dtype=dtype)
    batches = calibration_ids(model.config.vocab_size, batches=3)
    expected = float_hidden_states(copy.deepcopy(model), batches)
    pipeline = [SMOOTH, *QUANTIZE] if smoothed else QUANTIZE
    seen, report = compile_recording(copy.deepcopy(model), batches, pipeline, "float")
    for layer, states in enumerate(seen.values()):
        for got, want in zip(states, expected[layer], strict=True):
            torch.testing.assert_close(got, want)
    # the smoothing statistics ran every batch whole and gave the next block's inputs: no block-output run of its own
    assert ("block outputs" in report.seconds) is not smoothed

    quantized, _ = compile_recording(copy.deepcopy(model), batches, pipeline, "quantized")
    assert not torch.allclose(list(quantized.values())[1][0], expected[1][0])


def test_float_propagation_with_every_batch_spilled_to_disk_gives_what_it_gives_in_memory():
    """The next block's store fills while the block's own is still read: their spill files must not collide."""
    model = tiny_causal_lm("llama")
    batches = calibration_ids(model.config.vocab_size, batches=3)
    pipeline = [SMOOTH, *QUANTIZE, RECORD]  # what the passes after smoothing's offering read
    in_memory, _ = compile_recording(copy.deepcopy(model), batches, pipeline, "float")
    spilled, _ = compile_recording(copy.deepcopy(model), batches, pipeline, "float", memory={"activations_gb": 1e-9})
    assert in_memory.keys() == spilled.keys()
    for block in in_memory:
        for kept, read_back in zip(in_memory[block], spilled[block], strict=True):
            assert torch.equal(kept, read_back)


def test_propagate_is_float_or_quantized():
    with pytest.raises(ConfigError, match="calibration.propagate: Input should be 'quantized' or 'float'"):
        config_from_data({"calibration": {"propagate": "fp32"}})
