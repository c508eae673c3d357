"""calibrate's `weight_algorithm: autoround`: rounding and range clipping learned per block by signed gradient descent
on the block's output error, lowered and written as round-to-nearest results are."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_model
from module_calls import module_calls
from programs import calibration_ids, cosine, logits, relative, run_pipeline
from test_distributed import environment, one_process
from test_resume import compile_args
from tiny_models import tiny_causal_lm

from slimc.backends.mindie_reader import AscendLinear, load_ascend_model, read_tensors
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import config_from_data, load_config
from slimc.errors import ConfigError, PassError
from slimc.schemes import QRANGES

W4A8 = {"w4a8": {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 16},
                 "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}}}
SMALL_CALIBRATION = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2"]


def quantized(family: str, algorithm: str, **autoround):
    """A tiny model through fake_quant (W4A8 dynamic, routers excluded) and calibrate with `algorithm`."""
    pipeline = [{"pass": "fake_quant", "rules": [{"scheme": "w4a8", "exclude": ["*mlp.gate"]}]},
                {"pass": "calibrate", "weight_algorithm": algorithm, "autoround": {"iterations": 40, **autoround}}]
    return run_pipeline(tiny_causal_lm(family), pipeline, schemes=W4A8)[0]


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_autoround_brings_the_first_block_nearer_the_float_block_than_round_to_nearest(family):
    """On the calibration batches the first block receives (the embeddings, the same for every algorithm), its
    quantized output is nearer the float block's after autoround than after rounding to nearest; fused experts too."""
    float_model = tiny_causal_lm(family)
    layer = float_model.model.layers[0]
    calls = [call for ids in calibration_ids(float_model.config.vocab_size)
             for call in module_calls([("layer", layer)], lambda ids=ids: float_model(input_ids=ids, use_cache=False))]

    def block_error(program) -> float:
        with torch.no_grad():
            outputs = [program.blocks[0].traced(*args, **kwargs) for _, args, kwargs, _ in calls]
        first = lambda output: output[0] if isinstance(output, tuple) else output  # noqa: E731
        return max(relative(first(ours), first(theirs)) for ours, (*_, theirs) in zip(outputs, calls, strict=True))

    rtn, autoround = quantized(family, "rtn"), quantized(family, "autoround")
    assert block_error(autoround) < 0.8 * block_error(rtn)
    if family == "qwen3_moe":
        experts = autoround.blocks[0].module.mlp.experts
        assert not torch.equal(experts.down_proj, rtn.blocks[0].module.mlp.experts.down_proj)


def test_autoround_with_a_seed_learns_the_same_rounding_every_time():
    settings = {"iterations": 10, "batches_per_step": 1}
    first, again = quantized("llama", "autoround", seed=3, **settings), quantized("llama", "autoround", seed=3, **settings)
    other = quantized("llama", "autoround", seed=4, **settings)
    for name, spec in first.quant_specs.items():
        assert torch.equal(spec.weight_qparams["weight"][0], again.quant_specs[name].weight_qparams["weight"][0]), name
    weights = lambda program: [p.detach().clone() for p in program.model.parameters()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(weights(first), weights(again), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(first), weights(other), strict=True))
    assert all(parameter.grad is None for parameter in first.model.parameters())  # only the learned tensors had gradients


