"""Online rotations in vllm exports: compressed-tensors input transforms that compressed-tensors reads and applies,
on the transformers model, to give the program's logits; rotations vLLM cannot apply are refused."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from compile_settings import SMALL_CALIBRATION, VLLM_ONLY
from compressed_tensors.transform import (
    TransformArgs,
    TransformConfig,
    TransformScheme,
    apply_transform_config,
)
from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix, random_hadamard_matrix
from programs import CHECK_IDS, W8A8_DYNAMIC, relative, run_pipeline, simulated_logits, simulating_in_float
from safetensors.torch import load_file, save_file
from tiny_models import tiny_causal_lm
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM

from slimc.backends.checkpoint import checkpoint_linears
from slimc.backends.vllm import VllmBackend
from slimc.backends.vllm_transforms import Transform, expressible_rotations, transform_of
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.errors import ExportError
from slimc.ir import Program
from slimc.ir.calls import perturbed
from slimc.numerics.hadamard import OnlineHadamard
from slimc.pipeline import PERTURBATION_SAMPLES, SENSITIVITY_FACTOR

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W4A8 = {"weight": {"dtype": "int4", "granularity": "per_channel"},
        "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}}
DOWN_PROJ = r"re:^model\.layers\.\d+\.mlp\.down_proj$"
# The shipped QuaRot configs (which export mindie) compiled for vllm, on intermediate sizes that give each kind of
# slimc rotation: a Sylvester one, a Paley-based one (12 ⊗ 8), a block-diagonal one (no H_184: 23 blocks of 8).
QUAROT = {
    "llama-sylvester": ("llama", "llm/w4a8_quarot_gptq.yaml", 128, Transform("hadamard", None, 128)),
    "qwen2-paley": ("qwen2", "llm/w4a4_quarot_gptq.yaml", 96, Transform("random-hadamard", None, 96)),
    "qwen3-blocks": ("qwen3", "llm/w4a8_quarot_gptq.yaml", 184, Transform("hadamard", 8, 8)),
    "llama-w8a8-sylvester": ("llama", "llm/w8a8_dynamic_quarot.yaml", 128, Transform("hadamard", None, 128)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class Rotated:
    program: Program
    out: Path
    expected: Transform


def compile_rotated(tmp_path: Path, family: str, config_name: str, intermediate: int, dtype: torch.dtype = torch.float32):
    """A tiny model saved in `dtype`, compiled with a shipped config and exported for vllm."""
    model_dir = tmp_path / "model"
    tiny_causal_lm(family, dtype=dtype, sizes={"intermediate_size": intermediate}).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config = load_config(resolve_config_path(config_name), [*SMALL_CALIBRATION, *VLLM_ONLY])
    with pytest.warns(UserWarning, match="below the recommended"):
        return compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")


@pytest.fixture(scope="module", params=[(case, dtype) for case in QUAROT for dtype in DTYPES], ids="-".join)
def rotated(request, tmp_path_factory) -> Rotated:
    case, dtype = request.param
    family, config_name, intermediate, expected = QUAROT[case]
    tmp_path = tmp_path_factory.mktemp(f"{case}-{dtype}")
    program = compile_rotated(tmp_path, family, config_name, intermediate, DTYPES[dtype]).program
    assert program.model.dtype == DTYPES[dtype]
    return Rotated(program, tmp_path / "out" / "vllm", expected)


def read_transform_config(out: Path) -> TransformConfig:
    """config.json's transform_config, parsed by compressed-tensors' own pydantic model."""
    raw = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]
    return TransformConfig.model_validate(raw)


def load_with_transforms(out: Path) -> torch.nn.Module:
    """The checkpoint in transformers with compressed-tensors' transforms applied and their stored matrices loaded
    (transformers itself reads no `transform_config`; llm-compressor and vLLM do)."""
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    config = read_transform_config(out)
    apply_transform_config(model, config)
    suffixes = tuple(f".{group}_input.weight" for group in config.config_groups)
    stored = {name: t for name, t in load_file(out / "model.safetensors").items() if name.endswith(suffixes)}
    assert stored and not model.load_state_dict(stored, strict=False).unexpected_keys
    return model


@torch.no_grad()
def logit_sensitivity(program: Program, ids: torch.Tensor) -> float:
    """How far the program's logits move (relative) when the first block's hidden states move by one epsilon of the
    model's dtype (the equivalence check's perturbation, largest of its samples): the rounding noise that two
    correct implementations of the same arithmetic differ by, as the model's quantizers amplify it. With float
    matmuls, the arithmetic of compressed-tensors' simulation that it is compared with."""
    reference, first, changes = simulated_logits(program, ids), program.blocks[0], []
    with simulating_in_float(program), program.executing_graphs():
        layer = first.container[first.index]
        for seed in range(PERTURBATION_SAMPLES):
            hook = layer.register_forward_pre_hook(lambda _, args, kwargs, s=seed: perturbed((args, kwargs), s),
                                                   with_kwargs=True)
            try:
                changes.append(relative(program.model(input_ids=ids, use_cache=False).logits, reference))
            finally:
                hook.remove()
    return max(changes)


