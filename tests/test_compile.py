"""Every supported family compiles with each shipped config, and the Ascend files reproduce the result."""

import pytest
import torch
from conftest import save_tiny_model
from programs import cosine, logits, relative, rounding_bound
from test_streaming import same_files
from tiny_models import FAMILIES

from slimc.backends.mindie_reader import load_ascend_model
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config

SMALL_CALIBRATION = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2"]
# How close the quantized tiny model's logits stay to the float model's (cosine similarity).
FIDELITY = {"llm/w8a8_dynamic.yaml": 0.99, "llm/w8a8_dynamic_quarot.yaml": 0.99, "llm/w8a8_static.yaml": 0.99,
            "llm/w4a16_gptq.yaml": 0.98,
            "llm/w4a8_quarot_gptq.yaml": 0.98, "llm/w4a4_quarot_gptq.yaml": 0.9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config_name", sorted(FIDELITY))
@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_config_compiles_and_the_ascend_files_reproduce_the_quantized_model(tmp_path, family, config_name, dtype):
    model_dir = save_tiny_model(tmp_path / "model", family, dtype)
    # The tiny MoE experts are 32 wide: groups of 16 where the shipped config uses 64.
    groups = ["schemes.w4a16.weight.group_size=16"] if "w4a16" in config_name else []
    config = load_config(resolve_config_path(config_name), SMALL_CALIBRATION + groups)
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    ids = torch.randint(4, compiled.program.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = logits(compiled.program, ids)
    with torch.no_grad():
        from_files = load_ascend_model(tmp_path / "out" / "mindie")(input_ids=ids, use_cache=False).logits
    assert relative(from_files, expected) < rounding_bound(compiled.program, {"input_ids": ids}, 1e-5 if "dynamic" in config_name else 1e-2)
    float_model = type(compiled.program.model).from_pretrained(model_dir).eval()
    assert float_model.dtype == dtype
    with torch.no_grad():
        reference = float_model(input_ids=ids, use_cache=False).logits
    assert cosine(from_files, reference) > FIDELITY[config_name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_glm_4_7_moe_config_compiles_a_glm4_moe_model_and_the_ascend_files_reproduce_it(tmp_path, dtype):
    """The GLM-4.7 row: static W8A8 on attention and dense layers, dynamic on routed experts and down projections."""
    model_dir = save_tiny_model(tmp_path / "model", "glm4_moe", dtype)
    config = load_config(resolve_config_path("glm4_moe/w8a8.yaml"), SMALL_CALIBRATION)
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    specs = compiled.program.quant_specs
    assert specs["model.layers.1.mlp.experts"].scheme_name == "w8a8_dynamic"
    assert specs["model.layers.1.self_attn.q_proj"].scheme_name == "w8a8_static"
    assert not any(name.endswith("mlp.gate") for name in specs)
    ids = torch.randint(4, compiled.program.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = logits(compiled.program, ids)
    with torch.no_grad():
        from_files = load_ascend_model(tmp_path / "out" / "mindie")(input_ids=ids, use_cache=False).logits
    assert relative(from_files, expected) < rounding_bound(compiled.program, {"input_ids": ids}, 1e-2)
    float_model = type(compiled.program.model).from_pretrained(model_dir).eval()
    assert float_model.dtype == dtype
    with torch.no_grad():
        reference = float_model(input_ids=ids, use_cache=False).logits
    assert cosine(from_files, reference) > 0.99


def test_the_rotated_w8a8_config_writes_the_same_files_whatever_the_calibration_data(tmp_path):
    """llm/w8a8_dynamic_quarot.yaml has no data-dependent step (rotation, round to nearest, dynamic activations)."""
    model_dir = save_tiny_model(tmp_path / "model", "llama", torch.bfloat16)
    for dataset in ("builtin:text", "builtin:mix"):
        config = load_config(resolve_config_path("llm/w8a8_dynamic_quarot.yaml"),
                             [*SMALL_CALIBRATION, f"calibration.dataset={dataset}"])
        with pytest.warns(UserWarning, match="below the recommended"):
            compile_model(config, model_path=str(model_dir), out_dir=tmp_path / dataset.replace(":", "-"))
    assert (tmp_path / "builtin-text" / "mindie" / "quant_model_weights.safetensors").is_file()
    # the report and its layer-error plot are measured on the calibration data; the model files are not made of it
    assert same_files(tmp_path / "builtin-text" / "mindie", tmp_path / "builtin-mix" / "mindie") == []