@pytest.mark.parametrize("config_name", ["llm/w4a4_quarot_gptq.yaml", "llm/w8a8_static.yaml"])
def test_autoround_codes_stay_in_the_scheme_range_and_the_ascend_files_reproduce_the_model(tmp_path, config_name):
    """After rotation (W4A4) or with static activation scales (W8A8), as the Ascend toolkit offers it: the files
    compute what the compiled program computes, near the float model, and every code read back is in range."""
    model_dir = save_tiny_model(tmp_path / "model", "qwen3_moe")
    path = resolve_config_path(config_name)
    steps = yaml.safe_load(path.read_text())["pipeline"]
    at = next(index for index, step in enumerate(steps) if step["pass"] == "calibrate")
    config = load_config(path, [*SMALL_CALIBRATION, f"pipeline.{at}.weight_algorithm=autoround",
                                f"pipeline.{at}.autoround.iterations=20"])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    ids = torch.randint(4, compiled.program.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = logits(compiled.program, ids)
    read_back = load_ascend_model(tmp_path / "out" / "mindie")
    with torch.no_grad():
        from_files = read_back(input_ids=ids, use_cache=False).logits
        reference = type(compiled.program.model).from_pretrained(model_dir).eval()(input_ids=ids, use_cache=False).logits
    assert relative(from_files, expected) < 1e-2
    assert cosine(from_files, reference) > 0.9
    linears = [m for m in read_back.modules() if isinstance(m, AscendLinear)]
    assert any(".experts." in name for name, m in read_back.named_modules() if isinstance(m, AscendLinear))
    for linear in linears:
        qmin, qmax = QRANGES["int4" if linear.quant_type.startswith("W4") else "int8"]
        assert qmin <= int(linear.weight.min()) and int(linear.weight.max()) <= qmax, linear.quant_type


@pytest.mark.parametrize(("settings", "message"), [
    ({"iterations": 0}, r"pipeline.0.autoround.iterations: Input should be greater than or equal to 1"),
    ({"lr": 2.0}, r"pipeline.0.autoround.lr: Input should be less than or equal to 0.5"),
    ({"learning_rate": 0.01}, r"pipeline.0.autoround.learning_rate: .*"),
])
def test_bad_autoround_settings_are_a_config_error_naming_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        config_from_data({"schemes": W4A8, "pipeline": [
            {"pass": "calibrate", "weight_algorithm": "autoround", "autoround": settings}]})


def test_two_processes_learn_from_the_gradients_of_both_what_one_process_learns(tmp_path):
    """2 gloo processes share 3 batches (process 0 runs 0 and 2, process 1 runs 1), every step on all of them: the
    summed gradients are one process's, up to float rounding, and so are the written codes, nearly all of them."""
    model = save_tiny_model(tmp_path / "model", "llama")
    settings = ["calibration.samples=6", "calibration.seq_len=32", "calibration.batch_size=2",
                "schemes.w4a16.weight.group_size=16", "pipeline.1.weight_algorithm=autoround",
                "pipeline.1.autoround.iterations=8", "pipeline.1.autoround.batches_per_step=3"]
    config = resolve_config_path("llm/w4a16_gptq.yaml")
    (tmp_path / "jobs.json").write_text(json.dumps([[str(a) for a in compile_args(config, model, tmp_path / "two", settings)]]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(Path(__file__).parent / "distributed_runs.py"), str(tmp_path / "jobs.json")],
                         capture_output=True, text=True, timeout=300, env=environment())
    assert run.returncode == 0, run.stderr[-3000:]
    with pytest.warns(UserWarning, match="below the recommended"):
        one_process("llm/w4a16_gptq.yaml", model, tmp_path / "one", settings)
    two, one = read_tensors(tmp_path / "two" / "mindie"), read_tensors(tmp_path / "one" / "mindie")
    codes = [name for name, tensor in one.items() if tensor.dtype == torch.int8]
    assert codes and two.keys() == one.keys()
    differing = sum(int((two[name] != one[name]).sum()) for name in codes)
    assert differing <= 1e-3 * sum(one[name].numel() for name in codes)


def test_a_group_size_that_does_not_divide_a_layer_names_the_layer():
    schemes = {"w4a16": {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 48}}}
    pipeline = [{"pass": "fake_quant", "rules": [{"scheme": "w4a16"}]}, {"pass": "calibrate", "weight_algorithm": "autoround"}]
    with pytest.raises(PassError, match=r"model.layers.0.self_attn.\w+_proj: group_size 48 does not divide the input size 64"):
        run_pipeline(tiny_causal_lm("llama"), pipeline, schemes=schemes)
