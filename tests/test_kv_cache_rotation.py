"""rotate's online_qk: a Hadamard per head on the queries and keys after RoPE, for the int8 KV cache (C8). q·kᵀ is
unchanged, the key scales are calibrated on the rotated keys, the mindie files hold the rotation beside the C8
scales (`<attn>.qk_rotation_m` / `_n`, metadata.quarot.qk_rotation) and the Ascend reader applies it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compile_settings import SMALL_CALIBRATION
from conftest import save_tiny_model
from programs import (
    W8A8_DYNAMIC,
    calibration_ids,
    compiled_to_mindie,
    logits,
    relative,
    rounding_bound,
    run_pipeline,
)
from safetensors import safe_open
from tiny_models import tiny_causal_lm

from slimc.backends.mindie import MindieBackend
from slimc.backends.mindie_reader import AscendKVCache, load_ascend_model, read_description
from slimc.backends.vllm import VllmBackend
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import build_backends, compile_model
from slimc.config import load_config
from slimc.errors import ConfigError, ExportError, ModelLoadError, PassError
from slimc.numerics.hadamard import hadamard_matrix
from slimc.numerics.modules import KVCacheQuantize, QKHadamard

C8 = {"dtype": "int8", "granularity": "per_channel", "symmetric": True}
NOTHING_ELSE = [{"scheme": "w8", "include": ["none"], "optional": True}]  # the KV cache is all that is quantized


def rotated_c8_pipeline(online_qk: bool = True, kv_cache: dict = C8) -> list[dict]:
    """Rotation with no online rotation but (maybe) the q/k one, and a quantized KV cache only."""
    return [{"pass": "norm_fusion"}, {"pass": "rotate", "online_down": False, "online_qk": online_qk},
            {"pass": "fake_quant", "rules": NOTHING_ELSE, "kv_cache": kv_cache}, {"pass": "calibrate"}, {"pass": "lower"}]


@pytest.fixture(scope="module")
def rotated_c8(tmp_path_factory):
    """A tiny Llama (and its float copy) compiled with a rotated C8 cache and exported by the mindie backend."""
    tmp = tmp_path_factory.mktemp("rotated_c8")
    model = tiny_causal_lm("llama")
    float_model = copy.deepcopy(model)
    program, out = compiled_to_mindie(model, rotated_c8_pipeline(), {"w8": W8A8_DYNAMIC}, tmp)
    return float_model, program, out


def test_rotated_c8_files_hold_the_rotation_beside_the_scales_untyped_and_listed_in_the_metadata(rotated_c8):
    float_model, _, out = rotated_c8
    description = read_description(out)
    layers = [f"model.layers.{i}.self_attn" for i in range(float_model.config.num_hidden_layers)]
    assert description["metadata"] == {"quarot": {"qk_rotation": {"layers": layers}}}
    head_dim = float_model.config.head_dim
    with safe_open(out / "quant_model_weights.safetensors", "pt") as f:
        for attention in layers:
            assert description[f"{attention}.k_proj.kv_cache_scale"] == "C8"
            assert f"{attention}.qk_rotation_m" not in description and f"{attention}.qk_rotation_n" not in description
            r_m, r_n = f.get_tensor(f"{attention}.qk_rotation_m"), f.get_tensor(f"{attention}.qk_rotation_n")
            assert r_m.dtype == r_n.dtype == torch.float32 and r_m.shape[0] * r_n.shape[0] == head_dim
            rotation = torch.kron(r_m.double(), r_n.double())
            torch.testing.assert_close(rotation, hadamard_matrix(head_dim) / head_dim**0.5, rtol=0, atol=1e-7)


def test_ascend_reader_with_rotated_c8_computes_the_program_and_stays_near_the_float_model(rotated_c8):
    """Through the files the model is the compiled program (float32: to 1e-5) and within C8's error of the float
    model (0.033 on these tokens, as without online_qk: the tiny model's cache is calibrated on 96 tokens); read
    without the rotation (unrotated keys in a cache whose scales fit rotated ones) it is not the program."""
    float_model, program, out = rotated_c8
    MindieBackend().verify(program, out)
    ids = calibration_ids(float_model.config.vocab_size, batches=1, seed=5)[0]
    expected = logits(program, ids)
    read = load_ascend_model(out)
    with torch.no_grad():
        actual = read(input_ids=ids, use_cache=False).logits
        reference = float_model(input_ids=ids, use_cache=False).logits
    assert relative(actual, expected) < 1e-5
    assert relative(actual, reference) < 4e-2
    caches = [m for m in read.modules() if isinstance(m, AscendKVCache)]
    assert len(caches) == float_model.config.num_hidden_layers
    for cache in caches:
        cache.r_m = cache.r_n = None
    with torch.no_grad():
        assert relative(read(input_ids=ids, use_cache=False).logits, expected) > 3e-4  # 1.0e-3


@pytest.mark.parametrize("family", ["qwen3", "glm4_moe"])
def test_rotated_c8_files_reproduce_the_program_with_k_norm_and_partial_rope(tmp_path, family):
    """Qwen3 normalises keys per head before RoPE, GLM-4.7 rotates half of each head: the rotation still comes
    after both, in the program and through the files."""
    model = tiny_causal_lm(family)
    program, out = compiled_to_mindie(model, rotated_c8_pipeline(), {"w8": W8A8_DYNAMIC}, tmp_path)
    ids = calibration_ids(model.config.vocab_size, batches=1, seed=5)[0]
    with torch.no_grad():
        assert relative(load_ascend_model(out)(input_ids=ids, use_cache=False).logits, logits(program, ids)) < 1e-5


def test_verify_and_the_reader_refuse_rotation_tensors_the_metadata_does_not_list(rotated_c8, tmp_path):
    _, program, out = rotated_c8
    copied = tmp_path / "mindie"
    copied.mkdir()
    for path in out.iterdir():
        (copied / path.name).write_bytes(path.read_bytes())
    description_path = copied / "quant_model_description.json"
    description = json.loads(description_path.read_text())
    description["metadata"] = {}
    description_path.write_text(json.dumps(description))
    with pytest.raises(ExportError, match="does not list the online rotations"):
        MindieBackend().verify(program, copied)
    with pytest.raises(ModelLoadError, match="qk_rotation lists 0 attention modules, but the files hold query and key "
                                             "rotation tensors for 2"):
        load_ascend_model(copied)


def test_key_scales_are_calibrated_on_the_rotated_keys():
    """The key quantizer sits behind the rotation: its scales are the per-channel range of the rotated keys."""
    model = tiny_causal_lm("llama")
    program, _ = run_pipeline(model, rotated_c8_pipeline()[:-1], {"w8": W8A8_DYNAMIC})
    gm = program.blocks[0].graph_module
    kernel = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "self_attn.attention_kernel")
    query, key_quantizer = kernel.args[0], kernel.args[1]
    rotated_key = key_quantizer.args[0]
    assert isinstance(gm.get_submodule(query.target), QKHadamard)
    assert isinstance(gm.get_submodule(key_quantizer.target), KVCacheQuantize)
    assert rotated_key.target == query.target  # one rotation module, called on the query and on the key
    seen = []
    hook = gm.get_submodule(key_quantizer.target).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for ids in calibration_ids(model.config.vocab_size):  # the calibration batches run_pipeline used
            logits(program, ids)
    hook.remove()
    keys = torch.cat(seen, dim=2)
    expected = torch.maximum(-keys.amin(dim=(0, 2)), keys.amax(dim=(0, 2))) / 127
    torch.testing.assert_close(gm.get_submodule(key_quantizer.target).scale, expected, rtol=1e-6, atol=0)


def attention_score_error(online_qk: bool, outlier: float) -> float:
    """Relative error of layer 0's causal attention scores q·kᵀ with the int8 cache against without, on a tiny Llama
    whose queries and keys share outlier channels: the lowest-frequency RoPE pair of every head `outlier` times the
    others (as the channels that make attention sinks are large in both)."""
    model = tiny_causal_lm("llama")
    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.view(-1, head_dim, projection.in_features)[:, [head_dim // 2 - 1, head_dim - 1]] *= outlier
    batches = calibration_ids(model.config.vocab_size, batches=4, seq_len=64)
    program, _ = run_pipeline(model, rotated_c8_pipeline(online_qk)[:-1], {"w8": W8A8_DYNAMIC}, batches=batches)
    gm = program.blocks[0].graph_module
    seen = []
    hook = gm.get_submodule("self_attn.attention_kernel").register_forward_pre_hook(lambda m, args: seen.append(args[:2]))
    ids = calibration_ids(model.config.vocab_size, batches=1, seq_len=64, seed=9)[0]
    with torch.no_grad():
        for mode in ("quantize", "off"):
            for quantizer in [m for m in gm.modules() if isinstance(m, KVCacheQuantize)]:
                quantizer.mode = mode
            logits(program, ids)
    hook.remove()
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    (q, k), (q_float, k_float) = seen
    repeat = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(repeat, 1).transpose(-1, -2))[..., causal]
    float_scores = (q_float @ k_float.repeat_interleave(repeat, 1).transpose(-1, -2))[..., causal]
    return relative(scores, float_scores)


def test_rotated_keys_lose_less_of_the_attention_scores_where_queries_and_keys_share_outlier_channels():
    """Static per-channel scales already give an outlier channel its own scale, so the keys' own error need not drop;
    what rotation lowers is the q·kᵀ error that the large query components multiply (0.0080 -> 0.0037 here)."""
    assert attention_score_error(online_qk=True, outlier=20) < 0.6 * attention_score_error(online_qk=False, outlier=20)


def test_online_qk_without_a_kv_cache_is_refused():
    pipeline = rotated_c8_pipeline()
    del pipeline[2]["kv_cache"]
    with pytest.raises(PassError, match="online_qk rotates the attention's queries and keys for a quantized KV cache, "
                                        "but no fake_quant step has kv_cache"):
        run_pipeline(tiny_causal_lm("llama"), pipeline, {"w8": W8A8_DYNAMIC})


VLLM_REFUSAL = "vLLM applies compressed-tensors transforms only to the inputs and outputs of Linear layers"


def test_vllm_refuses_the_rotated_cache_in_the_config_and_at_export():
    config = load_config(resolve_config_path("llm/w4a8_quarot_c8.yaml"), [
        "export=[{format: vllm}]", "pipeline.2.kv_cache={dtype: fp8_e4m3, granularity: per_tensor}"])
    with pytest.raises(ConfigError, match=f"pipeline.1.online_qk rotates the attention's queries and keys online, which "
                                          f"format vllm cannot hold: .*{VLLM_REFUSAL}"):
        build_backends(config)
    fp8 = {"dtype": "fp8_e4m3", "granularity": "per_tensor"}
    program, _ = run_pipeline(tiny_causal_lm("llama"), rotated_c8_pipeline(kv_cache=fp8), {"w8": W8A8_DYNAMIC})
    with pytest.raises(ExportError, match=f"vllm: the program rotates the attention's queries and keys online .*{VLLM_REFUSAL}"):
        VllmBackend().check(program)


def test_w4a8_c8_rotation_config_compiles_and_the_ascend_files_reproduce_it(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    config = load_config(resolve_config_path("llm/w4a8_quarot_c8.yaml"), SMALL_CALIBRATION)
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    program = compiled.program
    description = read_description(tmp_path / "out" / "mindie")
    assert description["kv_cache_type"] == "C8" and description["model_quant_type"] == "FLOAT"  # W4A8 is never the type
    assert len(description["metadata"]["quarot"]["qk_rotation"]["layers"]) == len(program.blocks)
    assert len(description["metadata"]["quarot"]["kronecker_rotation"]["layers"]) == len(program.blocks)
    ids = torch.randint(4, program.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        from_files = load_ascend_model(tmp_path / "out" / "mindie")(input_ids=ids, use_cache=False).logits
    assert relative(from_files, logits(program, ids)) < rounding_bound(program, {"input_ids": ids}, 1e-2)