def test_transform_config_reads_back_as_one_scheme_before_the_down_projections(rotated):
    expected = rotated.expected
    assert read_transform_config(rotated.out) == TransformConfig(config_groups={expected.group: TransformScheme(
        type=expected.type, head_dim=expected.head_dim, apply=[TransformArgs(targets=[DOWN_PROJ], location="input")])})
    written = load_file(rotated.out / "model.safetensors")
    stored = [name for name in written if name.endswith("_input.weight")]
    assert stored == [f"model.layers.0.mlp.down_proj.{expected.group}_input.weight"]  # one matrix, shared by all
    matrix = written[stored[0]]
    assert matrix.shape == (expected.size, expected.size) and matrix.dtype == rotated.program.model.dtype
    assert torch.equal(matrix.double() @ matrix.double().T, expected.size * torch.eye(expected.size, dtype=torch.float64))


def test_compressed_tensors_applies_each_down_projections_rotation_as_the_program_does(rotated):
    model = load_with_transforms(rotated.out)
    rotations = expressible_rotations(rotated.program, checkpoint_linears(rotated.program, "vllm"))
    assert sorted(rotations) == [f"model.layers.{i}.mlp.down_proj" for i in range(len(model.model.layers))]
    for name, rotation in rotations.items():
        x = torch.randn(3, rotation.order, generator=torch.Generator().manual_seed(0))
        exact = x.double() @ rotation.matrix()
        # float32 dot products of length n are within n·eps of Σ|x·m| of the exact value (a dense product or a
        # butterfly alike); a wrong matrix is off by the size of the values
        bound = rotation.order * torch.finfo(torch.float32).eps * (x.double().abs() @ rotation.matrix().abs())
        with torch.no_grad():
            hooked = model.get_submodule(f"{name}.{rotated.expected.group}_input")(x)
            assert bool(((hooked.double() - exact).abs() <= bound).all())
            assert bool(((rotation(x).double() - exact).abs() <= bound).all())


def test_checkpoint_with_transforms_gives_the_programs_logits_within_its_rounding_noise(rotated, vllm_per_token_scales):
    program_logits = simulated_logits(rotated.program, CHECK_IDS)
    tolerance = SENSITIVITY_FACTOR * logit_sensitivity(rotated.program, CHECK_IDS)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(rotated.out).eval()(input_ids=CHECK_IDS, use_cache=False).logits
        transformed = load_with_transforms(rotated.out)(input_ids=CHECK_IDS, use_cache=False).logits
    assert relative(transformed, program_logits) <= tolerance
    # without the transforms it is another model (by little more than the noise for W4A4 in bfloat16, whose int4
    # activations turn an ulp into a step; the test above tells each transform from the program's exactly)
    assert relative(plain, program_logits) > tolerance


