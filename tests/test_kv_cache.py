"""Quantized KV cache: fake_quant's `kv_cache` quantizes the keys (after RoPE) and values entering each decoder
layer's attention kernel, static: int8 per channel (Ascend C8), whose scales the mindie files hold under the k/v
projections' names and the Ascend reader applies; or fp8 e4m3 per tensor (vLLM), written as compressed-tensors'
kv_cache_scheme with k_scale / v_scale."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from compile_settings import MULTIMODAL_SMALL, SMALL_CALIBRATION
from conftest import save_tiny_model
from programs import (
    W8A8_DYNAMIC,
    W8A8_STATIC,
    calibration_ids,
    compiled_to_mindie,
    logits,
    relative,
    rounding_bound,
    run_pipeline,
)
from safetensors import safe_open
from tiny_models import tiny_causal_lm
from tiny_multimodal import save_tiny_multimodal
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from slimc.backends.mindie import MindieBackend
from slimc.backends.mindie_reader import AscendKVCache, load_ascend_model, read_description
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import build_backends, compile_model
from slimc.config import config_from_data, load_config
from slimc.errors import ConfigError, ExportError
from slimc.ir.source import ModelSource
from slimc.numerics.modules import KVCacheQuantize

KV_CACHE = {"dtype": "int8", "granularity": "per_channel", "symmetric": True}


def c8_pipeline(symmetric: bool = True) -> list[dict]:
    return [{"pass": "fake_quant", "rules": [{"scheme": "w8"}], "kv_cache": {**KV_CACHE, "symmetric": symmetric}},
            {"pass": "calibrate"}, {"pass": "lower"}]


def kv_quantizers(block) -> dict[str, KVCacheQuantize]:
    return {m.which: m for m in block.graph_module.modules() if isinstance(m, KVCacheQuantize)}


def recorded_keys_and_values(model, batches: list[torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The keys and values layer `layer`'s attention kernel reads on the batches, recorded in the model as
    transformers runs it (no slimc code), concatenated over batches along the tokens."""
    seen: dict[str, list[torch.Tensor]] = {"key": [], "value": []}

    def recording(module, query, key, value, *args, **kwargs):
        if module.layer_idx == layer:
            seen["key"].append(key.detach().float())
            seen["value"].append(value.detach().float())
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("kv_cache_test_recording", recording)
    model.config._attn_implementation = "kv_cache_test_recording"
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    return {which: torch.cat(tensors, dim=2) for which, tensors in seen.items()}


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_cache_scales_are_the_per_channel_range_of_the_calibration_keys_and_values(dtype, symmetric):
    """The first layer's inputs are the embeddings, whatever is quantized: its cached keys and values are those of the
    float model on the calibration batches, and the scales are their per (head, head_dim) range over 127 (255)."""
    model = tiny_causal_lm("glm4_moe").to(dtype)
    batches = calibration_ids(model.config.vocab_size)
    recorded = recorded_keys_and_values(copy.deepcopy(model), batches, layer=0)
    program, _ = run_pipeline(model, c8_pipeline(symmetric), {"w8": W8A8_STATIC}, batches=batches)
    quantizers = kv_quantizers(program.blocks[0])
    assert {q.projection for q in quantizers.values()} == {"self_attn.k_proj", "self_attn.v_proj"}
    for which, tensor in recorded.items():
        low, high = tensor.amin(dim=(0, 2)), tensor.amax(dim=(0, 2))  # (kv_heads, head_dim)
        scale, offset = quantizers[which].scale, quantizers[which].offset
        if symmetric:
            torch.testing.assert_close(scale, torch.maximum(-low, high) / 127, rtol=1e-6, atol=0)
            assert not offset.any()
        else:
            low, high = low.clamp(max=0), high.clamp(min=0)
            torch.testing.assert_close(scale, (high - low) / 255, rtol=1e-6, atol=0)
            assert torch.equal(offset, torch.round(-low / scale) - 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ascend_reader_with_c8_reproduces_the_fake_quant_program(tmp_path, dtype):
    """Dynamic W8A8 Linears, so that the only static quantizers are the KV cache's. In bfloat16 the reader and the
    program differ by ~1% with or without a KV cache (rounding differences flip per-token codes); in float32 they
    agree to 1e-5, and the files read without the C8 arithmetic are far from the program."""
    model = tiny_causal_lm("glm4_moe").to(dtype)
    program, _ = run_pipeline(model, c8_pipeline(), {"w8": W8A8_DYNAMIC})
    program.source = ModelSource(path=tmp_path, gguf_file=None, config=model.config, architecture=type(model).__name__)
    model.config.save_pretrained(tmp_path)
    ids = calibration_ids(model.config.vocab_size, batches=1, seed=5)[0]
    expected = logits(program, ids)
    out = tmp_path / "mindie"
    out.mkdir()
    MindieBackend().export(program, out)
    MindieBackend().verify(program, out)
    read = load_ascend_model(out)
    caches = [m for m in read.modules() if isinstance(m, AscendKVCache)]
    assert len(caches) == model.config.num_hidden_layers
    with torch.no_grad():
        actual = read(input_ids=ids, use_cache=False).logits
    error = relative(actual, expected)
    assert error < rounding_bound(program, {"input_ids": ids}, 1e-5)
    if dtype == torch.float32:
        assert error < 1e-5
        for layer in read.model.layers:  # the same files read without the C8 arithmetic
            layer.self_attn.config = model.config
        with torch.no_grad():
            assert relative(read(input_ids=ids, use_cache=False).logits, expected) > 1e-3


def export_c8(family: str, tmp_path: Path):
    """A tiny `family` model compiled W8A8 static with C8 and exported by the mindie backend: (model, program, out)."""
    model = tiny_causal_lm(family)
    program, out = compiled_to_mindie(model, c8_pipeline(), {"w8": W8A8_STATIC}, tmp_path)
    return model, program, out


def test_mindie_description_names_c8_tensors_under_the_k_and_v_projections(tmp_path):
    model, _, out = export_c8("glm4_moe", tmp_path)
    description = read_description(out)
    assert description["kv_cache_type"] == description["kv_quant_type"] == "C8"
    with safe_open(out / "quant_model_weights.safetensors", "pt") as f:
        for layer in range(model.config.num_hidden_layers):
            attention = model.model.layers[layer].self_attn
            for projection in ("k_proj", "v_proj"):
                for suffix in ("kv_cache_scale", "kv_cache_offset"):
                    name = f"model.layers.{layer}.self_attn.{projection}.{suffix}"
                    assert description[name] == "C8"
                    tensor = f.get_tensor(name)
                    out_features = getattr(attention, projection).out_features  # kv_heads · head_dim
                    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (out_features,)


def test_verify_refuses_a_description_without_the_kv_cache_type(tmp_path):
    _, program, out = export_c8("llama", tmp_path)
    path = out / "quant_model_description.json"
    description = json.loads(path.read_text())
    del description["kv_cache_type"]
    path.write_text(json.dumps(description))
    with pytest.raises(ExportError, match="kv_cache_type and kv_quant_type must be 'C8'"):
        MindieBackend().verify(program, out)


@pytest.mark.parametrize(("kv_cache", "message"), [
    ({"dtype": "int4"}, "int8 \\(Ascend C8\\) or fp8_e4m3 \\(vLLM\\), not 'int4'"),
    ({"granularity": "per_tensor"}, "a int8 KV cache is per_channel"),
    ({"dtype": "fp8_e4m3", "granularity": "per_channel"}, "a fp8_e4m3 KV cache is per_tensor"),
    ({"dtype": "fp8_e4m3", "granularity": "per_tensor", "symmetric": False}, "an fp8_e4m3 KV cache is symmetric"),
    ({"group_size": 8}, "unknown key 'group_size'"),
])
def test_a_kv_cache_the_compiler_cannot_make_is_refused_with_the_reason(kv_cache, message):
    with pytest.raises(ConfigError, match=message):
        config_from_data({"schemes": {"w8": W8A8_STATIC},
                          "pipeline": [{"pass": "fake_quant", "rules": [{"scheme": "w8"}], "kv_cache": {**KV_CACHE, **kv_cache}}]})


@pytest.mark.parametrize(("fmt", "kv_cache", "reason"), [
    ("vllm", "int8", "as float8 \\(e4m3\\) with per-tensor k_scale / v_scale"),
    ("onnx", "int8", "with no KV cache to quantize"),
    ("onnx", "fp8_e4m3", "with no KV cache to quantize"),
    ("mindie", "fp8_e4m3", "Ascend runtimes quantize the KV cache to int8 per channel \\(C8\\)"),
])
def test_formats_that_cannot_hold_the_kv_cache_refuse_the_config_before_compiling(fmt, kv_cache, reason):
    granularity = "per_channel" if kv_cache == "int8" else "per_tensor"
    config = load_config(resolve_config_path("glm4_moe/w8a8_c8.yaml"), [
        f"export=[{{format: {fmt}}}]", f"pipeline.1.kv_cache={{dtype: {kv_cache}, granularity: {granularity}}}"])
    with pytest.raises(ConfigError, match=f"pipeline.1.kv_cache quantizes the KV cache to {kv_cache}, which format {fmt} "
                                          f"cannot hold: .*{reason}"):
        build_backends(config)


FP8_KV_CACHE = {"dtype": "fp8_e4m3", "granularity": "per_tensor"}


def test_fp8_kv_cache_scales_are_the_absmax_of_all_keys_or_values_over_448():
    model = tiny_causal_lm("qwen3")
    batches = calibration_ids(model.config.vocab_size)
    recorded = recorded_keys_and_values(copy.deepcopy(model), batches, layer=0)
    pipeline = [{"pass": "fake_quant", "rules": [{"scheme": "w8"}], "kv_cache": FP8_KV_CACHE}, {"pass": "calibrate"}]
    program, _ = run_pipeline(model, pipeline, {"w8": W8A8_DYNAMIC}, batches=batches)
    for which, quantizer in kv_quantizers(program.blocks[0]).items():
        torch.testing.assert_close(quantizer.scale, recorded[which].abs().max().reshape(1, 1) / 448, rtol=1e-6, atol=0)


def test_vllm_fp8_kv_cache_is_compressed_tensors_kv_cache_scheme_with_k_and_v_scales(tmp_path):
    """config.json's kv_cache_scheme is read by compressed-tensors; the k_scale / v_scale tensors are the program's,
    and compressed-tensors' own fake quantization with them and that scheme gives what the program's cache holds."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    model_dir = save_tiny_model(tmp_path / "model", "qwen3")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), [
        *SMALL_CALIBRATION, "export=[{format: vllm}]", "pipeline.1.kv_cache={dtype: fp8_e4m3, granularity: per_tensor}"])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "vllm" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(raw).kv_cache_scheme
    assert scheme == QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    keys = torch.randn(2, 8, 20, 16, generator=torch.Generator().manual_seed(0))
    with safe_open(tmp_path / "out" / "vllm" / "model.safetensors", "pt") as f:
        for block in compiled.program.blocks:
            for which, quantizer in kv_quantizers(block).items():
                written = f.get_tensor(f"{block.name}.self_attn.{which[0]}_scale")
                assert torch.equal(written, quantizer.scale.reshape(1))
                x = keys * written * 150  # most values on the fp8 grid's range, some beyond ±448 (saturated)
                expected = fake_quantize(x, written, torch.zeros(1), scheme)
                assert torch.equal(quantizer(x), expected)


def test_glm_4_7_c8_config_compiles_and_the_ascend_files_reproduce_it(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "glm4_moe", torch.bfloat16)
    config = load_config(resolve_config_path("glm4_moe/w8a8_c8.yaml"), SMALL_CALIBRATION)
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    program = compiled.program
    assert all(set(kv_quantizers(block)) == {"key", "value"} for block in program.blocks)
    ids = torch.randint(4, program.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = logits(program, ids)
    with torch.no_grad():
        from_files = load_ascend_model(tmp_path / "out" / "mindie")(input_ids=ids, use_cache=False).logits
    assert relative(from_files, expected) < rounding_bound(program, {"input_ids": ids}, 1e-2)


def test_qwen3_vl_moe_c8_config_quantizes_the_text_layers_caches_only(tmp_path: Path):
    model_dir = save_tiny_multimodal("qwen3_vl_moe", tmp_path / "model", dtype=torch.bfloat16)
    config = load_config(resolve_config_path("qwen3_vl_moe/w8a8_c8.yaml"), MULTIMODAL_SMALL)
    compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    program = compiled.program
    cached = {block.name for block in program.blocks if kv_quantizers(block)}
    assert cached == {block.name for block in program.blocks if block.role == "text"} and cached
    description = read_description(tmp_path / "out" / "mindie")
    c8 = sorted(name for name, kind in description.items() if kind == "C8" and name not in ("kv_cache_type", "kv_quant_type"))
    assert c8 and all(name.startswith("model.language_model.layers.") for name in c8)
    assert len(c8) == 4 * len(cached)
    read = load_ascend_model(tmp_path / "out" / "mindie")
    assert sum(isinstance(m, AscendKVCache) for m in read.modules()) == len(cached)
