"""The rotate pass: QuaRot rotations keep every family's function and spread activation outliers."""

import json

import pytest
import torch
from programs import calibration_ids, logits, relative, run_pipeline
from tiny_models import FAMILIES, tiny_causal_lm
from torch import nn

from slimc.backends.mindie import MindieBackend
from slimc.backends.mindie_reader import load_ascend_model
from slimc.errors import ConfigError, ExportError, ModelLoadError, PassError
from slimc.numerics.folding import rotated_inputs, rotated_outputs
from slimc.numerics.hadamard import OnlineHadamard, random_orthogonal, random_rotation
from slimc.numerics.quant import dynamic_fake_quantize
from slimc.passes.rotate import check_rotatable_norm, rotate_inputs, rotate_outputs
from slimc.schemes import TensorScheme

# Sizes that are not powers of two, as in real models: 48 = 12·4 and 96 = 12·8 need a Paley Hadamard
# of order 12; heads of 12.
ODD_SIZES = {"hidden_size": 48, "intermediate_size": 96, "moe_intermediate_size": 24, "head_dim": 12}
ROTATE = [{"pass": "norm_fusion"}, {"pass": "rotate", "seed": 3}]
W4A4 = {"weight": {"dtype": "int4", "granularity": "per_channel"},
        "act": {"dtype": "int4", "granularity": "per_token", "dynamic": True}}
INT4_PER_TOKEN = TensorScheme(dtype="int4", granularity="per_token", dynamic=True)
QUANTIZE_W4A4 = [{"pass": "fake_quant", "rules": [{"scheme": "w4a4", "exclude": ["*mlp.gate"]}]},
                 {"pass": "calibrate"}, {"pass": "lower"}]


def float_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_keeps_the_logits_of_every_family(family, tied):
    model = tiny_causal_lm(family, tie_word_embeddings=tied, sizes=ODD_SIZES)
    ids = calibration_ids(model.config.vocab_size, seed=9)[0]
    expected = float_logits(model, ids)
    program, _ = run_pipeline(model, ROTATE)
    assert relative(logits(program, ids), expected) < 1e-5


def test_rotation_changes_the_weights_it_claims_to():
    model = tiny_causal_lm("llama", sizes=ODD_SIZES)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    program, _ = run_pipeline(model, ROTATE)
    assert relative(model.model.layers[0].self_attn.q_proj.weight.detach(), q_before) > 0.5


def test_run_summary_names_the_hadamard_construction_of_each_size():
    program, report = run_pipeline(tiny_causal_lm("llama", sizes=ODD_SIZES), ROTATE)
    notes = "\n".join(report.notes)
    assert "residual stream (48) rotated by a randomized Hadamard 12⊗4 (Paley I, q=11), seed 3" in notes
    assert "online rotation before down projections of width 96: Hadamard 12⊗8 (Paley I, q=11)" in notes
    assert program.rotations.online["model.layers.0.mlp.down_proj"] == "Hadamard 12⊗8 (Paley I, q=11)"


def test_a_size_without_hadamard_matrix_falls_back_and_says_so():
    program, report = run_pipeline(tiny_causal_lm("llama", sizes={"intermediate_size": 172}), ROTATE)
    assert "block-diagonal Hadamard, 43 blocks of 4" in "\n".join(report.notes)


def test_down_projections_get_an_online_hadamard_node_and_experts_a_down_transform():
    program, _ = run_pipeline(tiny_causal_lm("glm4_moe", sizes=ODD_SIZES), ROTATE)
    dense, moe = program.blocks
    down = next(n for n in dense.graph_module.graph.nodes if n.op == "call_module" and n.target == "mlp.down_proj")
    assert isinstance(dense.graph_module.get_submodule(down.args[0].target), OnlineHadamard)
    assert isinstance(moe.leaf("mlp.experts").down_transform, OnlineHadamard)
    shared = moe.input_rotation("mlp.shared_experts.down_proj")
    assert isinstance(shared, OnlineHadamard) and shared.order == 24


