"""The mindie backend writes the Ascend ascendV1 layout of docs/formats/mindie.md, and its reader recomputes the model from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from programs import everything_but_head, lower, program_of, quantized_model, token_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_causal_lm

from slimc.backends import backend_class
from slimc.backends.mindie import MindieBackend, load_ascend_model
from slimc.backends.mindie_reader import AscendExperts, AscendLinear, deq_scale_float
from slimc.errors import ExportError
from slimc.ir import Program
from slimc.numerics.modules import QuantizedLinear
from slimc.numerics.quant import unpack_int4
from slimc.schemes import QuantScheme, TensorScheme

W8A8_DYNAMIC = QuantScheme(weight=TensorScheme(), act=TensorScheme(granularity="per_token", dynamic=True))
W8A8 = QuantScheme(weight=TensorScheme(), act=TensorScheme(granularity="per_tensor", symmetric=False))
W8A16 = QuantScheme(weight=TensorScheme())
W8A16_G32 = QuantScheme(weight=TensorScheme(granularity="per_group", group_size=32, symmetric=False))
W4A4_DYNAMIC = QuantScheme(weight=TensorScheme(dtype="int4"), act=TensorScheme(dtype="int4", granularity="per_token", dynamic=True))
W4A8_DYNAMIC = QuantScheme(weight=TensorScheme(dtype="int4"), act=TensorScheme(granularity="per_token", dynamic=True))
W4A16 = QuantScheme(weight=TensorScheme(dtype="int4"))
W4A16_G16 = QuantScheme(weight=TensorScheme(dtype="int4", granularity="per_group", group_size=16, symmetric=False))
ALL = {"W8A8_DYNAMIC": W8A8_DYNAMIC, "W8A8": W8A8, "W8A16": W8A16, "W8A16_G32": W8A16_G32,
       "W4A4_DYNAMIC": W4A4_DYNAMIC, "W4A8_DYNAMIC": W4A8_DYNAMIC, "W4A16": W4A16, "W4A16_G16": W4A16_G16}
Q_PROJ = "model.layers.0.self_attn.q_proj"


def export(program: Program, tmp_path: Path, **options) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    MindieBackend(**options).export(program, out)
    return out


def written(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors = {}
    for file in sorted(out.glob("quant_model_weights*.safetensors")):
        tensors.update(load_file(file))
    return description, tensors


def export_llama(tmp_path: Path, scheme: QuantScheme, **kwargs) -> tuple[Program, dict, dict[str, torch.Tensor]]:
    program = program_of(quantized_model("llama", everything_but_head(scheme), **kwargs), tmp_path)
    description, tensors = written(export(program, tmp_path))
    return program, description, tensors


def shapes(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {n[len(prefix) + 1:]: (t.dtype, tuple(t.shape)) for n, t in tensors.items() if n.startswith(prefix + ".")}


# --- per-scheme tensors ---------------------------------------------------------------------------------


def test_backend_is_registered_as_mindie():
    assert backend_class("mindie") is MindieBackend


def test_w8a8_dynamic_linear_has_int8_weight_and_float32_per_channel_scale_and_zero_offset(tmp_path):
    program, description, tensors = export_llama(tmp_path, W8A8_DYNAMIC)
    assert shapes(tensors, Q_PROJ) == {
        "weight": (torch.int8, (64, 64)), "weight_scale": (torch.float32, (64, 1)), "weight_offset": (torch.float32, (64, 1))}
    assert torch.all(tensors[f"{Q_PROJ}.weight_offset"] == 0)
    assert torch.equal(tensors[f"{Q_PROJ}.weight"], program.model.get_submodule(Q_PROJ).weight)
    assert {description[f"{Q_PROJ}.{s}"] for s in ("weight", "weight_scale", "weight_offset")} == {"W8A8_DYNAMIC"}


def test_w8a8_static_linear_has_input_qparams_deq_scale_and_quant_bias_but_no_weight_scale(tmp_path):
    _, description, tensors = export_llama(tmp_path, W8A8)
    assert shapes(tensors, Q_PROJ) == {
        "weight": (torch.int8, (64, 64)), "input_scale": (torch.float32, (1,)), "input_offset": (torch.float32, (1,)),
        "deq_scale": (torch.int64, (64,)), "quant_bias": (torch.int32, (64,))}
    assert description[f"{Q_PROJ}.deq_scale"] == "W8A8"
    offset = tensors[f"{Q_PROJ}.input_offset"]
    assert offset == torch.round(offset) and -128 <= offset <= 127


def test_w8a8_static_deq_scale_is_the_float32_bit_pattern_in_int64_for_fp32_models(tmp_path):
    program, _, tensors = export_llama(tmp_path, W8A8)
    q_proj = program.model.get_submodule(Q_PROJ)
    expected = (q_proj.input_scale * q_proj.weight_scale.reshape(-1)).float()
    stored = tensors[f"{Q_PROJ}.deq_scale"]
    assert torch.equal(stored, expected.view(torch.int32).to(torch.int64))
    assert torch.equal(deq_scale_float(stored), expected)


def test_w8a8_static_deq_scale_is_float32_for_bf16_models(tmp_path):
    program, _, tensors = export_llama(tmp_path, W8A8, dtype=torch.bfloat16)
    q_proj = program.model.get_submodule(Q_PROJ)
    assert tensors[f"{Q_PROJ}.deq_scale"].dtype == torch.float32
    assert torch.equal(tensors[f"{Q_PROJ}.deq_scale"], (q_proj.input_scale * q_proj.weight_scale.reshape(-1)).float())
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_w8a8_static_deq_scale_follows_the_checkpoint_dtype_when_calibrated_in_float32(tmp_path):
    model = quantized_model("llama", everything_but_head(W8A8))
    model.config.dtype = torch.bfloat16  # a bfloat16 checkpoint loaded in float32
    program = program_of(model, tmp_path)
    out = export(program, tmp_path)
    assert written(out)[1][f"{Q_PROJ}.deq_scale"].dtype == torch.float32
    MindieBackend().verify(program, out)


def test_w8a8_static_quant_bias_folds_the_bias_and_the_input_offset(tmp_path):
    program = program_of(quantized_model("qwen2", everything_but_head(W8A8)), tmp_path)
    description, tensors = written(export(program, tmp_path))
    q_proj = program.model.get_submodule(Q_PROJ)
    deq = q_proj.input_scale * q_proj.weight_scale.reshape(-1)
    expected = torch.round(q_proj.bias / deq - q_proj.input_offset * q_proj.weight.float().sum(dim=1)).to(torch.int32)
    assert torch.equal(tensors[f"{Q_PROJ}.quant_bias"], expected)
    assert tensors[f"{Q_PROJ}.bias"].dtype == torch.float32 and torch.equal(tensors[f"{Q_PROJ}.bias"], q_proj.bias)
    assert description[f"{Q_PROJ}.bias"] == "FLOAT"


def test_w8a8_static_without_bias_writes_no_bias_and_quant_bias_carries_only_the_offset(tmp_path):
    program, _, tensors = export_llama(tmp_path, W8A8)
    q_proj = program.model.get_submodule(Q_PROJ)
    assert f"{Q_PROJ}.bias" not in tensors
    expected = torch.round(-q_proj.input_offset * q_proj.weight.float().sum(dim=1)).to(torch.int32)
    assert torch.equal(tensors[f"{Q_PROJ}.quant_bias"], expected)


def test_w8a16_per_channel_writes_weight_scale_and_offset_per_row(tmp_path):
    _, description, tensors = export_llama(tmp_path, W8A16)
    assert shapes(tensors, Q_PROJ) == {
        "weight": (torch.int8, (64, 64)), "weight_scale": (torch.float32, (64, 1)), "weight_offset": (torch.float32, (64, 1))}
    assert description["group_size"] == 0 and description["model_quant_type"] == "W8A16"


def test_w8a16_per_group_writes_a_scale_per_group_and_the_group_size(tmp_path):
    program, description, tensors = export_llama(tmp_path, W8A16_G32)
    assert shapes(tensors, Q_PROJ)["weight_scale"] == (torch.float32, (64, 2))
    assert torch.equal(tensors[f"{Q_PROJ}.weight_offset"], program.model.get_submodule(Q_PROJ).weight_offset)
    assert description["group_size"] == 32


def test_w4a4_dynamic_weight_is_int8_holding_unpacked_int4(tmp_path):
    program, description, tensors = export_llama(tmp_path, W4A4_DYNAMIC)
    weight = tensors[f"{Q_PROJ}.weight"]
    assert weight.dtype == torch.int8 and weight.shape == (64, 64)
    assert weight.min() >= -8 and weight.max() <= 7
    assert torch.equal(weight, program.model.get_submodule(Q_PROJ).weight)
    assert description["model_quant_type"] == "W4A4_DYNAMIC"


def test_w4a8_dynamic_packs_two_output_rows_per_byte_and_writes_scale_bias(tmp_path):
    program, description, tensors = export_llama(tmp_path, W4A8_DYNAMIC)
    q_proj = program.model.get_submodule(Q_PROJ)
    packed = tensors[f"{Q_PROJ}.weight"]
    assert packed.dtype == torch.int8 and packed.shape == (32, 64)
    assert torch.equal(unpack_int4(packed.T.contiguous()).T, q_proj.weight)
    deq = q_proj.weight.float() * q_proj.weight_scale
    assert torch.allclose(tensors[f"{Q_PROJ}.scale_bias"], 8 * deq.sum(dim=1, keepdim=True))
    o_proj = "model.layers.0.self_attn.o_proj"
    deq_o = program.model.get_submodule(o_proj).weight.float() * program.model.get_submodule(o_proj).weight_scale
    assert torch.allclose(tensors[f"{o_proj}.scale_bias"], 8 * deq_o.reshape(64, 16, 4).sum(dim=-1))
    assert description["model_quant_type"] == "FLOAT"  # W4A8_DYNAMIC never becomes the model type


# --- the description and the float tensors ----------------------------------------------------------------


def test_description_maps_every_tensor_and_nothing_else(tmp_path):
    _, description, tensors = export_llama(tmp_path, W8A8)
    global_keys = {"version", "model_quant_type", "metadata", "group_size", "optional"}
    assert set(description) - global_keys == set(tensors)
    assert description["version"] == "1.0.0" and description["optional"] == {} and description["metadata"] == {}


def test_model_quant_type_is_the_strongest_type_present(tmp_path):
    by_layer = {"model.layers.0.self_attn": W8A8_DYNAMIC, "model.layers.0.mlp": W8A16, "model.layers.1.self_attn": W8A8}
    scheme_for = lambda name: next((s for p, s in by_layer.items() if name.startswith(p + ".")), None)  # noqa: E731
    description, _ = written(export(program_of(quantized_model("llama", scheme_for), tmp_path), tmp_path))
    assert description["model_quant_type"] == "W8A8"
    assert description["model.layers.1.mlp.down_proj.weight"] == "FLOAT"
    assert description["model.layers.0.mlp.down_proj.weight"] == "W8A16"


def test_metadata_comes_from_the_program(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8_DYNAMIC)), tmp_path,
                         ascend_metadata={"quarot": {"heads_rotation": True}})
    description, _ = written(export(program, tmp_path))
    assert description["metadata"] == {"quarot": {"heads_rotation": True}}


def test_float_tensors_keep_their_names_dtypes_and_values(tmp_path):
    program, description, tensors = export_llama(tmp_path, W8A8_DYNAMIC, dtype=torch.bfloat16)
    lowered = {n for n, m in program.model.named_modules() if isinstance(m, QuantizedLinear)}
    originals = {n: t for n, t in program.model.state_dict().items() if n.rpartition(".")[0] not in lowered}
    assert {n for n, t in description.items() if t == "FLOAT"} == set(originals)
    for name, original in originals.items():
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], original)


def test_persistent_buffers_such_as_router_score_biases_are_written_and_read_back(tmp_path):
    model = quantized_model("glm4_moe", everything_but_head(W8A8_DYNAMIC))
    bias = model.get_submodule("model.layers.1.mlp.gate").e_score_correction_bias
    bias.copy_(torch.randn(bias.shape))
    program = program_of(model, tmp_path)
    out = export(program, tmp_path)
    description, tensors = written(out)
    assert description["model.layers.1.mlp.gate.e_score_correction_bias"] == "FLOAT"
    reread = load_ascend_model(out).get_submodule("model.layers.1.mlp.gate").e_score_correction_bias
    assert torch.equal(reread, bias)


def test_tied_embeddings_are_written_under_both_names(tmp_path):
    program, description, tensors = export_llama(tmp_path, W8A8_DYNAMIC, tie_word_embeddings=True)
    assert description["lm_head.weight"] == description["model.embed_tokens.weight"] == "FLOAT"
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_model_files_are_written_next_to_the_weights(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8_DYNAMIC)), tmp_path)
    out = export(program, tmp_path)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_one_weights_file_without_index_by_default(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8_DYNAMIC)), tmp_path)
    out = export(program, tmp_path)
    assert sorted(p.name for p in out.glob("quant_model_weights*")) == ["quant_model_weights.safetensors"]


def test_small_max_shard_size_writes_numbered_shards_and_an_index(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8_DYNAMIC)), tmp_path)
    out = export(program, tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in out.glob("quant_model_weights-*.safetensors"))
    count = len(shards)
    assert count > 1 and shards == [f"quant_model_weights-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    _, tensors = written(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, file in index["weight_map"].items():
        with safe_open(out / file, "pt") as f:
            assert name in f.keys()
    assert set(index["weight_map"]) == set(tensors)


def test_max_shard_size_rejects_what_is_not_a_size():
    with pytest.raises(ValueError, match="not a size"):
        MindieBackend(max_shard_size="five gigs")


def test_asymmetric_dynamic_activations_cannot_be_written(tmp_path):
    scheme = QuantScheme(weight=TensorScheme(), act=TensorScheme(granularity="per_token", dynamic=True, symmetric=False))
    program = program_of(quantized_model("llama", everything_but_head(scheme)), tmp_path)
    with pytest.raises(ExportError, match="per_token and symmetric"):
        export(program, tmp_path)


def test_w4a16_per_channel_packs_two_input_columns_per_byte(tmp_path):
    program, description, tensors = export_llama(tmp_path, W4A16)
    q_proj = program.model.get_submodule(Q_PROJ)
    packed = tensors[f"{Q_PROJ}.weight"]
    assert packed.dtype == torch.int8 and packed.shape == (64, 32)
    assert torch.equal(unpack_int4(packed), q_proj.weight)
    assert shapes(tensors, Q_PROJ)["weight_scale"] == (torch.float32, (64, 1))
    assert description[f"{Q_PROJ}.weight"] == "W4A16" and description["model_quant_type"] == "W4A16"


def test_w4a16_per_group_packs_two_output_rows_per_byte_and_writes_the_group_size(tmp_path):
    program, description, tensors = export_llama(tmp_path, W4A16_G16)
    q_proj = program.model.get_submodule(Q_PROJ)
    packed = tensors[f"{Q_PROJ}.weight"]
    assert packed.dtype == torch.int8 and packed.shape == (32, 64)
    assert torch.equal(unpack_int4(packed.T.contiguous()).T, q_proj.weight)
    assert shapes(tensors, Q_PROJ)["weight_offset"] == (torch.float32, (64, 4))
    assert description["group_size"] == 16


# --- MoE ---------------------------------------------------------------------------------------------------


def test_moe_experts_are_written_per_expert_under_checkpoint_names(tmp_path):
    program = program_of(quantized_model("qwen3_moe", everything_but_head(W8A8)), tmp_path)
    description, tensors = written(export(program, tmp_path))
    experts = program.model.get_submodule("model.layers.0.mlp.experts")
    for e in range(4):
        for proj, rows in (("gate_proj", slice(0, 32)), ("up_proj", slice(32, 64))):
            prefix = f"model.layers.0.mlp.experts.{e}.{proj}"
            assert torch.equal(tensors[f"{prefix}.weight"], experts.gate_up_proj[e, rows])
            assert torch.equal(tensors[f"{prefix}.input_scale"], experts.gate_up_input_scale[e:e + 1])
            assert description[f"{prefix}.weight"] == "W8A8"
        down = f"model.layers.0.mlp.experts.{e}.down_proj"
        assert shapes(tensors, down)["weight"] == (torch.int8, (64, 32))
        assert torch.equal(tensors[f"{down}.input_offset"], experts.down_input_offset[e:e + 1])
    assert not any("gate_up_proj" in name for name in tensors)


def test_float_moe_experts_are_split_per_expert_too(tmp_path):
    model = tiny_causal_lm("qwen3_moe")
    original = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    model.config.architectures = [type(model).__name__]
    lower(model, lambda name: W8A8_DYNAMIC if name.startswith("model.layers.0.") else None)
    description, tensors = written(export(program_of(model, tmp_path), tmp_path))
    assert torch.equal(tensors["model.layers.1.mlp.experts.2.up_proj.weight"], original[2, 32:])
    assert description["model.layers.1.mlp.experts.2.up_proj.weight"] == "FLOAT"


# --- the reader --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["W8A8_DYNAMIC", "W8A16", "W8A16_G32", "W4A4_DYNAMIC", "W4A8_DYNAMIC", "W4A16", "W4A16_G16"])
def test_reader_linear_reproduces_the_lowered_dynamic_or_weight_only_linear(tmp_path, label):
    program = program_of(quantized_model("qwen2", everything_but_head(ALL[label])), tmp_path)
    model = load_ascend_model(export(program, tmp_path))
    x = torch.randn(3, 5, 64)
    for name in (Q_PROJ, "model.layers.1.mlp.down_proj"):
        ascend, lowered = model.get_submodule(name), program.model.get_submodule(name)
        assert isinstance(ascend, AscendLinear)
        x_in = torch.randn(3, 5, ascend.in_features)
        expected = lowered(x_in if name != Q_PROJ else x)
        actual = ascend(x_in if name != Q_PROJ else x)
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_reader_static_linear_differs_only_by_the_quant_bias_rounding(tmp_path):
    program = program_of(quantized_model("qwen2", everything_but_head(W8A8)), tmp_path)
    model = load_ascend_model(export(program, tmp_path))
    ascend, lowered = model.get_submodule(Q_PROJ), program.model.get_submodule(Q_PROJ)
    x = torch.randn(4, 7, 64) * lowered.input_scale * 40
    deq = lowered.input_scale * lowered.weight_scale.reshape(-1)
    error = (ascend(x) - lowered(x)).abs()
    assert torch.all(error <= 0.5 * deq + 1e-5 * lowered(x).abs().max())


def test_reader_static_linear_sums_in_int32_what_float64_sums():
    """The reader's static W8A8 sums the integer products in int32 on the CPU; exact, as the float64 sum is."""
    torch.manual_seed(6)
    weight = torch.randint(-128, 128, (48, 1536), dtype=torch.int8)
    tensors = {"weight": weight, "input_scale": torch.tensor([0.02]), "input_offset": torch.tensor([-3.0]),
               "deq_scale": torch.rand(48) * 1e-4, "quant_bias": torch.randint(-5000, 5000, (48,))}
    ascend = AscendLinear("W8A8", tensors)
    x = torch.randn(2, 9, 1536) * 2
    x_q = torch.clamp(torch.round(x / 0.02 - 3.0), -128, 127)
    expected = (x_q.double() @ weight.double().T + tensors["quant_bias"].double()) * ascend.deq_scale
    assert torch.equal(ascend(x), expected.float())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("label", ["W8A8_DYNAMIC", "W8A16_G32", "W4A4_DYNAMIC"])
