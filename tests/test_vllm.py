"""The vllm backend writes compressed-tensors checkpoints that transformers (through compressed-tensors) loads and
runs like slimc's lowered model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from compile_settings import (
    DIFFUSION_SIZES,
    DIFFUSION_SMALL,
    MULTIMODAL_CONFIGS,
    MULTIMODAL_SMALL,
    OMNI_IMAGE_SIZE,
    OMNI_SMALL,
    SMALL_CALIBRATION,
    VLLM_ONLY,
)
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from conftest import save_tiny_model
from programs import (
    CHECK_IDS,
    W8A8_DYNAMIC,
    relative,
    run_pipeline,
    simulated_logits,
    simulating_in_float,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_causal_lm
from transformers import AutoModelForCausalLM

from slimc.backends.vllm import VllmBackend
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.errors import ExportError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def compile_tiny(tmp_path: Path, family: str, config_name: str, overrides: tuple[str, ...] = ()):
    model_dir = save_tiny_model(tmp_path / "model", family)
    config = load_config(resolve_config_path(config_name), [*SMALL_CALIBRATION, *VLLM_ONLY, *overrides])
    with pytest.warns(UserWarning, match="below the recommended"):
        return compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")


def lowered_llama(tmp_path: Path, rules: list[dict], schemes: dict):
    """A tiny Llama quantized in memory, its config.json saved where the program's source points."""
    program, _ = run_pipeline(tiny_causal_lm("llama"), [{"pass": "fake_quant", "rules": rules}, {"pass": "calibrate"},
                                                        {"pass": "lower"}], schemes=schemes)
    program.model.config.save_pretrained(tmp_path / "source")
    program.source = dataclasses.replace(program.source, path=tmp_path / "source")
    return program