def test_tied_embeddings_are_untied_into_rotated_embedding_and_rotated_scaled_head():
    model = tiny_causal_lm("qwen2", tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    final_norm = model.model.norm.weight.detach().clone()
    run_pipeline(model, ROTATE)
    r = torch.linalg.lstsq(embedding.double(), model.model.embed_tokens.weight.double()).solution
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(model.lm_head.weight.double(), (embedding * final_norm).double() @ r, atol=1e-5)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.model.norm.weight, torch.ones_like(final_norm))


def test_rotate_needs_norm_fusion_earlier():
    with pytest.raises(ConfigError, match="pass 'rotate' needs 'norm_fusion' earlier"):
        run_pipeline(tiny_causal_lm("llama"), [{"pass": "rotate"}])


def test_rotate_after_smoothing_is_refused():
    pipeline = [{"pass": "norm_fusion"}, {"pass": "smooth"}, {"pass": "rotate"}]
    with pytest.raises(ConfigError, match="rotate must come before smooth"):
        run_pipeline(tiny_causal_lm("llama"), pipeline)


def test_a_layer_norm_does_not_commute_with_rotation():
    rotation = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    with pytest.raises(PassError, match="does not commute with a rotation"):
        check_rotatable_norm(nn.LayerNorm(16, elementwise_affine=False), "norm", rotation)


def test_a_norm_that_kept_its_scale_is_refused():
    norm = nn.RMSNorm(16)
    with torch.no_grad():
        norm.weight.mul_(2.0)
    with pytest.raises(PassError, match="still has a scale"):
        check_rotatable_norm(norm, "norm", torch.eye(16, dtype=torch.float64))


def test_rotation_shrinks_int4_activation_error_on_a_residual_stream_with_an_outlier_channel():
    def q_proj_input_error(rotate: bool) -> float:
        model = tiny_causal_lm("llama", sizes=ODD_SIZES)
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 5] *= 40.0  # one residual channel carries outliers
        program, _ = run_pipeline(model, ROTATE if rotate else [{"pass": "norm_fusion"}])
        captured = []
        hook = program.blocks[1].leaf("self_attn.q_proj").register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        logits(program, calibration_ids(model.config.vocab_size, seed=9)[0])
        hook.remove()
        x = captured[0]
        return relative(dynamic_fake_quantize(x, INT4_PER_TOKEN), x)

    assert q_proj_input_error(rotate=True) < 0.5 * q_proj_input_error(rotate=False)


def export_rotated_w4a4(tmp_path, model):
    model.config.save_pretrained(tmp_path / "model")
    program, _ = run_pipeline(model, ROTATE + QUANTIZE_W4A4, schemes={"w4a4": W4A4})
    program.source = type(program.source)(path=tmp_path / "model", gguf_file=None, config=model.config,
                                          architecture=program.source.architecture)
    out = tmp_path / "out"
    out.mkdir()
    MindieBackend().export(program, out)
    return program, out


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_rotated_w4a4_export_is_read_back_with_its_online_rotations(tmp_path, family):
    model = tiny_causal_lm(family, tie_word_embeddings=True, sizes=ODD_SIZES)
    program, out = export_rotated_w4a4(tmp_path, model)
    MindieBackend().verify(program, out)
    description = json.loads((out / "quant_model_description.json").read_text())
    layers = description["metadata"]["quarot"]["kronecker_rotation"]["layers"]
    expected_layer = "model.layers.1.mlp.experts.0.down_proj" if family == "qwen3_moe" else "model.layers.1.mlp.down_proj"
    assert expected_layer in layers
    assert f"{expected_layer}.kronecker_rotation_m" not in description
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = calibration_ids(model.config.vocab_size, seed=9)[0]
    read_back = float_logits(load_ascend_model(out), ids)
    assert relative(read_back, logits(program, ids)) < 1e-5


def test_an_export_whose_metadata_lost_the_online_rotations_fails_verification_and_loading(tmp_path):
    program, out = export_rotated_w4a4(tmp_path, tiny_causal_lm("llama", sizes=ODD_SIZES))
    path = out / "quant_model_description.json"
    description = json.loads(path.read_text())
    description["metadata"] = {}
    path.write_text(json.dumps(description))
    with pytest.raises(ExportError, match="does not list the online rotations"):
        MindieBackend().verify(program, out)
    with pytest.raises(ModelLoadError, match="metadata.quarot lists online rotations of 0 layers"):
        load_ascend_model(out)