def test_reader_whole_model_logits_match_the_lowered_model(tmp_path, family, label):
    program = program_of(quantized_model(family, everything_but_head(ALL[label]), tie_word_embeddings=True), tmp_path)
    model = load_ascend_model(export(program, tmp_path))
    with torch.no_grad():
        expected, actual = program.model(token_ids()).logits, model(token_ids()).logits
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not model.training


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe"])
def test_reader_static_model_differs_from_the_lowered_model_far_less_than_the_quantization_error(tmp_path, family):
    # The runtime rounds bias / deq_scale into quant_bias; a rounding step of one activation downstream follows.
    float_model = tiny_causal_lm(family)
    program = program_of(quantized_model(family, everything_but_head(W8A8)), tmp_path)
    model = load_ascend_model(export(program, tmp_path))
    with torch.no_grad():
        reference, expected, actual = (m(token_ids()).logits for m in (float_model, program.model, model))
    assert (actual - expected).abs().max() <= 0.2 * (expected - reference).abs().max()


def test_reader_keeps_the_float_dtype_of_the_files(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8_DYNAMIC), dtype=torch.bfloat16), tmp_path)
    model = load_ascend_model(export(program, tmp_path))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.norm.weight, program.model.model.norm.weight)


@pytest.mark.parametrize(("family", "label"), [("qwen3_moe", "W8A8_DYNAMIC"), ("qwen3_moe", "W4A4_DYNAMIC"), ("glm4_moe", "W4A8_DYNAMIC")])
def test_reader_rebuilds_moe_experts_from_per_expert_tensors(tmp_path, family, label):
    program = program_of(quantized_model(family, everything_but_head(ALL[label])), tmp_path)
    model = load_ascend_model(export(program, tmp_path))
    assert any(isinstance(m, AscendExperts) for m in model.modules())
    with torch.no_grad():
        expected, actual = program.model(token_ids()).logits, model(token_ids()).logits
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