def test_power_of_two_rotations_are_compressed_tensors_hadamard_and_paley_ones_none_of_its_constructions():
    for n in (8, 128):
        assert torch.equal(OnlineHadamard(n).matrix() * math.sqrt(n), deterministic_hadamard_matrix(n, torch.float64))
    paley = OnlineHadamard(96).matrix() * math.sqrt(96)
    drawn = random_hadamard_matrix(96, torch.float64, gen=torch.Generator().manual_seed(0))
    signs = torch.sign(paley[:, :1] * drawn[:, :1])  # the one sign draw that could match, from the first column
    assert not torch.equal(signs * drawn, paley)
    assert transform_of(OnlineHadamard(96)) == Transform("random-hadamard", None, 96)


def test_online_rotations_of_fused_moe_experts_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ExportError, match=r"experts\.0\.down_proj .*online rotation inside fused MoE experts.*format mindie"):
        compile_rotated(tmp_path, "qwen3_moe", "llm/w4a8_quarot_gptq.yaml", 128)
    assert not (tmp_path / "out").exists()


def lowered(tmp_path: Path, family: str, rotation: list[dict], scheme: dict):
    """A tiny model rotated and quantized in memory, its config.json saved where the program's source points."""
    model = tiny_causal_lm(family, sizes={"intermediate_size": 96})
    program, _ = run_pipeline(model, [*rotation, {"pass": "fake_quant", "rules": [{"scheme": "q", "exclude": ["lm_head"]}]},
                                      {"pass": "calibrate"}, {"pass": "lower"}], schemes={"q": scheme})
    model.config.save_pretrained(tmp_path / "source")
    program.source = dataclasses.replace(program.source, path=tmp_path / "source")
    out = tmp_path / "out"
    out.mkdir()
    return program, out


def test_a_rotated_linear_with_a_bias_is_refused_since_vllm_transforms_only_bias_free_ones(tmp_path):
    program, out = lowered(tmp_path, "qwen2", [{"pass": "rotate_inputs", "include": ["*self_attn.[qkv]_proj"]}], W8A8_DYNAMIC)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj has an online rotation and a bias"):
        VllmBackend().export(program, out)


def test_rotated_inputs_of_q_k_v_are_one_transform_that_gives_the_programs_logits(tmp_path, vllm_per_token_scales):
    program, out = lowered(tmp_path, "llama", [{"pass": "rotate_inputs", "include": ["*self_attn.[qkv]_proj"]}], W8A8_DYNAMIC)
    VllmBackend().export(program, out)
    VllmBackend().verify(program, out)
    targets = [rf"re:^model\.layers\.\d+\.self_attn\.{p}_proj$" for p in "qkv"]
    assert read_transform_config(out) == TransformConfig(config_groups={"hadamard": TransformScheme(
        type="hadamard", apply=[TransformArgs(targets=targets, location="input")])})
    with torch.no_grad():
        transformed = load_with_transforms(out)(input_ids=CHECK_IDS, use_cache=False).logits
    assert relative(transformed, simulated_logits(program, CHECK_IDS)) <= SENSITIVITY_FACTOR * logit_sensitivity(program, CHECK_IDS)


def test_a_rotation_of_only_some_linears_that_vllm_fuses_is_refused(tmp_path):
    program, out = lowered(tmp_path, "llama", [{"pass": "rotate_inputs", "include": ["*self_attn.q_proj"]}], W8A8_DYNAMIC)
    with pytest.raises(ExportError, match=r"layers\.0\.self_attn\.q_proj has an online rotation and "
                                          r"model\.layers\.0\.self_attn\.k_proj, which reads the same tensor, has none"):
        VllmBackend().export(program, out)


@pytest.fixture
def rotated_export(tmp_path):
    program, out = lowered(tmp_path, "llama", [{"pass": "norm_fusion"}, {"pass": "rotate"}], W4A8)
    VllmBackend().export(program, out)
    VllmBackend().verify(program, out)
    return program, out


def test_verify_fails_when_a_stored_hadamard_matrix_changed(rotated_export):
    program, out = rotated_export
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.stored_hadamard_input.weight"][0, 0] *= -1
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ExportError, match=r"mlp\.down_proj rotates differently"):
        VllmBackend().verify(program, out)


def test_verify_fails_when_the_transform_config_is_missing(rotated_export):
    program, out = rotated_export
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["transform_config"] = {}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="no transform_config, but the program has online rotations"):
        VllmBackend().verify(program, out)