@pytest.mark.parametrize("n", [28, 576, 3584])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factored_weight_rotation_matches_the_dense_matrix_to_one_rounding(n, dtype):
    """Weights rotated through the Kronecker factors equal the dense float64 product rounded to the
    weight's dtype, except where the two float64 results straddle a rounding boundary: one ulp at most."""
    rotation, _ = random_rotation(n, seed=11)
    dense = random_orthogonal(n, seed=11)[0]
    weight = torch.randn(64, n, generator=torch.Generator().manual_seed(3)).to(dtype)
    inputs, outputs = weight.clone(), weight.T.contiguous()
    rotate_inputs(inputs, rotation)
    rotate_outputs(outputs, None, rotation)
    expected = (weight.double() @ dense).to(dtype)
    ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((inputs.float() - expected.float()).abs() <= ulp).all()
    assert ((outputs.T.float() - expected.float()).abs() <= ulp).all()
    assert (inputs != expected).float().mean() < 0.01  # nearly all bit-identical
    rotated_bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype)
    reference_bias = (rotated_bias.double() @ dense).to(dtype)
    rotate_outputs(torch.zeros(n, 1, dtype=dtype), rotated_bias, rotation)
    assert ((rotated_bias.float() - reference_bias.float()).abs()
            <= torch.finfo(dtype).eps * reference_bias.float().abs().clamp_min(torch.finfo(dtype).tiny)).all()


def test_a_rotation_of_fewer_channels_than_the_layer_turns_each_group_of_them():
    """R2's fold: a rotation R of order head_dim on v_proj's rows (and bias) and o_proj's columns is I ⊗ R."""
    rotation = random_rotation(4, seed=2)[0]
    block_diagonal = torch.block_diag(*[rotation.matrix()] * 3)
    weight, bias = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    folded, folded_bias = rotated_outputs(weight, bias, rotation)
    assert torch.allclose(folded, block_diagonal.T @ weight)
    assert torch.allclose(folded_bias, bias @ block_diagonal)
    assert torch.allclose(rotated_inputs(weight.T, rotation), weight.T @ block_diagonal)


SMOOTH_DOWN = [*ROTATE, {"pass": "smooth", "subgraphs": ["up-down"], "alpha": 0.5}]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_smoothing_after_rotate_migrates_up_to_down_across_the_online_rotation(family):
    """With alpha 0.5 each channel of the down projection's input before its online rotation ends with the same
    maximum as the down weight's column taken back through the rotation (SmoothQuant's balance), and the logits
    stay the float model's."""
    model = tiny_causal_lm(family, sizes=ODD_SIZES)
    ids = calibration_ids(model.config.vocab_size, seed=9)[0]
    expected = float_logits(model, ids)
    program, _ = run_pipeline(model, SMOOTH_DOWN)
    assert relative(logits(program, ids), expected) < 1e-5
    block = program.blocks[0]
    rotation = block.graph_module.get_submodule(block.rotation_target("mlp.down_proj"))
    seen = []
    handle = rotation.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().abs().amax((0, 1))))
    with program.executing_graphs(), torch.no_grad():
        for batch in calibration_ids(model.config.vocab_size):  # the batches run_pipeline calibrates on
            program.model(input_ids=batch, use_cache=False)
    handle.remove()
    activation_max = torch.stack(seen).amax(0)
    down = block.leaf("mlp.down_proj").weight.detach().double()
    column_max = (down @ rotation.matrix().T).abs().amax(0).float()
    assert torch.allclose(activation_max, column_max, rtol=1e-4)
    unsmoothed, _ = run_pipeline(tiny_causal_lm(family, sizes=ODD_SIZES), ROTATE)
    assert relative(block.leaf("mlp.up_proj").weight.detach(), unsmoothed.blocks[0].leaf("mlp.up_proj").weight.detach()) > 0.1