# --- verify ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(ALL))
def test_verify_accepts_what_write_wrote(tmp_path, label):
    program = program_of(quantized_model("qwen2", everything_but_head(ALL[label])), tmp_path)
    MindieBackend().verify(program, export(program, tmp_path))


def test_verify_accepts_sharded_moe_output(tmp_path):
    program = program_of(quantized_model("qwen3_moe", everything_but_head(W8A8)), tmp_path)
    MindieBackend().verify(program, export(program, tmp_path, max_shard_size="30KB"))


def test_verify_names_a_tensor_missing_from_the_weights(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8)), tmp_path)
    out = export(program, tmp_path)
    tensors = load_file(out / "quant_model_weights.safetensors")
    del tensors[f"{Q_PROJ}.deq_scale"]
    save_file(tensors, out / "quant_model_weights.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=f"{Q_PROJ}.deq_scale"):
        MindieBackend().verify(program, out)


def test_verify_names_a_tensor_missing_from_the_description(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8_DYNAMIC)), tmp_path)
    out = export(program, tmp_path)
    description = json.loads((out / "quant_model_description.json").read_text())
    del description["model.norm.weight"]
    (out / "quant_model_description.json").write_text(json.dumps(description))
    with pytest.raises(ExportError, match="model.norm.weight"):
        MindieBackend().verify(program, out)


def test_verify_rejects_a_wrong_dtype(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8)), tmp_path)
    out = export(program, tmp_path)
    tensors = load_file(out / "quant_model_weights.safetensors")
    tensors[f"{Q_PROJ}.quant_bias"] = tensors[f"{Q_PROJ}.quant_bias"].float()
    save_file(tensors, out / "quant_model_weights.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="quant_bias"):
        MindieBackend().verify(program, out)


def test_verify_rejects_changed_weights(tmp_path):
    program = program_of(quantized_model("llama", everything_but_head(W8A8_DYNAMIC)), tmp_path)
    out = export(program, tmp_path)
    tensors = load_file(out / "quant_model_weights.safetensors")
    tensors[f"{Q_PROJ}.weight_scale"] = tensors[f"{Q_PROJ}.weight_scale"] * 2
    save_file(tensors, out / "quant_model_weights.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=f"{Q_PROJ}.weight_scale"):
        MindieBackend().verify(program, out)
