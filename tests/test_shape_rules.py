"""Shape rules up front: a layer whose shape its scheme or an export format cannot hold stops the compile before
the model loads, naming the layer, the rule and the fix; `compile --dry-run` prints the plan and every such layer.

The model is a tiny Qwen3-MoE shaped like the case that used to fail only at export: a dense first layer whose
down_proj reads 200 features and experts whose down_proj reads 40, neither divisible by the 16 that W4A8_DYNAMIC
needs in the mindie format.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_runs import assert_user_error, slimc
from compile_settings import SMALL_CALIBRATION
from tiny_models import tiny_causal_lm
from tiny_tokenizer import tiny_tokenizer

from slimc.backends.mindie import MindieBackend, _check_scheme
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.commands.shape_rules import exclude_globs
from slimc.config import load_config
from slimc.errors import ConfigError, ExportError
from slimc.frontends.llm import DecoderLLM
from slimc.schemes import QuantScheme

W4A8 = "llm/w4a8_quarot_gptq.yaml"
BROKEN_LAYERS = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.experts (each expert's down_proj)")
# The fixes the error names: the dense down_proj kept float, the experts given int8 weights (float experts could not
# carry the rotate pass's online rotation into the mindie format).
FOLLOW_THE_FIXES = [
    "schemes.w8a8_dynamic={weight: {dtype: int8}, act: {dtype: int8, granularity: per_token, dynamic: true}}",
    'pipeline.2.rules=[{scheme: w4a8_dynamic, exclude: ["*mlp.gate", "lm_head", "model.layers.*.mlp.down_proj"]}, '
    '{scheme: w8a8_dynamic, include: ["model.layers.*.mlp.experts"]}]',
]


@pytest.fixture(scope="module")
def odd_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "odd-qwen3-moe"
    sizes = {"intermediate_size": 200, "mlp_only_layers": [0], "moe_intermediate_size": 40}
    tiny_causal_lm("qwen3_moe", sizes=sizes).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the weights or the calibration data fails the test: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model or its calibration data was loaded")

    monkeypatch.setattr("slimc.commands.compile.load_program", refuse)
    monkeypatch.setattr(DecoderLLM, "calibration_batches", refuse)


def test_a_layer_breaking_a_w4a8_rule_is_refused_before_the_model_or_data_loads(tmp_path, odd_moe_dir, nothing_loads):
    config = load_config(resolve_config_path(W4A8), SMALL_CALIBRATION)
    with pytest.raises(ConfigError) as refused:
        compile_model(config, model_path=str(odd_moe_dir), out_dir=tmp_path / "out")
    message = str(refused.value)
    for expected in (*BROKEN_LAYERS, "out 64, in 200", "out 64, in 40", "format mindie",
                     "input size divisible by 16", "W8A8_DYNAMIC", "leave format mindie out of export",
                     'keep the Linears float: add ["model.layers.*.mlp.down_proj"]',
                     "fused experts behind the rotate pass's online rotation cannot stay float"):
        assert expected in message, f"{expected!r} not in:\n{message}"
    assert not (tmp_path / "out").exists()


def test_the_command_line_refusal_exits_2_with_one_error_naming_the_layers(tmp_path, odd_moe_dir, nothing_loads):
    result = slimc("compile", W4A8, "--model", odd_moe_dir, "--out", tmp_path / "out")
    assert_user_error(result, "2 layers", *BROKEN_LAYERS, "divisible by 16")


def test_dry_run_prints_the_plan_and_every_broken_rule_and_exits_1_writing_nothing(tmp_path, odd_moe_dir,
                                                                                   nothing_loads, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = slimc("compile", W4A8, "--model", odd_moe_dir, "--dry-run")
    assert result.returncode == 1, result.stderr
    assert "w4a8_dynamic (W4A8_DYNAMIC): 12" in result.stdout
    assert "export: mindie" in result.stdout
    assert "shape rules: broken by 2 layers" in result.stdout
    for layer in BROKEN_LAYERS:
        assert layer in result.stdout
    assert not list(tmp_path.iterdir())


def test_dry_run_of_a_plan_that_follows_the_fixes_exits_0(odd_moe_dir, nothing_loads):
    result = slimc("compile", W4A8, "--model", odd_moe_dir, "--dry-run", *(f"--set={s}" for s in FOLLOW_THE_FIXES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "w8a8_dynamic (W8A8_DYNAMIC): 1" in result.stdout
    assert "float layers in blocks: 1" in result.stdout
    assert "every quantized layer fits its scheme and the export formats" in result.stdout


def test_without_an_online_rotation_the_fix_offers_to_keep_the_experts_float_too(odd_moe_dir, nothing_loads):
    result = slimc("compile", W4A8, "--model", odd_moe_dir, "--dry-run", "--set", "pipeline.1.online_down=false")
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'keep them float: add ["model.layers.*.mlp.down_proj", "model.layers.*.mlp.experts"]' in result.stdout
    assert "cannot stay float" not in result.stdout


def test_a_format_without_the_rule_takes_the_layers_mindie_refuses(odd_moe_dir, nothing_loads):
    result = slimc("compile", W4A8, "--model", odd_moe_dir, "--dry-run", "--set", "export=[{format: vllm}]")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compile_without_out_is_a_user_error(odd_moe_dir):
    assert_user_error(slimc("compile", W4A8, "--model", odd_moe_dir), "--out")


def test_following_the_fixes_the_error_names_lets_the_compile_finish(tmp_path, odd_moe_dir):
    fast = ["pipeline.3.weight_algorithm=rtn"]
    config = load_config(resolve_config_path(W4A8), SMALL_CALIBRATION + fast + FOLLOW_THE_FIXES)
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(odd_moe_dir), out_dir=tmp_path / "out")
    assert "model.layers.0.mlp.down_proj" not in compiled.program.quant_specs
    assert compiled.program.quant_specs["model.layers.0.mlp.up_proj"].scheme.label == "W4A8_DYNAMIC"
    assert (tmp_path / "out" / "mindie" / "quant_model_description.json").is_file()


def test_a_group_size_that_does_not_divide_the_input_is_refused_naming_the_first_layers_and_a_count(
        tmp_path, tiny_llama_dir, nothing_loads):
    config = load_config(resolve_config_path("llm/w4a16_gptq.yaml"), ["schemes.w4a16.weight.group_size=48"])
    with pytest.raises(ConfigError) as refused:
        compile_model(config, model_path=str(tiny_llama_dir), out_dir=tmp_path / "out")
    message = str(refused.value)
    assert "14 layers" in message  # every Linear of both layers reads 64 or 128 features
    assert "scheme w4a16 (W4A16): group_size 48 must divide the input size" in message
    assert "model.layers.0.self_attn.q_proj: out 64, in 64" in message
    assert "... and 9 more" in message
    assert "choose a group_size that divides the input size" in message


@pytest.mark.parametrize("scheme", [
    {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 1}},
    {"weight": {"dtype": "int4", "granularity": "per_channel"}},
    {"weight": {"dtype": "int4"}, "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}},
    {"weight": {"dtype": "int8"}, "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}},
])
def test_mindie_shape_rules_refuse_exactly_the_shapes_its_writer_refuses(scheme):
    scheme = QuantScheme.model_validate(scheme)
    for out_features in (6, 7):
        for in_features in (16, 17, 18, 32):
            part = SimpleNamespace(prefix="p", scheme=scheme, codes=torch.zeros(out_features, in_features))
            refused_up_front = any(rule.broken_by(out_features, in_features, scheme) for rule in MindieBackend.shape_rules)
            try:
                _check_scheme(part)
                refused_by_writer = False
            except ExportError:
                refused_by_writer = True
            assert refused_up_front == refused_by_writer, (scheme.label, out_features, in_features)


def test_exclude_globs_generalise_layer_numbers_only_where_no_other_planned_layer_matches():
    planned = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    assert exclude_globs(planned[:2], planned) == ["model.layers.*.mlp.down_proj"]
    assert exclude_globs(planned[:1], planned) == ["model.layers.0.mlp.down_proj"]