def load_with_transformers(out_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(out_dir / "vllm").eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dynamic_w8a8_checkpoint_runs_in_transformers_as_the_lowered_model(tmp_path, family, vllm_per_token_scales):
    compiled = compile_tiny(tmp_path, family, "llm/w8a8_dynamic.yaml")
    with torch.no_grad():
        loaded = load_with_transformers(tmp_path / "out")(input_ids=CHECK_IDS, use_cache=False).logits
    assert relative(loaded, simulated_logits(compiled.program, CHECK_IDS)) < 1e-5


def test_transformers_own_per_token_scales_stay_within_a_quantization_step_of_vllms(tmp_path):
    compiled = compile_tiny(tmp_path, "llama", "llm/w8a8_dynamic.yaml")
    with torch.no_grad():
        loaded = load_with_transformers(tmp_path / "out")(input_ids=CHECK_IDS, use_cache=False).logits
    assert 1e-5 < relative(loaded, simulated_logits(compiled.program, CHECK_IDS)) < 2e-2


def test_static_w8a8_checkpoint_keeps_input_scales_and_zero_points(tmp_path, vllm_per_token_scales):
    compiled = compile_tiny(tmp_path, "qwen2", "llm/w8a8_static.yaml")
    out = tmp_path / "out" / "vllm"
    with safe_open(out / "model.safetensors", "pt") as f:
        q_proj = {k.rpartition(".")[2]: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.0.self_attn.q_proj.")}
    assert set(q_proj) == {"weight", "weight_scale", "input_scale", "input_zero_point", "bias"}
    assert q_proj["weight"].dtype == torch.int8 and q_proj["input_zero_point"].dtype == torch.int8
    program = compiled.program
    with program.reading(program.blocks[0]):  # a streamed compile spilled it
        lowered = program.model.model.layers[0].self_attn.q_proj
        assert torch.equal(q_proj["input_scale"], lowered.input_scale)
        assert torch.equal(q_proj["input_zero_point"].float(), lowered.input_offset)
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert config.format == "int-quantized" and len(config.config_groups) == 2  # static, and dynamic down_proj
    with torch.no_grad():
        loaded = load_with_transformers(tmp_path / "out")(input_ids=CHECK_IDS, use_cache=False).logits
    assert relative(loaded, simulated_logits(compiled.program, CHECK_IDS)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_w4a16_groups_are_pack_quantized_and_load_exactly(tmp_path, family):
    """Symmetric groups: transformers cannot build asymmetric pack-quantized Linears (it expects their packed zero
    points unpacked: transformers#47430, llm-compressor#1618), so its end-to-end load is checked on these."""
    compiled = compile_tiny(tmp_path, family, "llm/w4a16_gptq.yaml",
                            ("schemes.w4a16.weight.group_size=16", "schemes.w4a16.weight.symmetric=true"))
    config = json.loads((tmp_path / "out" / "vllm" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == "pack-quantized" and group["targets"] == ["Linear"]
    assert group["weights"].items() >= {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": True}.items()
    assert group["input_activations"] is None and "lm_head" in config["ignore"]
    with torch.no_grad():
        loaded = load_with_transformers(tmp_path / "out")(input_ids=CHECK_IDS, use_cache=False).logits
    assert relative(loaded, simulated_logits(compiled.program, CHECK_IDS)) < 1e-6


def test_asymmetric_w4a16_groups_decompress_with_their_packed_zero_points(tmp_path):
    """The shipped W4A16 (asymmetric groups): compressed-tensors' own compressor, which packs zero points as vLLM
    reads them (eight int4 rows per int32), gives back each lowered weight exactly."""
    compiled = compile_tiny(tmp_path, "llama", "llm/w4a16_gptq.yaml",
                            ("schemes.w4a16.weight.group_size=16", "memory.stream_blocks=false"))  # keeps the lowered weights
    out = tmp_path / "out" / "vllm"
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    group = config.config_groups["group_0"]
    assert group.weights.symmetric is False
    prefix = "model.layers.0.self_attn.q_proj"
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = {k.removeprefix(f"{prefix}."): f.get_tensor(k) for k in f.keys() if k.startswith(f"{prefix}.weight")}
    lowered = compiled.program.model.get_submodule(prefix)
    assert set(stored) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert stored["weight_zero_point"].shape == (lowered.out_features // 8, lowered.in_features // 16)
    compressor = BaseCompressor.get_value_from_registry(config.format)
    weight = compressor.decompress(stored, group)["weight"]
    assert torch.equal(weight.float(), lowered.dequantized_weight())
    assert bool((lowered.weight_offset != 0).any())  # the groups are really offset


def test_moe_experts_are_written_per_expert_under_the_names_vllm_loads(tmp_path):
    compile_tiny(tmp_path, "qwen3_moe", "llm/w8a8_dynamic.yaml")
    with safe_open(tmp_path / "out" / "vllm" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for expert in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"model.layers.1.mlp.experts.{expert}.{proj}"
            assert {f"{prefix}.weight", f"{prefix}.weight_scale"} <= names
    assert not any("gate_up_proj" in name for name in names)
    assert "model.layers.1.mlp.gate.weight" in names  # the router stays float


def test_glm_4_7_mixed_schemes_target_their_layers_by_pattern(tmp_path):
    compile_tiny(tmp_path, "glm4_moe", "glm4_moe/w8a8.yaml")
    config = QuantizationConfig.model_validate(
        json.loads((tmp_path / "out" / "vllm" / "config.json").read_text())["quantization_config"])
    dynamic = [g for g in config.config_groups.values() if g.input_activations.dynamic]
    static = [g for g in config.config_groups.values() if not g.input_activations.dynamic]
    assert len(dynamic) == len(static) == 1
    assert r"re:^model\.layers\.\d+\.mlp\.experts\.\d+\.gate_proj$" in dynamic[0].targets
    assert r"re:^model\.layers\.\d+\.self_attn\.q_proj$" in static[0].targets


def test_weight_only_and_w4a4_schemes_are_expressed(tmp_path):
    w4a4 = {"weight": {"dtype": "int4", "granularity": "per_channel"},
            "act": {"dtype": "int4", "granularity": "per_token", "dynamic": True}}
    program = lowered_llama(tmp_path, [{"scheme": "w4a4", "include": ["*mlp*"]}, {"scheme": "w8a16", "include": ["*self_attn*"]}],
                            {"w4a4": w4a4, "w8a16": {"weight": {"dtype": "int8", "granularity": "per_channel"}}})
    out = tmp_path / "out"
    out.mkdir()
    backend = VllmBackend()
    backend.export(program, out)
    backend.verify(program, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    schemes = {(g["weights"]["num_bits"], (g["input_activations"] or {}).get("num_bits")) for g in config["config_groups"].values()}
    assert schemes == {(4, 4), (8, None)}
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=CHECK_IDS, use_cache=False).logits
    assert torch.nn.functional.cosine_similarity(loaded.flatten(), simulated_logits(program, CHECK_IDS).flatten(), dim=0) > 0.99


def test_verify_fails_when_a_written_weight_changed(tmp_path):
    program = lowered_llama(tmp_path, [{"scheme": "w8a8", "include": ["*"], "exclude": ["lm_head"]}], {"w8a8": W8A8_DYNAMIC})
    out = tmp_path / "out"
    out.mkdir()
    backend = VllmBackend()
    backend.export(program, out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ExportError, match=r"model.layers.1.mlp.up_proj decompressed by compressed-tensors differs"):
        backend.verify(program, out)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_language_checkpoint_loads_under_its_own_names(tmp_path, kind, vllm_per_token_scales):
    """Multimodal checkpoints keep their tensor names (Qwen2.5-VL's legacy `model.layers.*`); config groups and
    the ignore list name each Linear under both its runtime and its checkpoint name, so both loaders find it."""
    from tiny_multimodal import save_tiny_multimodal

    from slimc.frontends.multimodal import MultimodalLLM

    model_dir = save_tiny_multimodal(kind, tmp_path / "model")
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS[kind]), [*MULTIMODAL_SMALL, *VLLM_ONLY])
    compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    program = compiled.program
    with safe_open(tmp_path / "out" / "vllm" / "model.safetensors", "pt") as f:
        written = set(f.keys())
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert {n for n in written if n.endswith((".weight", ".bias"))} == set(f.keys())
    loaded = type(program.model).from_pretrained(tmp_path / "out" / "vllm").eval()
    held_out = config.calibration.model_copy(update={"dataset": "builtin:image-text-eval", "samples": 2})
    for batch in MultimodalLLM().calibration_batches(held_out, program.source, program):
        with torch.no_grad(), simulating_in_float(program), program.executing_graphs():
            expected = program.model(**batch, use_cache=False).logits
        with torch.no_grad():
            actual = loaded(**batch, use_cache=False).logits
        assert relative(actual, expected) < 1e-5


def test_small_max_shard_size_writes_transformers_style_shards(tmp_path):
    program = lowered_llama(tmp_path, [{"scheme": "w8a8", "include": ["*"], "exclude": ["lm_head"]}], {"w8a8": W8A8_DYNAMIC})
    out = tmp_path / "out"
    out.mkdir()
    backend = VllmBackend(max_shard_size="40KB")
    backend.export(program, out)
    backend.verify(program, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=CHECK_IDS, use_cache=False).logits
    assert torch.nn.functional.cosine_similarity(loaded.flatten(), simulated_logits(program, CHECK_IDS).flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="is not a size"):
        VllmBackend(max_shard_size="five gigs")


def test_whole_omni_checkpoint_keeps_the_talker_float_and_targets_the_thinker_by_its_checkpoint_names(tmp_path):
    """The thinker is quantized under `thinker.*`; talker and vocoder are copied bit for bit and ignored. (The tiny
    whole checkpoint's talker config is not a loadable whole model, so this reads the files, not transformers.)"""
    from tiny_omni import save_tiny_full_omni

    model_dir = save_tiny_full_omni("qwen2_5_omni", tmp_path / "model")
    config = load_config(resolve_config_path("qwen2_5_omni/w8a8.yaml"),
                         [*OMNI_SMALL, f"calibration.image_size={OMNI_IMAGE_SIZE['qwen2_5_omni']}", *VLLM_ONLY])
    compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    out = tmp_path / "out" / "vllm"
    quantization = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert {"talker.model.layers.0.mlp.down_proj", "thinker.lm_head"} <= set(quantization.ignore)
    targets = [t for group in quantization.config_groups.values() for t in group.targets]
    assert r"re:^thinker\.model\.layers\.\d+\.self_attn\.q_proj$" in targets
    assert not any("talker" in target for target in targets)
    written = load_file(out / "model.safetensors")
    assert written["thinker.model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    source = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        source.update(load_file(shard))
    talker = [name for name in source if not name.startswith("thinker.")]
    assert talker and all(torch.equal(written[name], source[name]) for name in talker)


def test_a_diffusion_transformer_is_refused_with_the_formats_that_take_it(tmp_path):
    from tiny_diffusion import save_tiny_pipeline

    pipeline_dir = save_tiny_pipeline("flux", tmp_path / "flux", two_experts=False, weight_std=0.3)
    config = load_config(resolve_config_path("flux/w8a8.yaml"), [*DIFFUSION_SMALL, *DIFFUSION_SIZES["flux"], *VLLM_ONLY])
    with pytest.raises(ExportError, match="vllm: .*language models.*format mindie or onnx"):
        compile_model(config, model_path=str(pipeline_dir), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
